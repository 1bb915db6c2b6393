"""Reconstruction check on SmolLM2-135M: WikiText-2 perplexity of structured-Wanda masks with no refit, the one-shot
refit and the sequential refit (its target over β = `--drift`), with and without token normalisation, a damping
sweep and the intercept on/off, and token weights from the self-distillation gradient (`kd`: each token's error
weighted by ‖∂KL/∂h_l‖², the squared norm of the gradient of KL(dense ‖ masked model) with respect to the hidden
state after the layer, from one backward pass of the plain masked model); seconds and peak memory of the
reconstruction stage.

    .venv/bin/python bench/reconstruct_check.py [--data-dir ../shared/data] [--threads 2]

Calibration: 32 C4 windows × 256 tokens (seed 0). Selection: structured Wanda (`mean_rows |W_down[:, i]| · ‖X_i‖₂`
on the dense model) with uniform widths for a ratio of total parameters, as `prune(criterion="wanda-sp")` does,
computed here so that this check does not depend on the pipeline. Evaluation: WikiText-2 test, first 8,192 tokens,
512-token windows, fp32 on the CPU. The model's weights never change (the refit lives in the masks), so one model
serves every configuration. Results go to bench/results/reconstruct_check.{json,md}, rewritten after every
configuration; a rerun skips configurations already there (delete the JSON to start over).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import threading
import time
from pathlib import Path

import psutil
import torch

from sdmprune import load_model, perplexity
from sdmprune.data import load_calibration, load_text
from sdmprune.evaluation.perplexity import tokenize_windows
from sdmprune.masks import NeuronMasks, count_parameters
from sdmprune.reconstruct import DEFAULT_DRIFT, ReconstructConfig, RefitStatistics, reconstruct
from sdmprune.runtime import library_versions

RESULTS = Path(__file__).parent / "results"
RATIOS = (0.3, 0.4)
DAMPINGS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
DRIFTS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT = ReconstructConfig()


def run(ratio: float, mode: str = "none", *, drift: float | None = None, damping: float | None = DEFAULT.damping,
        intercept: bool = False, normalised: bool = DEFAULT.normalised, kd: bool = False) -> dict:
    """One configuration; `drift` (β) for sequential runs only; `kd`: distillation-gradient token weights (times
    1/ms(h) when `normalised`)."""
    if mode == "none":
        return dict(ratio=ratio, mode=mode, drift=None, damping=None, intercept=False, normalised=False)
    if mode == "sequential" and drift is None:
        drift = DEFAULT_DRIFT
    extra = {"kd": True} if kd else {}
    return dict(ratio=ratio, mode=mode, drift=drift, damping=damping, intercept=intercept, normalised=normalised,
                **extra)


def configurations() -> list[dict]:
    """Every configuration to measure, in table order, each once: at 30% the damping sweep (one-shot with and
    without token normalisation, sequential with the default β), no refit, β and the intercept without token
    normalisation at damping 1e-2 (measured first); then per ratio, at the default damping: one-shot and
    sequential without and with token normalisation (the latter over β), and the intercept."""
    first = RATIOS[0]
    runs = [run(first, mode, damping=damping, normalised=normalised) for mode, normalised in
            (("one-shot", False), ("one-shot", True), ("sequential", True)) for damping in DAMPINGS]
    runs.append(run(first))
    runs += [run(first, "sequential", drift=drift, damping=1e-2, normalised=False) for drift in DRIFTS]
    runs += [run(first, "one-shot", damping=1e-2, intercept=True, normalised=False)]
    runs += [run(first, "sequential", drift=drift, damping=1e-2, intercept=True, normalised=False)
             for drift in (0.5, 1.0)]
    for ratio in RATIOS:
        runs.append(run(ratio))
        runs += [run(ratio, "one-shot", normalised=False), run(ratio, "sequential", normalised=False)]
        runs.append(run(ratio, "one-shot"))
        drifts = DRIFTS if ratio == first else (0.0, 0.25, 0.5, 1.0)
        runs += [run(ratio, "sequential", drift=drift) for drift in drifts]
        runs += [run(ratio, "one-shot", intercept=True), run(ratio, "sequential", intercept=True)]
    runs += [run(first, mode, normalised=normalised, kd=True) for mode in ("one-shot", "sequential")
             for normalised in (False, True)]
    return [dict(item) for item in {key(item): item for item in runs}.values()]


def key(run: dict) -> str:
    return "|".join(str(run[name]) for name in ("ratio", "mode", "drift", "damping", "intercept", "normalised")) + (
        "|kd" if run.get("kd") else "")


def distillation_weights(model, masks: NeuronMasks, calibration: torch.Tensor, micro_batch: int) -> list[torch.Tensor]:
    """Per layer, (N·S,) fp64: ‖∂KL/∂h_l‖² per calibration token, h_l the masked model's hidden state after decoder
    layer l, KL(p_dense ‖ p_masked) per token (T = 1), summed over tokens; micro-batches in calibration order."""
    layers = model.model.layers
    norms: list[list[torch.Tensor]] = [[] for _ in layers]
    outputs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
               for layer in layers]
    handles.append(model.model.embed_tokens.register_forward_hook(lambda m, a, out: out.requires_grad_()))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        for batch in calibration.split(micro_batch):
            with torch.inference_mode(), masks.disabled():
                teacher = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
            outputs.clear()
            student = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
            for output in outputs:
                output.retain_grad()
            kl = (teacher.exp() * (teacher - student)).sum()
            kl.backward()
            for layer, output in enumerate(outputs):
                norms[layer].append(output.grad.flatten(0, -2).double().pow(2).sum(1))
            outputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(parts) for parts in norms]


class TokenWeights:
    """Multiplies the token weights of every `RefitStatistics.add` by the matching slice of per-layer weights: the
    reconstruction adds each layer's micro-batches in calibration order, one layer after the other (down_proj only)."""

    def __init__(self, weights: list[torch.Tensor]):
        self.weights, self.layer, self.offset = weights, 0, 0

    def __enter__(self) -> TokenWeights:
        self.original = RefitStatistics.add

        def add(stats, inputs, targets, weights=None):
            if self.offset == self.weights[self.layer].numel():
                self.layer, self.offset = self.layer + 1, 0
            extra = self.weights[self.layer][self.offset:self.offset + inputs.shape[0]]
            self.offset += inputs.shape[0]
            self.original(stats, inputs, targets, extra if weights is None else weights * extra)

        RefitStatistics.add = add
        return self

    def __exit__(self, *exc) -> None:
        RefitStatistics.add = self.original


