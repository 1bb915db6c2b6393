"""Masked model == exported-and-reloaded model, for every architecture and export layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, manual_report, random_keep, tiny_model
from transformers import AutoModelForCausalLM

from sdmprune import SdmpruneError, count_parameters, export_pruned, load_model, load_pruned, prune
from sdmprune.masks import NeuronMasks

IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def test_masked_equals_exported_reloaded(arch, tokenizer, tmp_path):
    model = tiny_model(arch)
    result = prune(model, ratio=0.2, criterion="random", seed=3)
    masked = logits(model)
    predicted = count_parameters(model).after(result.masks.widths)
    assert predicted == result.report["achieved"]["params_after"]

    out = export_pruned(model, tokenizer, result.masks, tmp_path / "out", report=result.report)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.intermediate_size == result.masks.widths[0]
    assert (logits(reloaded) - masked).abs().max().item() <= 1e-4
    assert sum(p.numel() for p in reloaded.parameters()) == predicted
    assert count_parameters(model).total == predicted  # the in-memory model was sliced too

    record = json.loads((out / "pruning.json").read_text())
    assert record["export"]["layout"] == "uniform"
    assert [len(k) for k in record["kept_indices"]] == record["widths"]
    assert record["achieved"]["params_after"] == predicted
    assert {"torch", "transformers", "sdmprune"} <= set(record["versions"])
    assert "random" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_masks_off_is_the_dense_model():
    model = tiny_model("llama")
    dense = logits(model)
    masks = prune(model, mlp_ratio=0.5, criterion="magnitude").masks
    assert not torch.equal(logits(model), dense)
    with masks.disabled():
        assert torch.equal(logits(model), dense)
    assert not torch.equal(logits(model), dense)  # masks are back on after the block
    masks.remove()
    assert torch.equal(logits(model), dense)


@pytest.mark.parametrize("padded", [False, True])
def test_per_layer_widths(tokenizer, tmp_path, padded):
    model = tiny_model("qwen2")
    masks = NeuronMasks(model, random_keep())
    masked = logits(model)
    out = export_pruned(model, tokenizer, masks, tmp_path / "out", report=manual_report(), padded=padded)
    record = json.loads((out / "pruning.json").read_text())
    assert record["widths"] == [40, 24]
    assert record["export"]["layout"] == ("padded" if padded else "per-layer")

    reloaded, _ = load_pruned(out, dtype="float32", device="cpu")
    assert (logits(reloaded) - masked).abs().max().item() <= 1e-4
    via_load_model, _ = load_model(str(out), dtype="float32", device="cpu")
    assert (logits(via_load_model) - masked).abs().max().item() <= 1e-4
    if padded:
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert plain.config.intermediate_size == 40
        assert (logits(plain) - masked).abs().max().item() <= 1e-4
    else:
        widths = [layer.mlp.down_proj.in_features for layer in reloaded.model.layers]
        assert widths == [40, 24]


def test_existing_output_refused_and_failed_export_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    model = tiny_model("llama")
    result = prune(model, ratio=0.1, criterion="magnitude")
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(SdmpruneError, match="already exists"):
        export_pruned(model, tokenizer, result.masks, existing, report=result.report)

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_pruned(model, tokenizer, result.masks, tmp_path / "new", report=result.report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]
