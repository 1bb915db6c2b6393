"""Cost of a pruning run on the bundled SmolLM2-135M at 20%, against one plain training pass.

    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/perf_cost.py

Every run below sees the same calibration windows (C4, seed 0) under bf16 autocast, micro-batches of 1
window, in its own process (so its peak resident memory is its own), repeated `--rounds` times in
interleaved order (absolute times drift on a shared machine; ratios taken in the same round do not):

- `plain`: one forward+backward training pass of the dense model over the windows (cross-entropy, every
  weight requires grad, no optimizer step): the yardstick;
- `taylor`: LLM-Pruner's criterion (one cross-entropy pass, MLP weight gradients);
- `sdmprune`: the default preset (cold start + one distillation pass, masks-off teacher, activation gradients);
- `sdmprune-weight`: the paper's weight-space importance, masks-off teacher;
- `sdmprune-copy`: the default preset with a second full model as the teacher (the official design).

Reported per run: wall time, tokens/s, peak resident memory (whole process, and above the loaded model),
each as a ratio to `plain`, and the achieved FLOP/s of each pass as a fraction of this machine's bf16
matmul throughput, measured in the same run. Writes results/perf_cost.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from perf_common import (
    PeakMemory,
    footer,
    forward_flops,
    linear_weights,
    machine,
    matmul_peak,
    pyplot,
    run_worker,
    write_results,
)

RUNS = {
    "plain": None,
    "taylor": {"criterion": "taylor"},
    "sdmprune": {"criterion": "sdmprune"},
    "sdmprune-weight": {"criterion": "sdmprune", "importance": "weight"},
    "sdmprune-copy": {"criterion": "sdmprune", "teacher": "copy"},
}
TARGETS = {"time": 1.4, "memory": 1.2}  # the single-copy distillation pass against the plain pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every run")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def pass_flops(model, windows: int, seq_len: int, kind: str) -> float:
    """FLOPs of one pass over the windows. Backward = activation gradients (≈ one forward) plus, for the
    weights that require grad, 2 FLOPs per weight per token."""
    forward = forward_flops(model, windows, seq_len)
    mlp = sum(p.numel() for name, p in model.named_parameters() if ".mlp." in name)
    tokens = windows * seq_len
    return {
        "plain": 2 * forward + 2 * linear_weights(model) * tokens,
        "ce-weight-grads": 2 * forward + 2 * mlp * tokens,  # taylor, and sdmprune-weight's cold start
        "ce-activation-grads": 2 * forward,
        "kd-weight-grads": 3 * forward + 2 * mlp * tokens,  # + the teacher's forward
        "kd-activation-grads": 3 * forward,
    }[kind]


def warm_up(model, ids: torch.Tensor) -> None:
    """One short forward+backward (activation gradients only: no weight-gradient memory is left behind), so
    no run pays the first call's kernel set-up inside its timing."""
    from sdmprune.runtime import autocast_context

    device = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    embeddings = model.get_input_embeddings()(ids.to(device)).detach().requires_grad_(True)
    with autocast_context(device, True):
        loss = model(inputs_embeds=embeddings, use_cache=False).logits.float().logsumexp(-1).mean()
    torch.autograd.grad(loss, embeddings)
    for param, flag in zip(model.parameters(), flags, strict=True):
        param.requires_grad_(flag)


def worker(args: argparse.Namespace) -> dict:
    """One run in this process: load, take the calibration windows, reset the peak, run, report."""
    from sdmprune import load_model
    from sdmprune.data.calibration import load_calibration
    from sdmprune.losses import next_token_ce
    from sdmprune.pruning import prune
    from sdmprune.runtime import autocast_context

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    ids, _ = load_calibration("c4", tokenizer, n_samples=args.windows, seq_len=args.seq_len, seed=0)
    warm_up(model, ids[:1, :32])
    memory = PeakMemory()
    loaded = memory.current_mib()
    memory.reset()
    record: dict = {"loaded_mib": loaded}
    start = time.perf_counter()
    if args.worker == "plain":
        device = next(model.parameters()).device
        for window in ids.split(1):
            window = window.to(device)
            with autocast_context(device, True):
                logits = model(input_ids=window, use_cache=False).logits
            next_token_ce(logits, window).backward()
        record["passes"] = {"plain": time.perf_counter() - start}
        record["flops"] = {"plain": pass_flops(model, args.windows, args.seq_len, "plain")}
    else:
        report = prune(model, ratio=args.ratio, bf16=True, calibration=ids, **RUNS[args.worker]).report
        settings = RUNS[args.worker]
        grads = ("weight" if settings["criterion"] == "taylor" or settings.get("importance") == "weight"
                 else "activation")
        names = [f"{s['stage']}" for s in report["steps"]]
        record["passes"] = {name: s["seconds"] for name, s in zip(names, report["steps"], strict=True)}
        record["flops"] = {name: pass_flops(model, args.windows, args.seq_len,
                                            f"{'kd' if s['alpha'] > 0 else 'ce'}-{grads}-grads")
                           for name, s in zip(names, report["steps"], strict=True)}
    record["seconds"] = time.perf_counter() - start
    record["peak_mib"] = memory.peak_mib()
    record["tokens"] = args.windows * args.seq_len
    return record