def wanda_norms(model, calibration: torch.Tensor, micro_batch: int) -> list[torch.Tensor]:
    """‖X_i‖₂ over the calibration tokens of every neuron's output (down_proj input), dense model, fp32."""
    downs = [layer.mlp.down_proj for layer in model.model.layers]
    sums = [torch.zeros(down.in_features) for down in downs]

    def hook(layer: int):
        def record(module, args):
            sums[layer] += args[0].detach().flatten(0, -2).float().pow(2).sum(0)

        return record

    handles = [down.register_forward_pre_hook(hook(layer)) for layer, down in enumerate(downs)]
    with torch.inference_mode():
        for batch in calibration.split(micro_batch):
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return [s.sqrt() for s in sums]


def wanda_masks(model, norms: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Uniform widths removing `ratio` of the total parameters (rounded down), highest scores kept (ties: lower
    index), scores mean_rows |W_down[:, i]| · ‖X_i‖₂."""
    count = count_parameters(model)
    width = math.floor((sum(count.widths) - ratio * count.total / count.per_neuron[0]) / len(count.widths) + 1e-9)
    keep = []
    for layer, norm in zip(model.model.layers, norms, strict=True):
        scores = layer.mlp.down_proj.weight.detach().float().abs().mean(0) * norm
        mask = torch.zeros(scores.numel(), dtype=torch.bool)
        mask[torch.argsort(scores, descending=True, stable=True)[:width]] = True
        keep.append(mask)
    return keep


class PeakMemory:
    """Peak resident memory (bytes) of this process while the block runs, sampled every 10 ms, above its start
    (freed heap is first handed back to the system, so that the start counts live memory only)."""

    def __enter__(self) -> PeakMemory:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def above_start_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def weighting(run: dict) -> str:
    plain = "1/ms(h)" if run["normalised"] else "1"
    return ("‖g‖²" + (" × 1/ms(h)" if run["normalised"] else "")) if run.get("kd") else plain


def markdown(record: dict) -> str:
    lines = [
        "# Reconstruction check (SmolLM2-135M, structured Wanda masks)",
        "",
        f"Calibration: {record['calibration']['samples']} C4 windows × {record['calibration']['seq_len']} tokens "
        f"(seed {record['calibration']['seed']}), micro-batches of {record['micro_batch']}. WikiText-2 test, first "
        f"{record['eval_tokens']:,} tokens, 512-token windows, fp32 on the CPU ({record['machine']['threads']} "
        f"threads of a shared 2-core machine: seconds are noisy, up to 3× between quiet and busy periods). Dense PPL "
        f"{record['dense_ppl']:.2f}. Peak memory: resident memory above the stage's start (model excluded).",
        "",
        "| ratio | refit | β (drift) | damping | intercept | token weights | WikiText-2 PPL | seconds | peak MiB | "
        "mean layer error before → after | last hidden error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in record["runs"]:
        if run["mode"] == "none":
            lines.append(f"| {run['ratio']} | none |  |  |  |  | {run['ppl']:.1f} |  |  |  |  |")
            continue
        errors = f"{run['error_before']:.3f} → {run['error_after']:.3f}"
        hidden = f"{run['hidden_error']:.4f}" if "hidden_error" in run else ""
        lines.append(
            f"| {run['ratio']} | {run['mode']} | {'' if run['drift'] is None else run['drift']} | {run['damping']:g} | "
            f"{'yes' if run['intercept'] else 'no'} | {weighting(run)} | {run['ppl']:.1f} | "
            f"{run['seconds']:.0f} | {run['peak_mib']:.0f} | {errors} | {hidden} |"
        )
    lines += [
        "",
        "β (sequential): target T = (1 − β)·W u + β·(h_dense(l+1) − a_pruned(l)); β = 0 reproduces the dense layer on "
        "the pruned stream's inputs, β = 1 makes the pruned residual stream after the layer the dense one. Token "
        "weights 1/ms(h): each token's squared error weighted by 1 / mean(h²), h the dense hidden state after the "
        "layer (the scale the next RMSNorm divides out). Layer error: Σ w‖T − W u − b‖² / Σ w‖T‖² on the "
        "calibration tokens, averaged over layers; before = the plain masked layer. Last hidden error (sequential): "
        "mean over calibration tokens of ‖h_pruned − h_dense‖² / ‖h_dense‖² after the last layer. Token weights "
        "‖g‖²: the self-distillation gradient ‖∂KL(p_dense ‖ p_masked)/∂h_l‖² of each token at the hidden state "
        "after the layer, from one forward and backward pass of the plain masked model over the calibration windows "
        "(seconds: " + ", ".join(f"{r}: {s:.0f}" for r, s in record.get("kd_weight_seconds", {}).items()) + ").",
        "",
        *record.get("notes", []),
        "",
        f"Command: `{record['command']}`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("SDMPRUNE_DATA_DIR", "../shared/data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS), help="a subset of the ratios")
    parser.add_argument("--kd-only", action="store_true", help="only the distillation-weighted configurations")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "reconstruct_check.json"
    record = json.loads(path.read_text()) if path.exists() else {"runs": []}
    done = {key(run) for run in record["runs"]}
    order = {key(run): i for i, run in enumerate(configurations())}

    model, tokenizer = load_model("smollm2-135m", dtype="float32", device="cpu")
    calibration, summary = load_calibration("c4", tokenizer, n_samples=32, seq_len=256, seed=0,
                                            data_dir=args.data_dir)
    windows = tokenize_windows(tokenizer, load_text("wikitext2", args.data_dir), 512, 8192, model)
    record.update(
        command=f"OMP_NUM_THREADS={args.threads} .venv/bin/python bench/reconstruct_check.py --data-dir "
                f"{args.data_dir} --threads {args.threads} --micro-batch {args.micro_batch}",
        calibration=summary, eval_tokens=windows.numel(), micro_batch=args.micro_batch,
        machine={"platform": platform.platform(), "threads": args.threads, "cpus": os.cpu_count()},
        versions=library_versions(),
    )
    if "dense_ppl" not in record:
        record["dense_ppl"] = perplexity(model, tokenizer, windows, progress=False)["ppl"]
    norms = wanda_norms(model, calibration, args.micro_batch)
    for ratio in args.ratios:
        runs = [run for run in configurations() if run["ratio"] == ratio and key(run) not in done
                and (run.get("kd") or not args.kd_only)]
        if not runs:
            continue
        masks = NeuronMasks(model, wanda_masks(model, norms, ratio))
        kd_weights = None
        for run in runs:
            masks.weight = [None] * len(masks.keep)
            masks.bias = [None] * len(masks.keep)
            if run["mode"] != "none":
                config = ReconstructConfig(run["mode"], run["damping"], run["intercept"],
                                           DEFAULT_DRIFT if run["drift"] is None else run["drift"], run["normalised"])
                if run.get("kd") and kd_weights is None:
                    start = time.perf_counter()
                    kd_weights = distillation_weights(model, masks, calibration, args.micro_batch)
                    record.setdefault("kd_weight_seconds", {})[str(ratio)] = time.perf_counter() - start
                with PeakMemory() as memory, (TokenWeights(kd_weights) if run.get("kd") else contextlib.nullcontext()):
                    report = reconstruct(model, masks, calibration, config, micro_batch=args.micro_batch)
                rows = report["layers"]
                run.update(seconds=report["seconds"], peak_mib=memory.above_start_mib,
                           error_before=sum(r["error_before"] for r in rows) / len(rows),
                           error_after=sum(r["error_after"] for r in rows) / len(rows), layers=rows)
                if run["mode"] == "sequential":
                    run["hidden_error"] = rows[-1]["hidden_error"]
            run.update(width=masks.widths[0], ppl=perplexity(model, tokenizer, windows, progress=False)["ppl"])
            record["runs"].append(run)
            record["runs"].sort(key=lambda r: order.get(key(r), len(order)))
            path.write_text(json.dumps(record, indent=1))
            (RESULTS / "reconstruct_check.md").write_text(markdown(record))
            print(f"{key(run)}: PPL {run['ppl']:.2f}" + (f", {run['seconds']:.0f} s" if "seconds" in run else ""),
                  flush=True)
        masks.remove()


if __name__ == "__main__":
    main()
