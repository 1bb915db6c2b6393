"""Cost of a whole pruning run on a real model, as a user runs it: `sdmprune prune` in its own process, in
fp32 (the CPU default) and under bf16 autocast.

    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/perf_scale.py                       # 1.5B, both
    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/perf_scale.py --precisions fp32

Each run is the default recipe with one importance, the preset's (`--importance activation-wanda`: its cold start
and distillation pass, uniform widths, the sequential refit with the held-out damping, the export to safetensors;
prune's default since 2026-12-07, `--importance auto`, runs the scoring and the refit once for each of two
importances) on --calib-samples C4 windows of 256 tokens (32 = 8,192 tokens, as bench/quality.py, by default),
with the perplexity evaluation off so that the figure is the pruning alone. Recorded: wall time of the whole
process (load, calibration, the stages, the export), each stage's seconds from the run's pruning.json, and the
process's peak resident memory (the model is memory-mapped from the cache, so its weights count once they are
read). Runs are merged into results/perf_scale.{json,md,png} by model and precision; the export goes to a
temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from perf_common import RESULTS, footer, machine, pyplot, write_results

PRECISIONS = {"bf16": "--bf16", "fp32": "--no-bf16"}
STAGE_LABELS = {"cold-start": "cold start", "prune": "distillation pass", "refit": "refit",
                "other": "load, calibration, export"}
NAME = "perf_scale"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b", help="model alias or path, as `sdmprune prune`")
    parser.add_argument("--ratio", type=float, default=0.2, help="fraction of total parameters removed")
    parser.add_argument("--calib-samples", type=int, default=32, help="C4 calibration windows of 256 tokens")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the temporary export is written (default: the system's temporary directory)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def run_prune(args: argparse.Namespace, precision: str) -> dict:
    """One `sdmprune prune` process: wall seconds, peak RSS (MiB), the stages' seconds and the achieved ratio."""
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="perf_scale-") as tmp:
        output = Path(tmp) / "pruned"
        command = [sys.executable, "-m", "sdmprune.cli", "prune", "--model", args.model, "--ratio", str(args.ratio),
                   "--importance", "activation-wanda", "--calib-samples", str(args.calib_samples), "--ppl-data",
                   "none", PRECISIONS[precision], "--output", str(output)]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"sdmprune prune failed ({precision}):\n{log[-3000:]}")
        report = json.loads((output / "pruning.json").read_text())
    stages = {step["stage"]: step["seconds"] for step in report["steps"]}
    stages["refit"] = report["reconstruction"]["seconds"]
    return {"model": args.model, "precision": precision, "seconds": seconds,
            "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux reports KiB
            "stages": stages, "other_seconds": seconds - sum(stages.values()),
            "tokens": report["calibration"]["tokens"], "ratio": args.ratio,
            "achieved": report["achieved"], "bf16_autocast": report["versions"]["bf16_autocast"],
            "command": " ".join(["sdmprune", *command[3:-1], "DIR"])}


def markdown(results: dict) -> str:
    lines = ["# Cost of a whole pruning run (`sdmprune prune`, the preset, perplexity off)", "",
             "One process per run; wall time covers loading the cached model, calibration, the stages and the "
             "export; *other* = wall − the stages (load, calibration, export). Peak RSS is the process's "
             "high-water mark (the cached weights are memory-mapped and count once read).", "",
             "| model | precision | calibration tokens | wall (min) | cold start (s) | distillation pass (s) | "
             "refit (s) | other (s) | peak RSS (GiB) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in results["runs"].values():
        stages = run["stages"]
        lines.append(f"| {run['model']} | {run['precision']} | {run['tokens']:,} | {run['seconds'] / 60:.1f} | "
                     f"{stages.get('cold-start', 0):.0f} | {stages.get('prune', 0):.0f} | "
                     f"{stages['refit']:.0f} | {run['other_seconds']:.0f} | {run['peak_rss_mib'] / 1024:.1f} |")
    commands = [f"- `{run['command']}`" for run in results["runs"].values()]
    lines += ["", "Runs (`DIR` a temporary directory):", "", *commands, "", *footer(results)]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    runs = list(results["runs"].values())
    names = sorted({stage for run in runs for stage in run["stages"]} - {"refit"}) + ["refit", "other"]
    fig, ax = plt.subplots(figsize=(7, 1.8 + 0.6 * len(runs)))
    for row, run in enumerate(runs):
        left = 0.0
        for index, name in enumerate(names):
            width = run["other_seconds"] if name == "other" else run["stages"].get(name, 0.0)
            label = STAGE_LABELS.get(name, name) if row == 0 else None
            ax.barh(row, width / 60, left=left, color=f"C{index}", label=label)
            left += width / 60
    ax.set_yticks(range(len(runs)), [f"{run['model']} {run['precision']}" for run in runs])
    ax.set_xlabel("minutes")
    ax.set_title("whole pruning run, by stage")
    ax.legend(fontsize=8, ncol=len(names), loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not os.environ.get("SDMPRUNE_DATA_DIR"):
        raise SystemExit("set SDMPRUNE_DATA_DIR to the shared data directory (e.g. ../shared/data)")
    previous = RESULTS / f"{NAME}.json"
    results = json.loads(previous.read_text()) if previous.exists() else {"runs": {}, "command": ""}
    for precision in args.precisions:
        run = run_prune(args, precision)
        results["runs"][f"{args.model}|{precision}"] = run
        print(f"{args.model} {precision}: {run['seconds'] / 60:.1f} min, peak {run['peak_rss_mib'] / 1024:.1f} GiB",
              flush=True)
        command = " ".join(["SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/perf_scale.py", *args.argv])
        results["command"] = "\n".join(dict.fromkeys([*results["command"].splitlines(), command.strip()]))
        results["machine"] = machine()
        write_results(NAME, results, markdown(results))
        plot(results, RESULTS / f"{NAME}.png")


if __name__ == "__main__":
    main()
