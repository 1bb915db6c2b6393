"""Inference speed of exported models against the dense SmolLM2-135M, next to the ideal speed-up.

    .venv/bin/python bench/perf_inference.py

Exports (made once under --work-dir; speed depends on shapes only, so the data-free `magnitude` criterion
makes them): 20/30/40% uniform, and a non-uniform 20% (`--allocation layer-range`: the first L/8 and last
L/16 layers stay dense) saved twice, per-layer (loaded by `sdmprune.load_pruned`) and zero-padded to the
widest layer (plain `from_pretrained`), to show what padding costs.

For each model and weight dtype (fp32, bf16), in its own process: prefill tokens/s at batch 1 × 512 and
8 × 128 tokens, greedy decode tokens/s (128 new tokens after a 32-token prompt, KV cache on), peak resident
memory. Speed-ups are to the dense model of the same dtype; the ideal speed-up is the ratio of forward
FLOPs (decode: of one new token at the mean cache length), and "of ideal" is achieved / ideal. Median of
--repeats timed calls after one warm-up. Writes results/perf_inference.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from perf_common import (
    RESULTS,
    PeakMemory,
    device,
    footer,
    forward_flops,
    machine,
    matmul_peak,
    pyplot,
    run_worker,
    synchronize,
    write_results,
)

EXPORTS = {  # name -> (ratio, allocation, padded)
    "pruned-20": (0.2, "uniform", False),
    "pruned-30": (0.3, "uniform", False),
    "pruned-40": (0.4, "uniform", False),
    "layer-range-20": (0.2, "layer-range", False),
    "layer-range-20-padded": (0.2, "layer-range", True),
}
IDEAL_OF = {"layer-range-20-padded": "layer-range-20"}  # padding computes zeros: its ideal is the unpadded model's
PREFILL = {"prefill 1×512": (1, 512), "prefill 8×128": (8, 128)}
PROMPT, NEW_TOKENS = 32, 128
TARGET = 0.9  # of the ideal prefill speed-up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/perf-exports"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(["dense", *EXPORTS]), help="comma-separated subset (dense first)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="weight dtypes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # model spec
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_exports(args: argparse.Namespace) -> dict[str, str]:
    """Model specs by name: the dense alias and each export, created if missing."""
    from sdmprune import export_pruned, load_model
    from sdmprune.pruning import prune

    specs = {"dense": args.model}
    for name, (ratio, allocation, padded) in EXPORTS.items():
        if name not in args.models.split(","):
            continue
        directory = args.work_dir / name
        specs[name] = str(directory)
        if not (directory / "pruning.json").is_file():
            model, tokenizer = load_model(args.model)
            result = prune(model, criterion="magnitude", ratio=ratio, allocation=allocation)
            export_pruned(model, tokenizer, result.masks, directory, report=result.report, overwrite=True,
                          padded=padded)
    return specs


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> dict:
    from sdmprune import load_model

    torch.manual_seed(0)
    model, _ = load_model(args.worker, dtype=args.dtype)
    vocab = model.config.vocab_size
    memory = PeakMemory()
    loaded = memory.current_mib()
    memory.reset()
    record: dict = {"loaded_mib": loaded, "params": sum(p.numel() for p in model.parameters())}
    with torch.inference_mode():
        for name, (batch, length) in PREFILL.items():
            ids = torch.randint(vocab, (batch, length), device=device())
            seconds = timed(lambda ids=ids: model(input_ids=ids, use_cache=False), args.repeats)
            record[name] = {"seconds": seconds, "tokens_per_s": batch * length / seconds,
                            "flops": forward_flops(model, batch, length)}
        prompt = torch.randint(vocab, (1, PROMPT), device=device())

        def generate(new_tokens: int):
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)

        total = timed(lambda: generate(NEW_TOKENS), args.repeats)
        first = timed(lambda: generate(1), args.repeats)  # the prompt's prefill and the first token
        mean_cache = PROMPT + NEW_TOKENS / 2
        record["decode"] = {"seconds": total - first, "tokens_per_s": (NEW_TOKENS - 1) / (total - first),
                            "flops": forward_flops(model, 1, 1, past=int(mean_cache))}
    record["peak_mib"] = memory.peak_mib()
    return record


def summarise(raw: dict, names: list[str]) -> dict:
    """Per dtype and model: tokens/s, speed-up over dense, ideal speed-up (FLOP ratio), fraction of ideal."""
    summary = {}
    for dtype, rows in raw.items():
        dense = rows["dense"]
        summary[dtype] = {}
        for name in names:
            ideal_row = rows[IDEAL_OF.get(name, name)]
            cells = {}
            for phase in [*PREFILL, "decode"]:
                speedup = rows[name][phase]["tokens_per_s"] / dense[phase]["tokens_per_s"]
                ideal = dense[phase]["flops"] / ideal_row[phase]["flops"]
                cells[phase] = {"tokens_per_s": rows[name][phase]["tokens_per_s"], "speedup": speedup,
                                "ideal": ideal, "speed_of_ideal": speedup / ideal,
                                "gflops_per_s": rows[name][phase]["flops"] / rows[name][phase]["seconds"] / 1e9}
            summary[dtype][name] = {"phases": cells, "peak_mib": rows[name]["peak_mib"], "params": rows[name]["params"]}
    return summary


def markdown(results: dict) -> str:
    lines = [
        "# Inference speed of the exports (SmolLM2-135M)",
        "",
        f"Each cell: tokens/s, speed-up over dense (same dtype) / ideal speed-up (forward-FLOP ratio), and the "
        f"achieved speed-up as a fraction of the ideal. Prefill target: ≥ {TARGET} of ideal. Decode: "
        f"{NEW_TOKENS} greedy tokens after a {PROMPT}-token prompt, KV cache on, batch 1. Median of "
        f"{results['settings']['repeats']} calls after a warm-up. The padded export's ideal is that of the "
        "same model unpadded (it multiplies zeros).",
        "",
    ]
    for dtype, rows in results["summary"].items():
        peak = results["matmul_flops"][dtype]
        lines += [f"## {dtype} weights (matmul ceiling in this run: {peak / 1e9:.0f} GFLOP/s)", "",
                  "| model | params | " + " | ".join(f"{p}" for p in [*PREFILL, "decode"])
                  + " | prefill 1×512 GFLOP/s (of ceiling) | peak RSS (MiB) |",
                  "|---|---:|" + "---:|" * (len(PREFILL) + 3)]
        for name, row in rows.items():
            cells = []
            for cell in row["phases"].values():
                cells.append(f"{cell['tokens_per_s']:.0f} tok/s, {cell['speedup']:.2f}× / {cell['ideal']:.2f}× "
                             f"({cell['speed_of_ideal']:.2f})")
            gflops = row["phases"]["prefill 1×512"]["gflops_per_s"]
            lines.append(f"| {name} | {row['params'] / 1e6:.1f}M | {' | '.join(cells)} | "
                         f"{gflops:.0f} ({gflops * 1e9 / peak:.2f}) | {row['peak_mib']:.0f} |")
        lines.append("")
    lines += footer(results)
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    phases = [*PREFILL, "decode"]
    fig, axes = plt.subplots(1, len(results["summary"]), figsize=(12, 4), squeeze=False)
    for ax, (dtype, rows) in zip(axes[0], results["summary"].items(), strict=True):
        names = list(rows)
        width = 0.8 / (len(phases) + 1)
        for k, phase in enumerate(phases):
            ax.bar([i + k * width for i in range(len(names))], [rows[n]["phases"][phase]["speedup"] for n in names],
                   width, label=phase)
        ax.scatter([i + width for i in range(len(names))], [rows[n]["phases"]["prefill 1×512"]["ideal"] for n in names],
                   marker="_", s=400, color="black", label="ideal (FLOP ratio)", zorder=3)
        ax.set_xticks([i + width for i in range(len(names))], names, rotation=30, ha="right")
        ax.set_ylabel("speed-up over dense")
        ax.set_title(f"{dtype} weights")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    specs = {name: spec for name, spec in make_exports(args).items() if name in args.models.split(",")}
    raw = {}
    for dtype in args.dtypes.split(","):
        raw[dtype] = {}
        for name, spec in specs.items():
            raw[dtype][name] = run_worker(Path(__file__), ["--worker", spec, "--dtype", dtype,
                                                           "--repeats", str(args.repeats)])
            print(f"{dtype} {name}: " + ", ".join(f"{p} {raw[dtype][name][p]['tokens_per_s']:.0f} tok/s"
                                                  for p in [*PREFILL, "decode"]), flush=True)
    results = {
        "machine": machine(),
        "matmul_flops": {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)},
        "settings": {"model": args.model, "repeats": args.repeats, "exports": EXPORTS, "dtypes": args.dtypes},
        "command": ".venv/bin/python bench/perf_inference.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "raw": raw,
        "summary": summarise(raw, list(specs)),
    }
    write_results("perf_inference", results, markdown(results))
    plot(results, RESULTS / "perf_inference.png")


if __name__ == "__main__":
    main()
