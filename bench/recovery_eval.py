"""Recovery benchmark: zero-shot tasks and perplexity of the bundled SmolLM2-135M dense, pruned 20% with
SDMPrune, and pruned + LoRA-recovered.

One command, from the repository root (70 minutes on a 2-core CPU):

    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/recovery_eval.py

Stages, each an `sdmprune` CLI command run in-process (the exact commands go into the results):
1. evaluate the dense model under bf16 autocast, batches of 8: the 12 shipped tasks (first --limit items
   each) + WikiText-2 perplexity (windows of 512 tokens, first 16,384 tokens);
2. prune 20% of the parameters with `--criterion sdmprune --bf16 --calib-samples 32 --calib-seq-len 256`
   (or reuse the directory given with --pruned);
3. evaluate the pruned model the same way;
4. LoRA-recover it on alpaca_data_1k.json (1 epoch, bf16, max-len 256) and merge;
5. evaluate the merged model the same way.
Writes bench/results/recovery_eval.json and recovery_eval.md; the models go under --work-dir.
`--limit-pruned` evaluates the pruned and recovered models on fewer items; `--reuse-dense DIR` takes stage 1
from an earlier run's `eval-dense` directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from sdmprune.cli import main as sdmprune_main
from sdmprune.evaluation.tasks import ALL_TASKS, SDMPRUNE_TASKS

RESULTS = Path(__file__).parent / "results"
MODELS = ("dense", "pruned", "recovered")
LABELS = {"dense": "dense", "pruned": "pruned 20%", "recovered": "pruned 20% + LoRA"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="dense model spec")
    parser.add_argument("--ratio", type=float, default=0.2, help="fraction of total parameters removed")
    parser.add_argument("--pruned", type=Path, default=None, help="reuse this pruned directory (skips stage 2)")
    parser.add_argument("--limit", type=int, default=200, help="items per task")
    parser.add_argument("--limit-pruned", type=int, default=None,
                        help="items per task for the pruned and recovered models (default: --limit)")
    parser.add_argument("--reuse-dense", type=Path, default=None,
                        help="an earlier `evaluate dense` output directory of this script to reuse (skips stage 1)")
    parser.add_argument("--epochs", type=int, default=1, help="recovery epochs")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/recovery-eval"),
                        help="where the pruned, recovered and evaluation directories go (replaced on re-run)")
    parser.add_argument("--results", type=Path, default=RESULTS / "recovery_eval.json")
    return parser.parse_args(argv)


def run(argv: list[str], stages: list[dict], name: str) -> None:
    """Run one `sdmprune` command in-process, timing it; stop the benchmark if it fails."""
    command = "sdmprune " + shlex.join(argv)
    print(f"\n$ {command}", flush=True)
    start = time.perf_counter()
    if sdmprune_main(argv) != 0:
        sys.exit(f"stage '{name}' failed: {command}")
    stages.append({"stage": name, "command": command, "seconds": round(time.perf_counter() - start, 1)})


def eval_argv(model: str, output: Path, limit: int) -> list[str]:
    return ["eval", "--model", model, "--tasks", ",".join(ALL_TASKS), "--limit", str(limit), "--ppl-data",
            "wikitext2", "--seq-len", "512", "--max-tokens", "16384", "--bf16", "--eval-batch-size", "8",
            "--output", str(output)]


def evaluate_command(model: str, output: Path, limit: int) -> str:
    return "sdmprune " + shlex.join(eval_argv(model, output, limit))


def evaluate(model: str, output: Path, limit: int, stages: list[dict], name: str) -> dict:
    run(eval_argv(model, output, limit), stages, name)
    return json.loads((output / "results.json").read_text())


def _cell(result: dict) -> str:
    stderr = f" ± {100 * result['stderr']:.2f}" if result["stderr"] is not None else ""
    return f"{100 * result['value']:.2f}{stderr}"


def markdown(results: dict) -> str:
    evals, recovery = results["evaluations"], results["recovery"]
    header = " | ".join(f"{LABELS[m]} (first {evals[m]['limit']})" for m in MODELS)
    lines = [
        "# Recovery benchmark: SmolLM2-135M, SDMPrune 20%, LoRA on Alpaca-1k",
        "",
        "Zero-shot, lm-evaluation-harness, the first N items per task as in each column's header (shared local "
        "data; arc_easy, piqa and hellaswag are the shared halves, race is the RACE+ proxy), bf16 autocast, "
        f"BOS `{evals['dense'].get('bos_token')}` prepended. Values in percent, ± the harness's standard error.",
        "",
        f"| task | metric | {header} |",
        "|---|---|" + "---:|" * len(MODELS),
    ]
    for task in ALL_TASKS:
        cells = [_cell(evals[m]["tasks"][task]) for m in MODELS]
        lines.append(f"| {task} | {evals['dense']['tasks'][task]['metric']} | {' | '.join(cells)} |")
    averages = [f"**{100 * evals[m]['average']:.2f}**" for m in MODELS]
    lines.append(f"| **average ({len(SDMPRUNE_TASKS)} SDMPrune tasks)** | | {' | '.join(averages)} |")
    # BoolQ mostly measures this model's yes/no bias (bench/boolq_check.py), so show the average without it.
    others = [task for task in SDMPRUNE_TASKS if task != "boolq"]
    without = [f"{100 * sum(evals[m]['tasks'][t]['value'] for t in others) / len(others):.2f}" for m in MODELS]
    lines.append(f"| average of the {len(others)} others (without boolq) | | {' | '.join(without)} |")
    ppl = [f"{evals[m]['perplexity']['ppl']:.2f}" for m in MODELS]
    tokens = evals["dense"]["perplexity"]["tokens"]
    lines.append(f"| WikiText-2 PPL (windows of 512, {tokens:,} tokens) | | {' | '.join(ppl)} |")
    lines += [
        "",
        f"Recovery: {recovery['steps']} optimizer steps ({recovery['epochs']:.2f} epochs of {recovery['examples']} "
        f"examples, {recovery['target_tokens']:,} response tokens of {recovery['tokens']:,}), "
        f"{recovery['seconds']:.0f} s ({recovery['tokens_per_s']:.0f} tokens/s), final loss "
        f"{recovery['final_loss']:.3f}.",
        "",
        "| stage | wall time (s) |",
        "|---|---:|",
        *[f"| {s['stage']} | {s['seconds']:.1f} |" for s in results["stages"]],
        "",
        f"Machine: {results['settings']['threads']} torch threads, torch {torch.__version__}. Commands, in order:",
        "",
        "```bash",
        *[s["command"] for s in results["stages"]],
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data_dir = os.environ.get("SDMPRUNE_DATA_DIR")
    if not data_dir:
        sys.exit("set SDMPRUNE_DATA_DIR to the shared data directory (e.g. ../shared/data)")
    instructions = Path(data_dir) / "instruct" / "alpaca_data_1k.json"
    work = args.work_dir
    stages: list[dict] = []
    if args.reuse_dense:
        evaluations = {"dense": json.loads((args.reuse_dense / "results.json").read_text())}
        stages.append({"stage": "evaluate dense (reused from an earlier run)", "command": evaluate_command(
            args.model, args.reuse_dense, evaluations["dense"]["limit"]), "seconds": evaluations["dense"]["seconds"]})
    else:
        evaluations = {"dense": evaluate(args.model, work / "eval-dense", args.limit, stages, "evaluate dense")}
    limit_pruned = args.limit_pruned or args.limit

    pruned = args.pruned or work / f"pruned-{round(args.ratio * 100)}"
    if args.pruned is None:
        run(["prune", "--model", args.model, "--criterion", "sdmprune", "--ratio", str(args.ratio), "--bf16",
             "--calib-samples", "32", "--calib-seq-len", "256", "--ppl-data", "none", "--output", str(pruned),
             "--overwrite"], stages, "prune")
    evaluations["pruned"] = evaluate(str(pruned), work / "eval-pruned", limit_pruned, stages, "evaluate pruned")

    recovered = work / f"{pruned.name}-lora"
    run(["finetune", "--model", str(pruned), "--data", str(instructions), "--epochs", str(args.epochs), "--bf16",
         "--max-len", "256", "--merge", "--output", str(recovered), "--overwrite"], stages, "LoRA recovery")
    recovery = json.loads((recovered / "recovery.json").read_text())
    evaluations["recovered"] = evaluate(str(recovered / "merged"), work / "eval-recovered", limit_pruned, stages,
                                        "evaluate recovered")

    results = {
        "settings": {"model": args.model, "ratio": args.ratio, "pruned": str(pruned), "limit": args.limit,
                     "limit_pruned": limit_pruned,
                     "instructions": str(instructions), "threads": torch.get_num_threads()},
        "stages": stages,
        "evaluations": evaluations,
        "recovery": {k: v for k, v in recovery.items() if k not in ("config", "versions")},
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1))
    args.results.with_suffix(".md").write_text(markdown(results))
    print(f"\nwrote {args.results} and {args.results.with_suffix('.md')}")


if __name__ == "__main__":
    main()