def summarise(rounds: list[dict], names: list[str]) -> dict:
    """Per run: the median over rounds of each figure, and of its ratio to `plain` in the same round."""
    summary = {}
    for name in names:
        rows = [r[name] for r in rounds]
        plain = [r["plain"] for r in rounds]
        distill = [row["passes"].get("prune", row["seconds"]) for row in rows]
        summary[name] = {
            "seconds": statistics.median(r["seconds"] for r in rows),
            "tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in rows),
            "peak_mib": statistics.median(r["peak_mib"] for r in rows),
            "above_model_mib": statistics.median(r["peak_mib"] - r["loaded_mib"] for r in rows),
            "run_time_ratio": statistics.median(r["seconds"] / p["seconds"] for r, p in zip(rows, plain, strict=True)),
            "last_pass_time_ratio": statistics.median(d / p["seconds"] for d, p in zip(distill, plain, strict=True)),
            "peak_ratio": statistics.median(r["peak_mib"] / p["peak_mib"] for r, p in zip(rows, plain, strict=True)),
            "above_model_ratio": statistics.median((r["peak_mib"] - r["loaded_mib"]) / (p["peak_mib"] - p["loaded_mib"])
                                                   for r, p in zip(rows, plain, strict=True)),
            "passes": {k: statistics.median(r["passes"][k] for r in rows) for k in rows[0]["passes"]},
            "flops": rows[0]["flops"],
        }
    return summary


def markdown(results: dict) -> str:
    s, peak = results["summary"], results["matmul_flops"]["bfloat16"]
    settings = results["settings"]
    lines = [
        f"# Cost of a {settings['ratio']:.0%} pruning run (SmolLM2-135M, bf16 autocast)",
        "",
        f"{settings['windows']} C4 windows × {settings['seq_len']} tokens = "
        f"{settings['windows'] * settings['seq_len']:,} tokens per run; median of {settings['rounds']} interleaved "
        "rounds, each run in its own process. "
        "Ratios are to `plain` (one forward+backward training pass of the dense model over the same tokens) "
        "in the same round. `last pass` is the distillation pass for sdmprune (its cold-start pass comes "
        "before it) and the whole scoring pass otherwise.",
        "",
        "| run | wall (s) | tokens/s | run time / plain | last pass / plain | peak RSS (MiB) | peak / plain "
        "| above model (MiB) | above model / plain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in s.items():
        lines.append(f"| {name} | {row['seconds']:.1f} | {row['tokens_per_s']:.0f} | {row['run_time_ratio']:.2f} | "
                     f"{row['last_pass_time_ratio']:.2f} | {row['peak_mib']:.0f} | {row['peak_ratio']:.2f} | "
                     f"{row['above_model_mib']:.0f} | {row['above_model_ratio']:.2f} |")
    target = s.get("sdmprune")
    if target:
        met_time = target["last_pass_time_ratio"] <= TARGETS["time"]
        met_memory = target["peak_ratio"] <= TARGETS["memory"]
        lines += ["", f"Targets for the single-copy distillation pass: time ≤ {TARGETS['time']}× plain → "
                  f"{target['last_pass_time_ratio']:.2f}× ({'met' if met_time else 'missed'}); peak memory ≤ "
                  f"{TARGETS['memory']}× plain → {target['peak_ratio']:.2f}× ({'met' if met_memory else 'missed'})."]
    lines += [
        "",
        f"## Achieved FLOP/s per pass (bf16 matmul ceiling measured in this run: {peak / 1e9:.0f} GFLOP/s; "
        f"fp32: {results['matmul_flops']['float32'] / 1e9:.0f} GFLOP/s)",
        "",
        "FLOPs counted analytically: forward = 2 × linear weights × tokens + causal attention; backward = one "
        "forward's worth for activation gradients + 2 × (weights requiring grad) × tokens; the teacher adds a forward.",
        "",
        "| run | pass | seconds | GFLOP | GFLOP/s | fraction of bf16 matmul ceiling |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, row in s.items():
        for stage, seconds in row["passes"].items():
            flops = row["flops"][stage]
            lines.append(f"| {name} | {stage} | {seconds:.1f} | {flops / 1e9:.0f} | {flops / seconds / 1e9:.0f} | "
                         f"{flops / seconds / peak:.2f} |")
    lines += ["", *footer(results)]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    s = results["summary"]
    names = list(s)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].bar(names, [s[n]["last_pass_time_ratio"] for n in names], color="tab:blue")
    axes[0].axhline(TARGETS["time"], color="tab:red", linestyle="--", label=f"target {TARGETS['time']}×")
    axes[0].set_ylabel("last pass time / plain pass")
    axes[1].bar(names, [s[n]["peak_ratio"] for n in names], color="tab:green")
    axes[1].axhline(TARGETS["memory"], color="tab:red", linestyle="--", label=f"target {TARGETS['memory']}×")
    axes[1].set_ylabel("peak RSS / plain pass")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
    fig.suptitle("Pruning cost relative to one plain forward+backward pass (SmolLM2-135M, bf16 autocast)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if not os.environ.get("SDMPRUNE_DATA_DIR"):
        raise SystemExit("set SDMPRUNE_DATA_DIR to the shared data directory (e.g. ../shared/data)")
    names = args.runs.split(",")
    if "plain" not in names:
        names.insert(0, "plain")
    common = ["--model", args.model, "--windows", str(args.windows), "--seq-len", str(args.seq_len),
              "--ratio", str(args.ratio)]
    rounds = []
    for index in range(args.rounds):
        order = names if index % 2 == 0 else names[::-1]
        rounds.append({name: run_worker(Path(__file__), [*common, "--worker", name]) for name in order})
        print(f"round {index + 1}: " + ", ".join(f"{n} {rounds[-1][n]['seconds']:.1f} s" for n in names), flush=True)
    results = {
        "machine": machine(),
        "matmul_flops": {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)},
        "settings": {**vars(args), "worker": None},
        "command": "SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/perf_cost.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
        "rounds": rounds,
        "summary": summarise(rounds, names),
    }
    write_results("perf_cost", results, markdown(results))
    plot(results, Path(__file__).parent / "results" / "perf_cost.png")


if __name__ == "__main__":
    main()
