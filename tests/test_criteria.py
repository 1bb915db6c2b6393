"""Each criterion equals a direct hand computation; the registry rejects unknown names."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from sdmprune import SdmpruneError, prune
from sdmprune.criteria import CRITERIA, ScoringContext, compute_scores
from sdmprune.criteria.magnitude import Magnitude
from sdmprune.masks import NeuronMasks


def test_magnitude_is_the_norm_of_the_neurons_weights():
    model = tiny_model("mistral")
    scores = compute_scores(Magnitude(), ScoringContext(model, NeuronMasks(model), None))
    mlp = model.model.layers[1].mlp
    i = 7
    weights = torch.cat([mlp.gate_proj.weight[i], mlp.up_proj.weight[i], mlp.down_proj.weight[:, i]])
    assert scores[1][i].item() == pytest.approx(weights.norm().item(), rel=1e-6)
    assert scores[1].dtype == torch.float32 and scores[1].shape == (64,)


def test_pruned_neurons_score_minus_infinity():
    model = tiny_model("llama")
    result = prune(model, mlp_ratio=0.5, criterion="magnitude")
    scores = compute_scores(Magnitude(), ScoringContext(model, result.masks, None))
    assert torch.isinf(scores[0][~result.masks.keep[0]]).all()
    assert torch.isfinite(scores[0][result.masks.keep[0]]).all()


def test_random_is_seeded():
    def kept(seed):
        return prune(tiny_model("llama"), mlp_ratio=0.5, criterion="random", seed=seed).masks.kept_indices()

    assert kept(1) == kept(1)
    assert kept(1) != kept(2)


def test_registry():
    assert {"magnitude", "random"} <= set(CRITERIA)
    with pytest.raises(SdmpruneError, match="unknown criterion 'nope'"):
        prune(tiny_model("llama"), ratio=0.2, criterion="nope")
