"""Zero-shot scoring engines compared: the harness's HFLM vs our SharedContextLM, time and task values.

    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/eval_speed.py                 # SmolLM2, ~25 min
    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/eval_speed.py --model qwen2.5-coder-0.5b --limit 20

Each engine evaluates the same model on the same tasks and items (`evaluate_tasks`, the harness building the
requests and computing the metrics), in bf16 autocast as our benchmarks do, and SharedContextLM once more in
fp32 as the reference: the bf16 rows' distance to it is the precision each engine keeps. Results:
bench/results/eval_speed[-<model>].{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
from lm_eval.models.huggingface import HFLM
from perf_common import footer, machine, write_results

from sdmprune.evaluation.shared_context import SharedContextLM
from sdmprune.evaluation.tasks import SDMPRUNE_TASKS, evaluate_tasks, parse_task_names
from sdmprune.models.loading import load_model

# (label, engine class, bf16); the last is the reference
RUNS = (("SharedContextLM bf16", SharedContextLM, True), ("HFLM bf16", HFLM, True),
        ("SharedContextLM fp32", SharedContextLM, False))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model spec (alias, directory, .gguf)")
    parser.add_argument("--tasks", default="sdmprune", help="task names, 'sdmprune' (the 10) or 'all' (12)")
    parser.add_argument("--limit", type=int, default=30, help="first N items per task")
    parser.add_argument("--batch-size", type=int, default=8, help="HFLM: requests per forward; ours: contexts")
    return parser.parse_args(argv)


def markdown(results: dict) -> str:
    runs, reference = results["runs"], results["runs"][-1]
    tasks = list(reference["tasks"])
    lines = [f"# Zero-shot scoring engines: {results['model']}", "",
             f"{len(tasks)} tasks, first {results['limit']} items each, {results['batch_size']} per forward pass "
             "(HFLM: requests; SharedContextLM: distinct contexts with all their answers). Values in %; "
             f"`Δ` = items' value differences against the fp32 reference, summed over tasks.", "",
             "| engine | seconds | speed-up vs HFLM bf16 | " + " | ".join(tasks) + " | average | Σ|Δ| vs fp32 |",
             "|---|---:|---:|" + "---:|" * (len(tasks) + 2)]
    hflm_seconds = next(r["seconds"] for r in runs if r["engine"] == "HFLM bf16")
    for run in runs:
        values = [100 * run["tasks"][name] for name in tasks]
        distance = sum(abs(100 * (run["tasks"][n] - reference["tasks"][n])) for n in tasks)
        average = f"{100 * run['average']:.2f}" if run["average"] is not None else "n/a"
        lines.append(f"| {run['engine']} | {run['seconds']:.0f} | {hflm_seconds / run['seconds']:.2f}× | "
                     + " | ".join(f"{v:.2f}" for v in values) + f" | {average} | {distance:.2f} |")
    return "\n".join(lines + [""] + footer(results))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = parse_task_names(args.tasks)
    model, tokenizer = load_model(args.model)
    runs = []
    for label, engine, bf16 in RUNS:
        print(f"{label}: {len(names)} tasks, first {args.limit} items", flush=True)
        result = evaluate_tasks(model, tokenizer, names, limit=args.limit, batch_size=args.batch_size, bf16=bf16,
                                lm_class=engine)
        runs.append({"engine": label, "bf16": bf16, "seconds": result["seconds"], "average": result["average"],
                     "tasks": {name: r["value"] for name, r in result["tasks"].items()}})
        print(f"  {result['seconds']:.0f} s", flush=True)
    results = {"model": args.model, "limit": args.limit, "batch_size": args.batch_size, "runs": runs,
               "average_tasks": list(SDMPRUNE_TASKS), "machine": machine(),
               "command": "SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/eval_speed.py "
                          + shlex.join(argv if argv is not None else sys.argv[1:])}
    stem = "eval_speed" if args.model == "smollm2-135m" else f"eval_speed-{args.model}"
    write_results(stem, results, markdown(results))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
