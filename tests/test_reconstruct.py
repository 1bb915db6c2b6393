"""Reconstruction: the refit is the ridge least-squares solution on the calibration activations, it lives in the
masks (masks off = the dense model, bit for bit), and the export writes it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, manual_report, tiny_model
from transformers import AutoModelForCausalLM

import sdmprune.reconstruct as reconstruction
from sdmprune import SdmpruneError, export_pruned
from sdmprune.cli import main
from sdmprune.data.calibration import MORE_WINDOWS_SEED
from sdmprune.distributed import shard_windows
from sdmprune.masks import HeadMasks, NeuronMasks
from sdmprune.reconstruct import (
    ReconstructConfig,
    RefitStatistics,
    choose_damping,
    reconstruct,
    refit,
    ridge_solve,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)

CALIBRATION = torch.randint(0, VOCAB, (6, 24), generator=torch.Generator().manual_seed(2))  # 144 tokens > width 64
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def random_masks(model, keep_fraction: float = 0.6, seed: int = 0, layers: tuple[int, ...] = (0, 1)) -> NeuronMasks:
    """Keep the first round(keep_fraction·64) of a random permutation in each of `layers`; the others stay whole."""
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for layer in range(2):
        mask = torch.ones(64, dtype=torch.bool)
        if layer in layers:
            mask[torch.randperm(64, generator=generator)[round(keep_fraction * 64):]] = False
        keep.append(mask)
    return NeuronMasks(model, keep)


def dense_activations(model, masks: NeuronMasks) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, over CALIBRATION in the dense model (masks off): the down_proj input (tokens, I) and the decoder
    layer's output (tokens, H), fp64."""
    captured: list[list[list[torch.Tensor]]] = [[[], []] for _ in model.model.layers]
    handles = []
    for i, layer in enumerate(model.model.layers):
        handles += [
            layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: captured[i][0].append(a[0])),
            layer.register_forward_hook(lambda m, a, out, i=i: captured[i][1].append(out)),
        ]
    with masks.disabled(), torch.inference_mode():
        model(input_ids=CALIBRATION)
    for handle in handles:
        handle.remove()
    return [tuple(torch.cat(part).flatten(0, -2).double() for part in parts) for parts in captured]


