"""`compress`: the plan, the live teacher (the dense model in the student's own weights), and a run killed in
every stage that resumes to the same export, byte for byte."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sdmprune.config import LoraOptions
from sdmprune.errors import SdmpruneError
from sdmprune.lora import attach_lora
from sdmprune.masks import NeuronMasks
from sdmprune.recipes import compress
from sdmprune.recipes.steps import measure, perplexity_windows
from sdmprune.reconstruct import ReconstructConfig, reconstruct
from sdmprune.recovery.cached_teacher import CachedTeacher, cache_teacher
from sdmprune.recovery.data import IGNORE_INDEX, collate, text_windows
from sdmprune.recovery.finetune import model_teacher, recovery_loss_sums

DATA_DIR = Path(os.environ.get("SDMPRUNE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
schedule = importlib.import_module("sdmprune.schedule")
finetune_module = importlib.import_module("sdmprune.recovery.finetune")


def options(model: Path, text: Path, output: Path, **extra) -> dict:
    """The prune and reconstruct stages apart: one importance named (compress's default, auto, makes them one
    stage; tests/test_selection.py)."""
    return dict(model=str(model), importance="activation-wanda", mlp_ratio=0.5, cold_start=0.1, calib=str(text),
                calib_samples=4, calib_seq_len=32, reconstruct="one-shot", recover_data=str(text), recover_tokens=256,
                max_len=32, batch_size=2, grad_accum=1, save_every=1, ppl_data=str(text), seq_len=32, max_tokens=0,
                bf16=False, tasks="boolq", limit=2, data_dir=str(DATA_DIR), output=str(output), **extra)


def test_live_teacher_is_the_dense_model_after_reconstruction_and_training():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        output = model(input_ids=ids, output_hidden_states=True)
        dense, dense_states = output.logits, output.hidden_states[1:]
    masks = NeuronMasks(model, [torch.arange(64) % 2 == 0] * 2)
    reconstruct(model, masks, ids, ReconstructConfig("one-shot", 1e-2, intercept=True))
    peft_model, _ = attach_lora(model, LoraOptions(lora_dropout=0.0, lora_targets="q_proj,gate_proj"))
    with torch.no_grad():  # a trained adapter: nonzero B matrices
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = collate(text_windows(ids), [0, 1, 2], pad_id=0)
    teacher = compress.live_teacher(peft_model, masks, bf16=False)(batch, True)
    assert torch.equal(teacher.targets, dense[:, :-1].reshape(-1, dense.shape[-1]))  # exactly, not approximately
    assert len(teacher.hidden) == 2 and all(torch.equal(t, d.flatten(0, 1)) for t, d in zip(teacher.hidden,
                                                                                          dense_states, strict=True))
    with torch.inference_mode():
        student = peft_model(input_ids=ids).logits
    assert not torch.allclose(student, dense, atol=1e-3)  # the student itself is the pruned, adapted model
    assert masks.enabled


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_kl_equals_the_live_kl_when_k_covers_the_vocabulary(temperature, tmp_path):
    teacher_model, student_model = tiny_model("qwen2"), tiny_model("qwen2", seed=1)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    data = text_windows(ids)
    data.labels[1][:5] = [IGNORE_INDEX] * 5  # a masked prompt: only target positions are cached
    batch = collate(data, [2, 1], pad_id=0)
    with torch.inference_mode():
        student = student_model(input_ids=batch["input_ids"]).logits
    live = model_teacher(teacher_model, bf16=False)(batch, False).targets
    _, live_kl, n = recovery_loss_sums(student, batch["labels"], live, temperature)
    kls = {}
    for k in (VOCAB, 16, 1):
        path = tmp_path / f"top{k}.safetensors"
        description = cache_teacher(teacher_model, data, path, top_k=k, temperature=temperature, bf16=False,
                                    batch_size=2, pad_id=0)
        assert description["target_tokens"] == 3 * 15 - 4 and description["bytes_per_token"] == 8 * k
        targets = CachedTeacher(path, torch.device("cpu"))(batch).targets
        assert targets.indices.shape == (n, k)
        kls[k] = recovery_loss_sums(student, batch["labels"], targets, temperature)[1]
    torch.testing.assert_close(kls[VOCAB], live_kl, rtol=1e-5, atol=1e-5)
    assert 0 < kls[1] < kls[16] <= live_kl + 1e-5  # lumping the tail: a lower bound, tighter with k


def test_dry_run_plans_the_stages_the_run_executes(saved_model, text_file, tmp_path, capsys):
    other_text = tmp_path / "other.txt"
    other_text.write_text("A lazy dog sleeps while the quick brown fox runs. " * 40)
    settings = {**options(saved_model, text_file, tmp_path / "out"), "ppl_data": f"{text_file},{other_text}"}
    plan = compress.run(compress.CompressRun.of(**settings, dry_run=True))["plan"]
    assert "1. calibrate" in capsys.readouterr().out and not (tmp_path / "out").exists()
    report = compress.run(compress.CompressRun.of(**settings))
    assert [s["stage"] for s in plan] == [s["stage"] for s in report["stages"]] == list(compress.STAGES)
    assert all(s["peak_memory_mib"] > 0 for s in report["stages"][:-1])  # every stage but the final export
    record = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert list(record["evaluation"]) == ["dense", "pruned", "reconstructed", "recovered"]
    for figures in record["evaluation"].values():  # each text measured after each stage
        assert list(figures) == [str(text_file), str(other_text)]
        assert figures[str(text_file)]["ppl"] != figures[str(other_text)]["ppl"]
    assert record["stages"][3]["teacher"].startswith("live") and record["stages"][3]["steps"] == 4
    assert (tmp_path / "out" / "stages.png").stat().st_size > 0 and not (tmp_path / "out" / "stages").exists()
    recovery = record["stages"][3]
    assert recovery["final_loss"] < recovery["first_loss"]  # the KL to the dense model went down


def test_stage_exports_are_the_model_after_their_stage(saved_model, text_file, tmp_path):
    settings = {**options(saved_model, text_file, tmp_path / "out"), "recover_data": "none", "tasks": None,
                "export_stages": True}
    record = compress.run(compress.CompressRun.of(**settings))
    stages = tmp_path / "out" / compress.STAGE_MODELS
    assert sorted(path.name for path in stages.iterdir()) == ["pruned", "reconstructed"]
    final = load_file(tmp_path / "out" / "model.safetensors")
    exported = {name: load_file(stages / name / "model.safetensors") for name in ("pruned", "reconstructed")}
    assert exported["reconstructed"].keys() == final.keys()
    assert all(torch.equal(exported["reconstructed"][k], final[k]) for k in final)  # nothing changed it after
    down = "model.layers.0.mlp.down_proj.weight"
    assert exported["pruned"][down].shape == final[down].shape and not torch.equal(exported["pruned"][down],
                                                                                   final[down])
    config = compress.CompressRun.of(**settings)
    for name, figure in record["evaluation"].items():
        if name in exported:  # each export loads with plain transformers and has its stage's perplexity
            model, tokenizer = (auto.from_pretrained(stages / name) for auto in (AutoModelForCausalLM, AutoTokenizer))
            windows = perplexity_windows(config.evaluation, config.data, model, tokenizer)
            measured = measure(model, tokenizer, windows, config.evaluation, bf16=False)
            assert measured["ppl"] == pytest.approx(figure[str(text_file)]["ppl"], rel=1e-4)
    assert record["evaluation"]["pruned"] != record["evaluation"]["reconstructed"]


class Killed(Exception):
    pass


def kill_in(stage: str, teacher: str, monkeypatch) -> None:
    """Make the next run die inside `stage` (mid-way where the stage saves progress)."""
    if stage == "calibrate":  # the cached teacher's pass over the recovery data, or the dense perplexity
        target = {"cached": "cache_teacher", "live": "measure"}[teacher]
        monkeypatch.setattr(compress, target, lambda *a, **k: (_ for _ in ()).throw(Killed))
    elif stage == "prune":  # after the cold start's step was saved
        original, calls = schedule.compute_scores, []

        def scores(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise Killed
            return original(*args, **kwargs)

        monkeypatch.setattr(schedule, "compute_scores", scores)
    elif stage == "recover":  # after step 2 of 4 was saved
        save = finetune_module.save_training_state

        def save_then_die(checkpoint, settings, model, optimizer, scheduler, step, *rest):
            save(checkpoint, settings, model, optimizer, scheduler, step, *rest)
            if step == 2:
                raise Killed

        monkeypatch.setattr(finetune_module, "save_training_state", save_then_die)
    else:
        target = {"reconstruct": "reconstruct_on", "evaluate": "evaluate_tasks", "export": "export_pruned"}[stage]
        monkeypatch.setattr(compress, target, lambda *a, **k: (_ for _ in ()).throw(Killed))


@pytest.mark.parametrize("stage, teacher", [("calibrate", "live"), ("calibrate", "cached"), ("prune", "live"),
                                            ("reconstruct", "live"), ("recover", "live"), ("recover", "cached"),
                                            ("evaluate", "live"), ("export", "live")])
def test_killed_in_any_stage_resumes_to_the_same_export(stage, teacher, saved_model, text_file, tmp_path,
                                                        monkeypatch):
    settings = {"recover_teacher": teacher, "recover_top_k": 8, "export_stages": True}
    compress.run(compress.CompressRun.of(**options(saved_model, text_file, tmp_path / "straight"), **settings))
    killed = tmp_path / "killed"
    with monkeypatch.context() as patch:
        kill_in(stage, teacher, patch)
        with pytest.raises(Killed):
            compress.run(compress.CompressRun.of(**options(saved_model, text_file, killed), **settings))
    with pytest.raises(SdmpruneError, match="interrupted run"):
        compress.run(compress.CompressRun.of(**options(saved_model, text_file, killed), **settings))
    compress.run(compress.CompressRun.of(**options(saved_model, text_file, killed), resume=True, **settings))
    stage_models = [f"{compress.STAGE_MODELS}/{stage}/model.safetensors" for stage in ("pruned", "reconstructed")]
    for name in ("model.safetensors", "config.json", *stage_models):
        assert (killed / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    if teacher == "cached":
        stages = {s["stage"]: s for s in json.loads((killed / "pruning.json").read_text())["stages"]}
        assert stages["calibrate"]["teacher_cache"]["bytes_per_token"] == 64
        assert stages["recover"]["teacher"] == "cached top-8 log-probabilities"


def test_cached_teacher_with_a_hidden_state_term_is_refused_before_any_work(saved_model, text_file, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(compress, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SdmpruneError, match="the cached teacher holds no hidden states"):
        compress.run(compress.CompressRun.of(**options(saved_model, text_file, tmp_path / "out"),
                                             recover_teacher="cached", kd_hidden=0.5))
