"""Ratio semantics: --ratio of total parameters, --mlp-ratio of neurons, rounding, reachability."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from sdmprune import SdmpruneError, count_parameters
from sdmprune.allocation import achieved, allocate_widths, keep_top, kept_budget
from sdmprune.masks import ParameterCount


def uniform_widths(count, *, width_multiple=1, **ratio):
    return allocate_widths(count, kept_budget(count, **ratio), width_multiple=width_multiple)


# Llama-3.2-1B as METHOD.md states it: 1,235,814,400 params, H=2048, I=8192, 16 layers.
LLAMA_1B = ParameterCount(
    total=1_235_814_400, mlp=16 * 3 * 2048 * 8192, mlp_per_layer=[3 * 2048 * 8192] * 16,
    widths=[8192] * 16, per_neuron=[3 * 2048] * 16,
)


@pytest.mark.parametrize(("ratio", "kept"), [(0.2, 5681), (0.3, 4425), (0.4, 3170)])
def test_total_ratio_matches_the_sdmprune_tables(ratio, kept):
    widths = uniform_widths(LLAMA_1B, ratio=ratio)
    # Exact: at least the requested ratio, and less than one more neuron per layer beyond it.
    one_neuron_per_layer = 16 * 3 * 2048 / LLAMA_1B.total
    assert ratio <= achieved(LLAMA_1B, widths)["ratio"] < ratio + one_neuron_per_layer
    # METHOD.md's widths (5681/4425/3170) come from a slightly different total; within 0.1% of I.
    assert abs(widths[0] - kept) <= 8


def test_rounding_down_to_width_multiple_never_removes_less_than_asked():
    for ratio in (0.05, 0.2, 0.33):
        exact = uniform_widths(LLAMA_1B, ratio=ratio)[0]
        rounded = uniform_widths(LLAMA_1B, ratio=ratio, width_multiple=64)
        assert rounded[0] % 64 == 0 and exact - 64 < rounded[0] <= exact
        result = achieved(LLAMA_1B, rounded)
        assert result["ratio"] >= ratio
        assert result["ratio"] - ratio <= 64 * 3 * 2048 * 16 / LLAMA_1B.total


def test_mlp_ratio_and_counting_with_tied_embeddings():
    model = tiny_model("qwen2")  # tied: the embedding is counted once
    count = count_parameters(model)
    embedding = model.config.vocab_size * model.config.hidden_size
    layers = sum(p.numel() for p in model.model.layers.parameters())
    assert count.total == embedding + layers + model.config.hidden_size  # + final norm
    assert count.mlp == 2 * 3 * 32 * 64
    assert count.per_neuron == [3 * 32, 3 * 32]
    assert uniform_widths(count, mlp_ratio=0.25) == [48, 48]
    assert uniform_widths(count, mlp_ratio=0.25, width_multiple=20) == [40, 40]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0}, r"--ratio must be in \(0, 1\)"),
        ({"ratio": -0.1}, r"--ratio must be in \(0, 1\)"),
        ({"mlp_ratio": 1.0}, r"--mlp-ratio must be in \(0, 1\)"),
        ({"ratio": 0.7}, "cannot be reached by pruning MLP neurons"),
        ({}, "exactly one of"),
        ({"ratio": 0.2, "mlp_ratio": 0.2}, "exactly one of"),
    ],
)
def test_bad_ratios(kwargs, message):
    with pytest.raises(SdmpruneError, match=message):
        uniform_widths(LLAMA_1B, **kwargs)


def test_keep_top_is_deterministic_with_ties():
    scores = [torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0])]
    assert keep_top(scores, [2])[0].tolist() == [False, True, True, False, False]