def ridge_expectation(u: torch.Tensor, following: torch.Tensor, kept: torch.Tensor, weight: torch.Tensor,
                      damping: float, intercept: bool, normalised: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-shot refit (H, k) and intercept (H,) of down_proj `weight` (H, I) from captured dense activations,
    as plain least squares: the weighted rows augmented with sqrt(λ)·I, whose targets are sqrt(λ)·W[:, S]ᵀ."""
    target = u @ weight.T  # (tokens, H): the dense layer's output
    weights = 1 / following.pow(2).mean(1) if normalised else torch.ones(u.shape[0], dtype=torch.float64)
    regressors, centred = u[:, kept], target
    if intercept:  # weighted centring: the intercept is not damped
        regressors = regressors - weights @ regressors / weights.sum()
        centred = target - weights @ target / weights.sum()
    root = weights.sqrt()[:, None]
    lam = damping * (weights @ regressors.pow(2)).mean()  # damping × mean diagonal of the (weighted) Gram
    a = torch.cat([root * regressors, lam.sqrt() * torch.eye(kept.numel(), dtype=torch.float64)])
    b = torch.cat([root * centred, lam.sqrt() * weight[:, kept].T])
    expected = torch.linalg.lstsq(a, b).solution.T  # (H, k)
    return expected, weights @ (target - u[:, kept] @ expected.T) / weights.sum()


@pytest.mark.parametrize("damping", [0.0, 1e-2])
@pytest.mark.parametrize("intercept", [False, True])
@pytest.mark.parametrize("normalised", [False, True])
def test_one_shot_refit_is_ridge_least_squares_on_captured_activations(damping, intercept, normalised):
    model = tiny_model("llama")
    masks = random_masks(model)
    config = ReconstructConfig("one-shot", damping, intercept, normalised=normalised, refit_holdout=0)
    report = reconstruct(model, masks, CALIBRATION, config, micro_batch=4)
    assert report["tokens"] == CALIBRATION.numel() and len(report["layers"]) == 2
    for layer, (u, following) in enumerate(dense_activations(model, masks)):
        down = model.model.layers[layer].mlp.down_proj
        kept = torch.nonzero(masks.keep[layer]).flatten()
        expected, bias = ridge_expectation(u, following, kept, down.weight.double(), damping, intercept, normalised)
        refitted = masks.weight[layer]
        assert refitted.dtype == down.weight.dtype and refitted.shape == down.weight.shape
        assert not refitted[:, ~masks.keep[layer]].any()
        torch.testing.assert_close(refitted[:, kept].double(), expected, rtol=1e-5, atol=1e-6)
        if intercept:
            torch.testing.assert_close(masks.bias[layer].double(), bias, rtol=1e-5, atol=1e-6)
        else:
            assert masks.bias[layer] is None
        row = report["layers"][layer]
        assert row["error_after"] < row["error_before"] and row["jitter"] == 0.0
        assert "damping" not in row  # no holdout: the damping as given


def test_nothing_removed_gives_back_w_for_any_damping():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(512, 16, generator=generator, dtype=torch.float64)  # a well-conditioned (16, 16) Gram
    weight = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    stats = RefitStatistics.zeros(16, 8, torch.device("cpu"))
    stats.add(inputs, inputs @ weight.T)
    exact, bias, _ = refit(stats, 0.0, intercept=False)
    torch.testing.assert_close(exact, weight, rtol=1e-10, atol=1e-10)
    assert bias is None and stats.relative_error(exact, None) < 1e-12  # the expanded sums cancel to fp64 rounding
    for damping in (1e-3, 1.0, 1e3):  # the ridge pulls towards the kept weights, here the exact solution
        damped, bias, _ = refit(stats, damping, intercept=True, prior=weight)
        torch.testing.assert_close(damped, weight, rtol=1e-9, atol=1e-9)
        assert bias.abs().max() < 1e-9
    shrunk, _, _ = refit(stats, 1e3, intercept=False)  # without a prior: towards zero
    assert shrunk.norm() < 0.01 * weight.norm()


def _statistics(inputs: torch.Tensor, targets: torch.Tensor) -> RefitStatistics:
    stats = RefitStatistics.zeros(inputs.shape[1], targets.shape[1], torch.device("cpu"))
    stats.add(inputs, targets)
    return stats


def test_the_holdout_keeps_the_weights_where_a_refit_would_fit_noise_and_refits_where_it_generalises():
    generator = torch.Generator().manual_seed(0)
    kept, hidden = 32, 4
    weight = torch.randn(hidden, kept, generator=generator, dtype=torch.float64)  # the kept weights, as they are

    def tokens(n: int, truth: torch.Tensor, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.randn(n, kept, generator=generator, dtype=torch.float64)
        return u, u @ truth.T + noise * torch.randn(n, hidden, generator=generator, dtype=torch.float64)

    dampings = [1e-4, 3e-3, 1e-1, 3.0]
    # the kept weights are right and the targets noisy: 34 tokens for 32 weights per row fit the noise
    fit, held = _statistics(*tokens(34, weight, 1.0)), _statistics(*tokens(256, weight, 1.0))
    chosen, errors = choose_damping(fit, held, dampings, False, weight, None)
    assert chosen is None and list(errors) == ["none", "0.0001", "0.003", "0.1", "3"]
    assert errors["none"] == min(errors.values()) and errors["0.0001"] > 1.5 * errors["none"]
    # the kept weights are off and there are plenty of tokens: the refit generalises, the lightest damping wins
    truth = weight + torch.randn(hidden, kept, generator=generator, dtype=torch.float64)
    fit, held = _statistics(*tokens(2048, truth, 0.1)), _statistics(*tokens(256, truth, 0.1))
    chosen, errors = choose_damping(fit, held, dampings, False, weight, None)
    assert chosen == 1e-4 and errors["0.0001"] < 0.1 * errors["none"]


@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
def test_the_held_out_windows_choose_the_damping_then_every_window_fits(mode):
    model = tiny_model("llama")
    masks = random_masks(model)
    config = ReconstructConfig(mode, refit_holdout=0.34)  # 2 of the 6 windows held out
    report = reconstruct(model, masks, CALIBRATION, config, micro_batch=4)
    assert report["refit_holdout"] == 0.34 and report["dampings_tried"] == [1e-4, 3e-3, 0.1]
    for layer, row in enumerate(report["layers"]):
        errors = row["held_out_errors"]
        assert list(errors) == ["none", "0.0001", "0.003", "0.1"]
        best = min(errors, key=errors.__getitem__)
        assert row["damping"] == (None if best == "none" else float(best))
        if mode == "one-shot" and row["damping"] is not None:  # solved again on all six windows
            u, following = dense_activations(model, masks)[layer]
            kept = torch.nonzero(masks.keep[layer]).flatten()
            expected, _ = ridge_expectation(u, following, kept, model.model.layers[layer].mlp.down_proj.weight.double(),
                                            row["damping"], False, True)
            torch.testing.assert_close(masks.weight[layer][:, kept].double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(SdmpruneError, match="holds out all 6 calibration windows"):
        reconstruct(model, masks, CALIBRATION, ReconstructConfig(mode, refit_holdout=0.95))
    wider = reconstruct(model, random_masks(model), CALIBRATION,
                        ReconstructConfig(mode, refit_holdout=0.34, refit_candidates=4), micro_batch=4)
    assert wider["dampings_tried"] == [1e-4, 3e-3, 0.1, 3.0]
    assert all(list(row["held_out_errors"]) == ["none", "0.0001", "0.003", "0.1", "3"] for row in wider["layers"])
    for candidates in (0, 5):
        with pytest.raises(SdmpruneError, match="--refit-candidates must be 1 ... 4"):
            reconstruct(model, masks, CALIBRATION, ReconstructConfig(mode, refit_candidates=candidates))


def test_a_whole_layer_is_left_alone():
    model = tiny_model("llama")
    masks = random_masks(model, layers=(0,))
    report = reconstruct(model, masks, CALIBRATION, ReconstructConfig("one-shot"))
    assert masks.weight[1] is None and masks.bias[1] is None and masks.weight[0] is not None
    assert report["layers"][1] == {"layer": 1, "kept": 64}


def test_ill_conditioned_gram_is_solved():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 6, generator=generator, dtype=torch.float64)
    inputs = torch.cat([inputs, inputs[:, :1], torch.zeros(64, 1, dtype=torch.float64)], 1)  # a copy, a dead one
    target = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    weight, jitter = ridge_solve(inputs.T @ inputs, target.T @ inputs, 0.0)
    assert 0 < jitter < 1e-6 and torch.isfinite(weight).all()
    best = torch.linalg.lstsq(inputs, target, driver="gelsd").solution.T
    residual = (target - inputs @ weight.T).norm()
    assert residual <= (target - inputs @ best.T).norm() * (1 + 1e-6)
    assert not weight[:, -1].any()  # the dead neuron gets no weight
    zero, jitter = ridge_solve(torch.zeros(2, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64), 0.1)
    assert jitter == float("inf") and not zero.any()


@pytest.mark.parametrize("drift", [0.0, 0.25, 1.0])
def test_sequential_equals_one_shot_when_one_layer_is_pruned(drift):
    """Every layer below the pruned one is whole, so its inputs are the dense ones, there is no drift to correct,
    and the sequential target is the dense layer's output whatever β."""
    weights = {}
    for mode in ("one-shot", "sequential"):
        model = tiny_model("llama")
        masks = random_masks(model, layers=(1,))
        config = ReconstructConfig(mode, 1e-2, intercept=True, drift=drift, refit_holdout=0)
        report = reconstruct(model, masks, CALIBRATION, config, micro_batch=2)
        weights[mode] = (masks.weight[1], masks.bias[1], report["layers"][1]["error_after"])
    if drift == 0:  # the same computation
        assert all(torch.equal(a, b) for a, b in zip(weights["sequential"][:2], weights["one-shot"][:2], strict=True))
    # β > 0: equal up to the rounding of the fp32 residual stream, from which the drift is read
    torch.testing.assert_close(weights["sequential"][0], weights["one-shot"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights["sequential"][1], weights["one-shot"][1], rtol=1e-4, atol=1e-5)
    assert weights["sequential"][2] == pytest.approx(weights["one-shot"][2], rel=1e-4)


def test_layer_by_layer_pass_reproduces_the_model(arch):
    """The captured inputs and per-layer arguments (Gemma: sliding-window and full layers, each with its own mask
    and position embeddings) replay the model exactly; the skipped layers get their own forward back."""
    model = tiny_model(arch)
    layers = model.model.layers
    hidden, arguments = reconstruction._layer_inputs(model, layers, shard_windows(CALIBRATION, 4), torch.device("cpu"),
                                                     bf16=False)
    assert all("forward" not in layer.__dict__ for layer in layers) and len(hidden) == 2
    for start, (state, kwargs) in zip((0, 4), zip(hidden, arguments, strict=True), strict=True):
        assert len(kwargs) == len(layers)
        for layer, layer_kwargs in zip(layers, kwargs, strict=True):
            state = reconstruction._run_layer(layer, state, layer_kwargs, model, bf16=False)
        with torch.inference_mode():
            expected = model.model(input_ids=CALIBRATION[start:start + 4]).last_hidden_state
            assert torch.equal(model.model.norm(state), expected)


def test_sequential_tracks_the_dense_model_better_on_its_calibration():
    distances = {}
    for mode in ("one-shot", "sequential"):
        model = tiny_model("llama", num_hidden_layers=3)
        keep = [torch.arange(64) % 3 != 0] * 3
        masks = NeuronMasks(model, keep)
        reconstruct(model, masks, CALIBRATION, ReconstructConfig(mode, 1e-3))
        with torch.inference_mode():
            hidden = model.model(input_ids=CALIBRATION).last_hidden_state
            with masks.disabled():
                dense = model.model(input_ids=CALIBRATION).last_hidden_state
        distances[mode] = ((hidden - dense).pow(2).sum() / dense.pow(2).sum()).item()
    assert distances["sequential"] < distances["one-shot"]


def test_the_pruned_stream_is_the_masked_model_s(arch):
    """Each layer is fitted on the pruned stream the layers below it produce: the report's hidden-state drift after
    every layer equals the masked-and-refitted model's own, though the stream after a layer that adds its MLP's
    output is built from the captured down_proj inputs rather than by running the layer again."""
    model = tiny_model(arch, num_hidden_layers=3)
    masks = NeuronMasks(model, [torch.arange(64) % 3 != 0] * 3)
    config = ReconstructConfig("sequential", 1e-3, refit_holdout=0)  # every layer refitted
    report = reconstruct(model, masks, CALIBRATION, config, micro_batch=2)
    with torch.inference_mode():
        pruned = model.model(input_ids=CALIBRATION, output_hidden_states=True).hidden_states[1:]
        with masks.disabled():
            dense = model.model(input_ids=CALIBRATION, output_hidden_states=True).hidden_states[1:]
    for row, p, d in zip(report["layers"], pruned[:-1], dense[:-1], strict=False):  # the last is normalised
        expected = ((p - d).pow(2).sum(-1) / d.pow(2).sum(-1)).mean().item()
        assert row["hidden_error"] == pytest.approx(expected, rel=1e-4), row["layer"]
    assert report["layers"][0]["hidden_error"] > 0


@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
def test_masks_off_is_exactly_the_dense_model_after_reconstruction(mode):
    model = tiny_model("llama")
    dense = logits(model)
    masks = random_masks(model)
    plain = logits(model)
    reconstruct(model, masks, CALIBRATION, ReconstructConfig(mode, intercept=True, refit_holdout=0),
                bf16=mode == "sequential")
    refitted = logits(model)
    assert not torch.equal(refitted, plain) and not torch.equal(refitted, dense)
    with masks.disabled():
        assert torch.equal(logits(model), dense)
    masks.remove()
    assert torch.equal(logits(model), dense)


@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
def test_exported_model_computes_the_refitted_one(arch, mode, tokenizer, tmp_path):
    model = tiny_model(arch)
    masks = random_masks(model)
    # Gemma normalises the MLP output before the residual addition: its drift cannot be fitted (test_refusals)
    reconstruct(model, masks, CALIBRATION, ReconstructConfig(mode, drift=0.0 if arch == "gemma3_text" else 0.5))
    expected = logits(model)
    out = export_pruned(model, tokenizer, masks, tmp_path / "out", report=manual_report(0.4))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.intermediate_size == masks.widths[0] == 38
    assert (logits(reloaded) - expected).abs().max().item() <= 1e-4


def test_exported_llama_carries_the_intercept(tokenizer, tmp_path):
    model = tiny_model("llama")
    masks = random_masks(model)
    reconstruct(model, masks, CALIBRATION, ReconstructConfig("sequential", intercept=True, refit_holdout=0))
    expected = logits(model)
    out = export_pruned(model, tokenizer, masks, tmp_path / "out", report=manual_report(0.4))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.mlp_bias
    torch.testing.assert_close(reloaded.model.layers[0].mlp.down_proj.bias, masks.bias[0])
    assert (logits(reloaded) - expected).abs().max().item() <= 1e-4


def test_same_inputs_give_a_bit_identical_refit():
    results = []
    for _ in range(2):
        model = tiny_model("qwen3")
        masks = random_masks(model)
        reconstruct(model, masks, CALIBRATION, ReconstructConfig("sequential", 1e-3), micro_batch=4)
        results.append(masks.weight)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_sixteen_bit_inputs_give_the_fp64_sums_with_fp32_products():
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(512, 40, generator=generator).bfloat16()  # what a layer under bf16 autocast records
    targets, weights = torch.randn(512, 24, generator=generator, dtype=torch.float64), torch.rand(512).double()
    exact, fast = RefitStatistics.zeros(40, 24, torch.device("cpu")), RefitStatistics.zeros(40, 24, torch.device("cpu"))
    exact.add(inputs.double(), targets, weights)
    fast.add(inputs.float(), targets, weights)
    for a, b in zip(fast.tensors(), exact.tensors(), strict=True):  # sums of 512 terms: relative to their norm
        assert a.dtype == torch.float64 and (a - b).norm() <= 1e-6 * b.norm()
    assert not torch.equal(fast.gram, exact.gram)  # the products did run in fp32


def test_the_refit_runs_on_refit_samples_windows(saved_model, text_file, tmp_path, monkeypatch):
    received = []

    def recording(model, masks, windows, *args, **kwargs):
        received.append(windows)
        return reconstruct(model, masks, windows, *args, **kwargs)

    monkeypatch.setattr("sdmprune.selection.reconstruct", recording)
    assert main(["prune", "--model", str(saved_model), "--criterion", "wanda-sp", "--mlp-ratio", "0.4", "--calib",
                 str(text_file), "--calib-samples", "6", "--calib-seq-len", "24", "--refit-samples", "10",
                 "--ppl-data", "none", "--output", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "pruning.json").read_text())["reconstruction"]
    assert record["calibration"] == {"windows": 10, "from_first_draw": 6, "more_seed": MORE_WINDOWS_SEED}
    assert record["tokens"] == 10 * 24 and received[0].shape == (10, 24)


def test_refusals(monkeypatch):
    model = tiny_model("mistral")
    masks = random_masks(model)
    with pytest.raises(SdmpruneError, match="no MLP-bias option"):
        reconstruct(model, masks, CALIBRATION, ReconstructConfig("one-shot", intercept=True))
    with pytest.raises(SdmpruneError, match="unknown reconstruction 'greedy'"):
        reconstruct(model, masks, CALIBRATION, ReconstructConfig("greedy"))
    with pytest.raises(SdmpruneError, match="--damping"):
        reconstruct(model, masks, CALIBRATION, ReconstructConfig("one-shot", -1.0))
    with pytest.raises(SdmpruneError, match="--drift"):
        reconstruct(model, masks, CALIBRATION, ReconstructConfig("sequential", drift=1.5))
    with pytest.raises(SdmpruneError, match="--refit-samples must be at least 1"):
        ReconstructConfig(refit_samples=0).validate()
    with pytest.raises(SdmpruneError, match="holds out all 1 refit windows"):
        ReconstructConfig(refit_samples=1).validate()
    gemma = tiny_model("gemma3_text")
    with pytest.raises(SdmpruneError, match="'gemma3_text' transforms the MLP output"):
        reconstruct(gemma, random_masks(gemma), CALIBRATION, ReconstructConfig("sequential", drift=0.25))
    monkeypatch.setattr(reconstruction, "is_sharded", lambda model: True)
    with pytest.raises(SdmpruneError, match="FSDP"):
        reconstruct(model, masks, CALIBRATION, ReconstructConfig("one-shot"))
    assert reconstruct(model, masks, CALIBRATION, ReconstructConfig("none")) == {"mode": "none"}
    assert masks.weight == [None, None]


def dense_o_proj_inputs(model) -> list[torch.Tensor]:
    """Per layer, over CALIBRATION in the dense model: o_proj's input (tokens, heads·d), fp64."""
    captured: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: captured[i].append(a[0]))
               for i, layer in enumerate(model.model.layers)]
    with torch.inference_mode():
        model(input_ids=CALIBRATION)
    for handle in handles:
        handle.remove()
    return [torch.cat(parts).flatten(0, -2).double() for parts in captured]


