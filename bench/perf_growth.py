"""How the cost of an SDMPrune run (default preset, 20%, bf16 autocast) grows with calibration tokens and
with model size.

    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/perf_growth.py

- tokens: the bundled SmolLM2-135M with 4, 8, 16 and 32 C4 windows of 256 tokens;
- parameters: randomly initialised Llama-shaped models of about 30M, 100M, 300M and 1B parameters (tied
  embeddings, vocabulary 32,000), each with the same 4 random windows of 128 tokens;
- real: the real models SmolLM2-135M, Qwen2.5-Coder-0.5B and -1.5B (the last two after `setup.sh --models`),
  each with 4 C4 windows of 128 tokens, to set beside the random-weight curve.
`--series real` runs one series and keeps the others already in the results file.

Each run is its own process; wall time and peak resident memory above the loaded model are recorded, and
a least-squares slope of log(cost) against log(size) is fitted per series (1 = linear). Writes
results/perf_growth.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from perf_common import RESULTS, PeakMemory, footer, log_slope, machine, pyplot, run_worker, write_results

TOKEN_WINDOWS, TOKEN_SEQ_LEN = (4, 8, 16, 32), 256
SIZES = {  # name -> (hidden, intermediate, layers, heads, kv heads)
    "~30M": (384, 1024, 12, 6, 2),
    "~100M": (768, 2048, 12, 12, 4),
    "~300M": (1024, 2816, 24, 16, 4),
    "~1B": (2048, 5632, 21, 32, 8),
}
SIZE_WINDOWS, SIZE_SEQ_LEN, VOCAB = 4, 128, 32000
REAL_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", default="tokens,parameters,real", help="which series to run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "tokens:<windows>", "parameters:<size>", "real:<model>"
    return parser.parse_args(argv)


def random_llama(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv_heads = SIZES[size]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=VOCAB,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def worker(spec: str) -> dict:
    """One SDMPrune run; returns its wall time, peak memory above the loaded model, parameters and tokens."""
    from sdmprune import load_model
    from sdmprune.data.calibration import load_calibration
    from sdmprune.pruning import prune

    torch.manual_seed(0)
    series, value = spec.split(":")
    if series == "tokens":
        model, tokenizer = load_model("smollm2-135m")
        ids, _ = load_calibration("c4", tokenizer, n_samples=int(value), seq_len=TOKEN_SEQ_LEN, seed=0)
    elif series == "real":
        model, tokenizer = load_model(value)
        ids, _ = load_calibration("c4", tokenizer, n_samples=SIZE_WINDOWS, seq_len=SIZE_SEQ_LEN, seed=0)
    else:
        model = random_llama(value)
        ids = torch.randint(VOCAB, (SIZE_WINDOWS, SIZE_SEQ_LEN), generator=torch.Generator().manual_seed(0))
    memory = PeakMemory()
    loaded = memory.current_mib()
    memory.reset()
    start = time.perf_counter()
    prune(model, ratio=0.2, bf16=True, calibration=ids)
    return {"seconds": time.perf_counter() - start, "above_model_mib": max(memory.peak_mib() - loaded, 1.0),
            "peak_mib": memory.peak_mib(), "params": sum(p.numel() for p in model.parameters()),
            "tokens": ids.numel()}


def markdown(results: dict) -> str:
    lines = ["# Growth of an SDMPrune run's cost (default preset, 20%, bf16 autocast)", ""]
    for series, rows in results["series"].items():
        x = "tokens" if series == "tokens" else "params"
        fit = results["slopes"][series]
        title = {"tokens": "calibration tokens (SmolLM2-135M)",
                 "parameters": f"model parameters (random Llama-shaped, {SIZE_WINDOWS * SIZE_SEQ_LEN} tokens)",
                 "real": f"model parameters (real models, {SIZE_WINDOWS * SIZE_SEQ_LEN} C4 tokens)"}[series]
        lines += [f"## Against {title}",
                  "", f"Fitted log-log slope: time {fit['seconds']:.2f}, peak memory above the model "
                  f"{fit['above_model_mib']:.2f} (1 = linear).", "",
                  f"| run | {x} | wall (s) | {x}/s | peak RSS (MiB) | above model (MiB) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, row in rows.items():
            lines.append(f"| {name} | {row[x]:,} | {row['seconds']:.1f} | {row[x] / row['seconds']:,.0f} | "
                         f"{row['peak_mib']:.0f} | {row['above_model_mib']:.0f} |")
        lines.append("")
    lines += footer(results)
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    series = results["series"]
    fig, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], series.items(), strict=True):
        x_key = "tokens" if name == "tokens" else "params"
        x = [row[x_key] for row in rows.values()]
        for key, color in (("seconds", "tab:blue"), ("above_model_mib", "tab:green")):
            y = [row[key] for row in rows.values()]
            ax.loglog(x, y, "o-", color=color, label=f"{key} (slope {results['slopes'][name][key]:.2f})")
        ax.loglog([x[0], x[-1]], [rows[next(iter(rows))]["seconds"], rows[next(iter(rows))]["seconds"] * x[-1] / x[0]],
                  ":", color="gray", label="linear from the first point")
        ax.set_xlabel(x_key)
        ax.set_title(f"cost against {x_key}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return
    if not os.environ.get("SDMPRUNE_DATA_DIR"):
        raise SystemExit("set SDMPRUNE_DATA_DIR to the shared data directory (e.g. ../shared/data)")
    plan = {"tokens": {f"{n}×{TOKEN_SEQ_LEN}": f"tokens:{n}" for n in TOKEN_WINDOWS},
            "parameters": {name: f"parameters:{name}" for name in SIZES},
            "real": {name: f"real:{name}" for name in REAL_MODELS}}
    previous = RESULTS / "perf_growth.json"
    series = json.loads(previous.read_text())["series"] if previous.exists() else {}
    for name in args.series.split(","):
        series[name] = {}
        for label, spec in plan[name].items():
            series[name][label] = run_worker(Path(__file__), ["--worker", spec])
            print(f"{name} {label}: {series[name][label]['seconds']:.1f} s", flush=True)
    slopes = {
        name: {key: log_slope([r["tokens" if name == "tokens" else "params"] for r in rows.values()],
                              [r[key] for r in rows.values()]) for key in ("seconds", "above_model_mib")}
        for name, rows in series.items()
    }
    command = ("SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/perf_growth.py "
               + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    earlier = json.loads(previous.read_text())["command"].splitlines() if previous.exists() else []
    kept = set(series) - set(args.series.split(","))  # series of earlier commands still in the file
    results = {"machine": machine(), "series": series, "slopes": slopes,
               "command": "\n".join(dict.fromkeys([*(earlier if kept else []), command]))}
    write_results("perf_growth", results, markdown(results))
    plot(results, RESULTS / "perf_growth.png")


if __name__ == "__main__":
    main()
