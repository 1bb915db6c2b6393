"""Allocations (uniform, global, layer-range), prune-and-rescore steps and the SDMPrune plan, via the API."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from sdmprune import count_parameters, prune
from sdmprune.allocation import Global, kept_budget, standardise
from sdmprune.criteria import CRITERIA, ScoringContext, compute_scores
from sdmprune.criteria.sdmprune import OFFICIAL_DISTILLATION, SDMPrune
from sdmprune.errors import SdmpruneError
from sdmprune.masks import NeuronMasks


def calibration() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def test_layer_range_keeps_the_first_and_last_layers_dense():
    model = tiny_model("llama", num_hidden_layers=16)
    result = prune(model, mlp_ratio=0.3, criterion="magnitude", allocation="layer-range")
    widths = result.masks.widths
    assert widths[:2] == [64, 64] and widths[-1] == 64  # round(16/8) first, round(16/16) last
    assert len(set(widths[2:-1])) == 1 and widths[2] < 64
    assert result.report["achieved"]["mlp_ratio"] >= 0.3


def test_global_allocation_keeps_the_best_standardised_scores_anywhere():
    model = tiny_model("llama", num_hidden_layers=4)
    masks = NeuronMasks(model)
    scores = compute_scores(CRITERIA.get("wanda-sp")(), ScoringContext(model, masks, calibration()))
    masks.remove()
    result = prune(model, mlp_ratio=0.5, criterion="wanda-sp", allocation="global", width_band=None,
                   calibration=calibration())
    widths = result.masks.widths
    assert sum(widths) == 128 and len(set(widths)) > 1  # 4 layers x 64 x 0.5, unevenly spread
    z = torch.cat(standardise(scores))
    kept = torch.cat(result.masks.keep)
    assert z[kept].min() >= z[~kept].max()  # one global threshold on the standardised scores


def test_width_band_keeps_global_widths_near_uniform_and_the_best_inside_the_band():
    # Layer 3 has 4 outstanding neurons and 60 poor ones: unbounded, global ranking leaves it 17 of 64.
    scores = [torch.arange(64.0) for _ in range(3)] + [torch.cat([torch.zeros(60), torch.full((4,), 1000.0)])]
    count = count_parameters(tiny_model("llama", num_hidden_layers=4))
    assert Global(width_band=None).widths(count, 128, 1, scores) == [37, 37, 37, 17]
    # Within 32 ± 25% (the default band): layer 3 keeps 24, the others share the rest on their scores (ties: lower
    # layers first).
    assert Global().widths(count, 128, 1, scores) == [35, 35, 34, 24]
    assert Global(width_band=0.05).widths(count, 128, 1, scores) == [33, 33, 32, 30]  # 30 .. 34
    with pytest.raises(SdmpruneError, match="--width-band must be positive"):
        prune(tiny_model("llama"), mlp_ratio=0.5, criterion="magnitude", allocation="global", width_band=0.0)
    with pytest.raises(SdmpruneError, match="--width-band does not apply here"):
        prune(tiny_model("llama"), mlp_ratio=0.5, criterion="magnitude", width_band=0.2)


def test_steps_prune_progressively_to_the_target():
    result = prune(tiny_model("llama"), mlp_ratio=0.5, criterion="taylor", steps=3, calibration=calibration())
    widths = [step["widths"][0] for step in result.report["steps"]]
    assert widths == [53, 42, 32]  # 64 - 32·k/3, rounded down
    assert [step["stage"] for step in result.report["steps"]] == ["prune"] * 3


@pytest.mark.parametrize(("ratio", "official"), [(0.18, 0.2), (0.27, 0.3), (0.45, 0.4)])
def test_sdmprune_plan_cold_start_then_distillation_with_official_settings(ratio, official):
    model = tiny_model("llama", intermediate_size=256)
    count = count_parameters(model)
    target = kept_budget(count, ratio=ratio)
    steps = SDMPrune().plan(count, target, 2)
    assert [s.stage for s in steps] == ["cold-start", "prune", "prune"]
    assert steps[0].budget == pytest.approx(2 * 256 * 0.975) and steps[0].settings["alpha"] == 0.0
    assert (steps[1].settings["alpha"], steps[1].settings["temperature"]) == OFFICIAL_DISTILLATION[official]
    overridden = SDMPrune(alpha=0.9, temperature=2.0).plan(count, target, 1)
    assert (overridden[-1].settings["alpha"], overridden[-1].settings["temperature"]) == (0.9, 2.0)