@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
def test_o_proj_refit_of_removed_attention_groups_is_least_squares(mode):
    """Layer 0 loses key/value group 0 (query heads 0-1, o_proj input channels 0-15): its o_proj refit is the least
    squares fit of the dense o_proj output on the kept channels, in both modes (the first layer's inputs are the
    dense ones); layer 1 keeps its groups and its o_proj."""
    model = tiny_model("llama")
    inputs = dense_o_proj_inputs(model)
    masks = random_masks(model)
    heads = HeadMasks(model, [torch.tensor([False, True]), torch.tensor([True, True])])
    report = reconstruct(model, masks, CALIBRATION, ReconstructConfig(mode, 0.0, normalised=False), heads=heads)
    o_proj = model.model.layers[0].self_attn.o_proj
    expected = torch.linalg.lstsq(inputs[0][:, 16:], inputs[0] @ o_proj.weight.double().T).solution.T
    assert not heads.weight[0][:, :16].any() and heads.weight[1] is None and heads.bias == [None, None]
    torch.testing.assert_close(heads.weight[0][:, 16:].double(), expected, rtol=1e-5, atol=1e-6)
    attention = report["layers"][0]["attention"]
    assert attention["kept_groups"] == 1 and attention["error_after"] < attention["error_before"]
    assert "attention" not in report["layers"][1] and masks.weight[0] is not None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["one-shot", "sequential"])
