"""`--teacher progressive`: the teacher of step k is the same model run with the masks of step k - lag
(dense before step 1), it survives an interrupted run, and it asks for enough steps."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model
from safetensors.torch import load_file

import sdmprune.schedule as schedule
from sdmprune import SdmpruneError, prune
from sdmprune.checkpoint import STATE_TENSORS
from sdmprune.masks import NeuronMasks
from sdmprune.teachers.progressive import Progressive as ProgressiveTeacher

CALIBRATION = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
SETTINGS = dict(criterion="sdmprune", importance="weight", mlp_ratio=0.5, steps=3, cold_start=0.1,
                teacher="progressive", seed=1)


def history(state_dir) -> list[list[torch.Tensor]]:
    """The masks every step started from, as saved in the run state."""
    tensors = load_file(state_dir / STATE_TENSORS)
    steps = 1 + max(int(name.split(".")[1]) for name in tensors if name.startswith("history."))
    return [[tensors[f"history.{j}.{i}"].bool() for i in range(2)] for j in range(steps)]


@pytest.mark.parametrize("lag", [1, 2])
def test_teacher_of_step_k_is_the_model_with_the_masks_of_step_k_minus_lag(tmp_path, monkeypatch, lag):
    calls = []  # (step k, ids, teacher logits)
    original = ProgressiveTeacher.logits

    def recording(self, ids):
        logits = original(self, ids)
        calls.append((len(self.run.history), ids.clone(), logits))
        return logits

    monkeypatch.setattr(ProgressiveTeacher, "logits", recording)
    prune(tiny_model("llama"), calibration=CALIBRATION, state_dir=tmp_path, teacher_lag=lag, **SETTINGS)
    masks_of_step = history(tmp_path)  # masks_of_step[k - 1]: what step k's student ran with
    assert len(masks_of_step) == 4  # cold start + 3 distillation steps
    assert sorted({k for k, _, _ in calls}) == [2, 3, 4]  # the cold start (step 1) has no teacher

    reference = tiny_model("llama")
    non_dense = 0
    for k, ids, logits in calls:
        earlier = k - lag
        masks = NeuronMasks(reference, masks_of_step[earlier - 1]) if earlier >= 1 else None
        with torch.inference_mode():
            expected = reference(input_ids=ids, use_cache=False).logits
        assert torch.equal(logits, expected), (k, lag)
        if masks is not None:
            non_dense += not all(m.all() for m in masks.keep)
            masks.remove()
    assert non_dense > 0  # some teacher really was an earlier, pruned student


def test_interrupted_progressive_run_resumes_to_the_same_masks(tmp_path, monkeypatch):
    reference = prune(tiny_model("llama"), calibration=CALIBRATION, state_dir=tmp_path / "a", **SETTINGS)

    calls = 0
    original = schedule.compute_scores

    def crash_at_step_4(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 4:  # steps 1-3 are saved; step 4's teacher is step 3's student
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(schedule, "compute_scores", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        prune(tiny_model("llama"), calibration=CALIBRATION, state_dir=tmp_path / "b", **SETTINGS)
    assert len(history(tmp_path / "b")) == 3
    monkeypatch.setattr(schedule, "compute_scores", original)
    resumed = prune(tiny_model("llama"), calibration=CALIBRATION, state_dir=tmp_path / "b", resume=True, **SETTINGS)
    for a, b in zip(reference.masks.keep, resumed.masks.keep, strict=True):
        assert torch.equal(a, b)
    assert [s["step"] for s in resumed.report["steps"]] == [1, 2, 3, 4]


def test_progressive_differs_from_the_dense_teacher_and_needs_enough_steps():
    progressive = prune(tiny_model("llama"), calibration=CALIBRATION, **SETTINGS)
    dense = prune(tiny_model("llama"), calibration=CALIBRATION, **{**SETTINGS, "teacher": "masks-off"})
    assert [s["widths"] for s in progressive.report["steps"]] == [s["widths"] for s in dense.report["steps"]]
    assert any(not torch.equal(a, b) for a, b in zip(progressive.masks.keep, dense.masks.keep, strict=True))
    with pytest.raises(SdmpruneError, match="--steps 3 or more"):
        prune(tiny_model("llama"), calibration=CALIBRATION, **{**SETTINGS, "teacher_lag": 2, "steps": 2})