def test_exported_model_without_attention_groups_computes_the_refitted_one(arch, mode, tokenizer, tmp_path):
    model = tiny_model(arch)
    dense = logits(model)
    masks = random_masks(model)
    heads = HeadMasks(model, [torch.tensor([False, True]), torch.tensor([True, False])])
    plain = logits(model)
    reconstruct(model, masks, CALIBRATION, ReconstructConfig(mode, refit_holdout=0), heads=heads)
    expected = logits(model)
    assert not torch.equal(expected, plain)
    with masks.disabled(), heads.disabled():
        assert torch.equal(logits(model), dense)
    out = export_pruned(model, tokenizer, masks, tmp_path / "out", report=manual_report(0.4), heads=heads)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert reloaded.config.num_key_value_heads == 1
    assert (logits(reloaded) - expected).abs().max().item() <= 1e-4


class Killed(Exception):
    pass


def test_prune_killed_during_reconstruction_resumes_to_the_same_export(saved_model, text_file, tmp_path,
                                                                       monkeypatch):
    def args(output):
        return ["prune", "--model", str(saved_model), "--criterion", "wanda-sp", "--mlp-ratio", "0.4", "--calib",
                str(text_file), "--calib-samples", "6", "--calib-seq-len", "24", "--reconstruct", "sequential",
                "--ppl-data", "none", "--output", str(output)]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(args(straight)) == 0
    solve, solved = reconstruction._LinearRefit.solve, []

    def solve_then_die(self, *args):
        solved.append(solve(self, *args))
        if len(solved) == 1:  # layer 0 refitted, layer 1 not yet
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(reconstruction._LinearRefit, "solve", solve_then_die)
        with pytest.raises(Killed):
            main(args(killed))
    assert not (killed / "pruning.json").exists()
    assert main([*args(killed), "--resume"]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name
    record = json.loads((killed / "pruning.json").read_text())["reconstruction"]
    assert record["mode"] == "sequential" and [row["layer"] for row in record["layers"]] == [0, 1]


def test_default_drift_is_a_quarter_or_zero_where_the_mlp_output_is_normalised():
    drifts = {}
    for arch in ("llama", "gemma3_text"):
        model = tiny_model(arch)
        drifts[arch] = reconstruct(model, random_masks(model), CALIBRATION, ReconstructConfig("sequential"))["drift"]
    assert drifts == {"llama": reconstruction.DEFAULT_DRIFT, "gemma3_text": 0.0} and reconstruction.DEFAULT_DRIFT > 0


def test_fsdp_with_reconstruction_is_refused_before_any_work(saved_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sdmprune.recipes.prune.load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["prune", "--model", str(saved_model), "--fsdp", "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --fsdp cannot run --reconstruct sequential (not yet) nor --importance auto (its weight-space "
        "candidate): add --reconstruct none --importance activation-wanda, or run without --fsdp")
    assert main(["prune", "--model", str(saved_model), "--fsdp", "--reconstruct", "none", "--output",
                 str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --fsdp cannot run --importance auto (its weight-space candidate): add --importance activation-wanda, "
        "or run without --fsdp")
