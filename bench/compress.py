"""`sdmprune compress` from dense to recovered, per model and ratio: perplexity after every stage (dense → pruned →
refit → recovered), recovery by cross-entropy vs by distillation on the same tokens, the paper's 10 zero-shot tasks
after every stage, and the seconds and peak memory of every stage.

    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/compress.py                      # everything (hours)
    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/compress.py --models smollm2-135m --no-tasks

Each run is the user's command, `sdmprune compress` in a fresh process (its own peak memory), with the recovery
variant: `none` (`--recover-data none`: the pruned-and-refitted model), `ce` (`--kd-beta 0`: cross-entropy on the
recovery text) or `kd` (`--kd-beta 1`, the default: KL to the live dense teacher), the other options at compress's
defaults (64 C4 calibration windows of 256 tokens, sequential refit, LoRA r 8, C4 recovery windows of 256 tokens)
except `--recover-tokens` and the importance: the preset (`--importance activation-wanda`), so that the prune and
reconstruct stages are measured apart (compress's default, auto, makes them one stage), and with `--export-stages`.
Perplexity: WikiText-2 and C4 held-out text, first 8,192 tokens each, windows of 512, bf16 autocast, measured by
compress after every stage.
Zero-shot: `sdmprune eval --tasks sdmprune --limit 200` on each recovered export and on the pruned and refitted
models a run exported on the way (the same for every recovery of a model, ratio and seed; where no run of them has
those exports, the `none` variant is run for them), and all 12 local tasks (the 10, HellaSwag, LAMBADA) on the
dense model.
Runs and evaluations already in the results file are skipped (an interrupted compress run is resumed), so the
script can be run piecewise; models that are not installed are skipped with a note. Results:
bench/results/compress.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from math import sqrt
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).parent))
from perf_common import RESULTS, footer, machine, pyplot, write_results  # noqa: E402

from sdmprune.checkpoint import interrupted  # noqa: E402
from sdmprune.errors import SdmpruneError  # noqa: E402
from sdmprune.evaluation.tasks import SDMPRUNE_TASKS  # noqa: E402
from sdmprune.models import PACKAGED_MODELS, packaged_gguf  # noqa: E402
from sdmprune.recipes.compress import STAGE_MODELS  # noqa: E402
from sdmprune.recipes.prune import FINISHED  # noqa: E402

RECOVERIES = ("none", "ce", "kd")
RECOVERY_ARGS = {"none": ["--recover-data", "none"], "ce": ["--kd-beta", "0"], "kd": ["--kd-beta", "1"]}
LABELS = {"none": "refit", "ce": "recovered CE", "kd": "recovered KD"}
# zero-shot evaluations of the stages before recovery: their label -> the stage model compress exports
STAGE_TASKS = {"pruned": "pruned", "refit": "reconstructed"}
TASK_TARGETS = (*STAGE_TASKS, "ce", "kd")
STAGE_FIGURES = ("dense", "pruned", "reconstructed", "recovered")
PPL_SETS = ("wikitext2", "c4")
TASK_LIMIT = 200
NUTEPRUNE_QUALITY = RESULTS / "quality.json"  # NutePrune's trained-mask rows, the 30% goal's reference


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3],
                        help="fractions of total parameters removed")
    parser.add_argument("--recoveries", nargs="+", default=list(RECOVERIES), choices=RECOVERIES,
                        help="none: refit only; ce: cross-entropy recovery; kd: distillation recovery")
    parser.add_argument("--recover-tokens", type=int, default=16384,
                        help="recovery tokens, the same for ce and kd (compress's default)")
    parser.add_argument("--seed", type=int, default=0, help="calibration, recovery data and LoRA seed")
    parser.add_argument("--no-tasks", dest="tasks", action="store_false",
                        help="perplexity only (skip the zero-shot evaluations)")
    parser.add_argument("--tasks-for", nargs="+", default=list(TASK_TARGETS), choices=TASK_TARGETS,
                        help="the models that get the zero-shot tasks: the stages before recovery (pruned, refit) "
                        "and the recovered exports (ce, kd); the dense model always")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-compress"),
                        help="compress outputs and task evaluations (kept: a re-run resumes them)")
    parser.add_argument("--results", type=Path, default=RESULTS / "compress.json")
    return parser.parse_args(argv)


def installed(model: str) -> bool:
    """False (with the install command printed) for a packaged model whose packages are missing."""
    try:
        if model in PACKAGED_MODELS:
            packaged_gguf(model)
    except SdmpruneError as error:
        print(f"skipping {model}: {error}")
        return False
    return True


def sdmprune(argv: list[str]) -> float:
    """Run `sdmprune ARGV` in a fresh process; its wall seconds. Stops the benchmark if it fails."""
    print(f"\n$ sdmprune {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    if subprocess.run([sys.executable, "-m", "sdmprune.cli", *argv]).returncode != 0:
        sys.exit(f"failed: sdmprune {shlex.join(argv)}")
    return round(time.perf_counter() - start, 1)


def compress_argv(model: str, ratio: float, recovery: str, args: argparse.Namespace, output: Path) -> list[str]:
    # the preset named: its prune and reconstruct stages apart, each measured (compress's default, --importance auto,
    # makes them one stage; bench/quality.py's sdmprune-auto measures that choice)
    return ["compress", "--model", model, "--ratio", str(ratio), "--importance", "activation-wanda",
            "--seed", str(args.seed),
            "--recover-tokens", str(args.recover_tokens), *RECOVERY_ARGS[recovery],
            "--ppl-data", ",".join(PPL_SETS), "--max-tokens", "8192", "--export-stages", "--output", str(output)]


def tasks_argv(model: str, output: Path, tasks: str) -> list[str]:
    return ["eval", "--model", model, "--tasks", tasks, "--limit", str(TASK_LIMIT), "--bf16",
            "--eval-batch-size", "8", "--output", str(output)]


def run_key(model: str, ratio: float, recovery: str, seed: int, tokens: int) -> str:
    return f"{model}|{ratio}|{recovery}|{seed}|{0 if recovery == 'none' else tokens}"


def stage_key(model: str, ratio: float, seed: int, stage: str) -> str:
    return f"{model}|{ratio}|{seed}|{stage}"


def compress_run(model: str, ratio: float, recovery: str, args: argparse.Namespace) -> dict:
    tokens = 0 if recovery == "none" else args.recover_tokens
    output = args.work_dir / f"{Path(model).name}-{ratio:g}-{recovery}-s{args.seed}-t{tokens}"
    argv = compress_argv(model, ratio, recovery, args, output)
    command = "sdmprune " + shlex.join(argv)
    if interrupted(output, FINISHED):
        argv.append("--resume")
    elif output.exists():
        argv.append("--overwrite")
    seconds = sdmprune(argv)
    report = json.loads((output / FINISHED).read_text())
    return {"model": model, "ratio": ratio, "recovery": recovery, "seed": args.seed, "recover_tokens": tokens,
            "command": command, "output": str(output), "wall_seconds": seconds, "achieved": report["achieved"],
            "evaluation": report["evaluation"], "stages": report["stages"], "plan": report["plan"]}


def task_run(model: str, output: Path, tasks: str = "sdmprune") -> dict:
    """`sdmprune eval` of MODEL (an alias or an export) on TASKS, written to OUTPUT; the figures."""
    argv = tasks_argv(model, output, tasks)
    seconds = sdmprune(argv)
    result = json.loads((output / "results.json").read_text())
    return {"command": "sdmprune " + shlex.join(argv), "seconds": seconds, "average": result["average"],
            "tasks": {name: {"metric": r["metric"], "value": r["value"], "stderr": r["stderr"]}
                      for name, r in result["tasks"].items()}}


# ----------------------------------------------------------------------------- report


def _ppl(figures: dict | None) -> str:
    if not figures:
        return "—"
    return " / ".join(f"{figures[name]['ppl']:.1f}" if name in figures else "—" for name in PPL_SETS)


def perplexity_table(results: dict, model: str) -> list[str]:
    """A row per (ratio, seed, recovery tokens): perplexity after each stage."""
    groups: dict[tuple, dict[tuple[str, int], dict]] = {}
    for run in results["runs"].values():
        if run["model"] == model:
            groups.setdefault((run["ratio"], run["seed"]), {})[run["recovery"], run["recover_tokens"]] = run
    lines = ["| ratio | seed | params after | dense | pruned | refit | recovery tokens | recovered CE | recovered KD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (ratio, seed), runs in sorted(groups.items()):
        first = next(iter(runs.values()))
        stages = [_ppl(first["evaluation"].get(stage)) for stage in ("dense", "pruned", "reconstructed")]
        for tokens in sorted({tokens for recovery, tokens in runs if recovery != "none"} or {0}):
            recovered = [_ppl(runs[r, tokens]["evaluation"].get("recovered")) if (r, tokens) in runs else "—"
                         for r in ("ce", "kd")]
            lines.append(f"| {ratio:.0%} | {seed} | {first['achieved']['params_after'] / 1e6:.1f}M | "
                         f"{' | '.join(stages)} | {tokens:,} | {' | '.join(recovered)} |")
    return lines


def task_table(results: dict, model: str) -> list[str]:
    """A column per evaluated model: dense, then per ratio and seed the pruned and refitted stages and the
    recovered exports."""
    columns = [("dense", results["tasks"].get(f"{model}|dense"))]
    groups = sorted({(run["ratio"], run["seed"]) for run in results["runs"].values() if run["model"] == model})
    for ratio, seed in groups:
        for stage in STAGE_TASKS:
            if (key := stage_key(model, ratio, seed, stage)) in results["tasks"]:
                columns.append((f"{ratio:.0%} {stage}", results["tasks"][key]))
        for key, run in sorted(results["runs"].items()):
            if (run["model"], run["ratio"], run["seed"]) == (model, ratio, seed) and key in results["tasks"]:
                columns.append((f"{ratio:.0%} {LABELS[run['recovery']]}, {run['recover_tokens'] // 1024}k tokens",
                                results["tasks"][key]))
    if columns[0][1] is None or len(columns) == 1:
        return ["(not evaluated yet)"]
    dense = columns[0][1]
    lines = [f"| task | metric | {' | '.join(name for name, _ in columns)} |",
             "|---|---|" + "---:|" * len(columns)]
    for task in [*SDMPRUNE_TASKS, *(name for name in dense["tasks"] if name not in SDMPRUNE_TASKS)]:
        cells = [f"{100 * result['tasks'][task]['value']:.1f}" if task in result["tasks"] else "—"
                 for _, result in columns]
        lines.append(f"| {task} | {dense['tasks'][task]['metric']} | {' | '.join(cells)} |")
    averages = [f"**{100 * result['average']:.2f}**" for _, result in columns]
    shares = [f"{100 * result['average'] / dense['average']:.1f}" for _, result in columns]
    # BoolQ apart: a model near chance there scores the majority class (62% "yes") once pruned
    without = [mean(r["value"] for name, r in result["tasks"].items() if name in SDMPRUNE_TASKS and name != "boolq")
               for _, result in columns]
    lines += [f"| **average (the 10)** | | {' | '.join(averages)} |", f"| % of dense | | {' | '.join(shares)} |",
              f"| average without BoolQ (the 9) | | {' | '.join(f'{100 * v:.2f}' for v in without)} |",
              f"| % of dense without BoolQ | | {' | '.join(f'{100 * v / without[0]:.1f}' for v in without)} |"]
    return lines


def cost_table(results: dict) -> list[str]:
    lines = ["| model | ratio | recovery | " + " | ".join(
        ("calibrate", "prune", "reconstruct", "recover", "evaluate")) + " | wall (s) |", "|---|---|---|" + "---|" * 6]
    for run in results["runs"].values():
        stages = {s["stage"]: s for s in run["stages"]}
        plan = {s["stage"]: s for s in run["plan"]}
        cells = [f"{stages[name]['seconds']:.0f} s (est. {plan[name]['seconds']:.0f}), "
                 f"{stages[name]['peak_memory_mib'] / 1024:.1f} GiB (est. {plan[name]['memory_gib']:.1f})"
                 if name in stages and stages[name].get("peak_memory_mib") else "—"
                 for name in ("calibrate", "prune", "reconstruct", "recover", "evaluate")]
        recovery = run["recovery"] + (f" ({run['recover_tokens']:,} tokens)" if run["recovery"] != "none" else "")
        lines.append(f"| {run['model']} | {run['ratio']:.0%} | {recovery} | {' | '.join(cells)} | "
                     f"{run['wall_seconds']:.0f} |")
    return lines


def nuteprune_row(ratio: float, seed: int) -> dict | None:
    if not NUTEPRUNE_QUALITY.exists():
        return None
    return json.loads(NUTEPRUNE_QUALITY.read_text())["records"].get(f"nuteprune|{ratio}|{seed}")


def goals(results: dict) -> list[str]:
    """Where the runs stand against the issue's three goals."""
    lines = []
    for run in results["runs"].values():
        if run["model"] != "smollm2-135m" or run["recovery"] == "none":
            continue
        name = f"{run['recovery'].upper()}, {run['recover_tokens']:,} tokens, seed {run['seed']}"
        recovered = run["evaluation"]["recovered"]
        if run["ratio"] == 0.2:
            dense, ppl = run["evaluation"]["dense"]["wikitext2"]["ppl"], recovered["wikitext2"]["ppl"]
            lines.append(f"- SmolLM2 20%, WikiText-2 PPL within 1.5× of dense ({name}): {ppl:.1f} vs dense "
                         f"{dense:.1f} = {ppl / dense:.2f}× — {'met' if ppl <= 1.5 * dense else 'not met'}.")
        if run["ratio"] == 0.3 and (nute := nuteprune_row(0.3, run["seed"])):
            tokens = run["recover_tokens"] + 64 * 256
            ahead = all(recovered[n]["ppl"] < nute["ppl"][n]["ppl"] for n in PPL_SETS)
            lines.append(f"- SmolLM2 30%, ahead of NutePrune at equal training tokens ({name}): {_ppl(recovered)} "
                         f"with {tokens:,} tokens (calibration + recovery) vs NutePrune "
                         f"{nute['ppl']['wikitext2']['ppl']:.1f} / {nute['ppl']['c4']['ppl']:.1f} with "
                         f"{nute['budget']['tokens']:,} (WikiText-2 / C4) — {'met' if ahead else 'not met'}.")
    dense_tasks = results["tasks"].get("qwen2.5-coder-0.5b|dense")
    for key, run in results["runs"].items():
        if run["model"] == "qwen2.5-coder-0.5b" and run["ratio"] == 0.2 and dense_tasks and key in results["tasks"]:
            result = results["tasks"][key]
            share = result["average"] / dense_tasks["average"]
            name = (f"{run['recovery'].upper()}, {run['recover_tokens']:,} tokens" if run["recovery"] != "none"
                    else "refit only")
            lines.append(f"- Qwen2.5-Coder-0.5B 20%, ≥ 97% of the dense 10-task average ({name}, seed {run['seed']}): "
                         f"{100 * result['average']:.2f} ± {100 * average_stderr(result):.2f}"
                         f" vs {100 * dense_tasks['average']:.2f} = {100 * share:.1f}% — "
                         f"{'met' if share >= 0.97 else 'not met'}.")
    return lines or ["(no run yet)"]


def average_stderr(result: dict) -> float:
    """Standard error of the 10-task average from the tasks' own (items sampled independently)."""
    errors = [r["stderr"] for name, r in result["tasks"].items() if name in SDMPRUNE_TASKS]
    return sqrt(sum(e * e for e in errors)) / len(errors)


def markdown(results: dict) -> str:
    lines = ["# `sdmprune compress`: dense → pruned → refit → recovered", "",
             "Each run is one `sdmprune compress` command (commands below); the recovery tokens (C4 windows of 256) "
             "are the same for both recovery losses in a row. Perplexity: "
             "WikiText-2 / C4, first 8,192 tokens of each, windows of 512, bf16 autocast, measured by compress after "
             f"every stage. Zero-shot: the paper's 10 tasks, first {TASK_LIMIT} items each (`sdmprune eval --tasks "
             "sdmprune --limit 200`), on each export (all 12 local tasks on the dense model); values in percent, "
             "the average over the 10.", "",
             "## Goals", "", *goals(results), ""]
    for model in dict.fromkeys(run["model"] for run in results["runs"].values()):
        lines += [f"## {model}", "", "Perplexity (WikiText-2 / C4) after each stage:", "",
                  *perplexity_table(results, model), "", "Zero-shot tasks:", "", *task_table(results, model), ""]
    lines += ["## Seconds and peak memory per stage", "",
              "Peak memory: the process's peak resident memory during the stage (Linux VmHWM reset at its start; "
              "the weights included). Every stage's seconds include its perplexity passes (two texts); evaluate is "
              "empty here (the tasks run apart, on the export). `est.`: the plan `compress --dry-run` prints.", "",
              *cost_table(results), "",
              "Commands:", "", "```bash", *results["commands"], "```", ""]
    return "\n".join(lines + footer(results))


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    groups = [(f"{r['model']} {r['ratio']:.0%}, {r['recover_tokens'] // 1024}k tokens", r)
              for r in results["runs"].values() if r["recovery"] == "kd"]
    if not groups:
        return
    figure, axes = plt.subplots(figsize=(7, 3.8), layout="tight")
    width = 0.8 / len(groups)
    for offset, (label, run) in enumerate(groups):
        stages = [s for s in STAGE_FIGURES if s in run["evaluation"]]
        xs = [x + (offset - (len(groups) - 1) / 2) * width for x in range(len(stages))]
        axes.bar(xs, [run["evaluation"][s]["wikitext2"]["ppl"] for s in stages], width, label=label)
    axes.set_xticks(range(len(STAGE_FIGURES)), ["dense", "pruned", "refit", "recovered (KD)"])
    axes.set_yscale("log")
    axes.set_ylabel("WikiText-2 perplexity")
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = (json.loads(args.results.read_text()) if args.results.exists()
               else {"runs": {}, "tasks": {}, "commands": []})

    def save() -> None:
        results["machine"] = machine()
        results["command"] = "SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/compress.py"
        write_results(args.results.stem, results, markdown(results), args.results.parent)
        plot(results, args.results.with_suffix(".png"))

    def remember(command: str) -> None:
        if command not in results["commands"]:
            results["commands"].append(command)

    for model in filter(installed, args.models):
        if args.tasks and f"{model}|dense" not in results["tasks"]:
            dense_output = args.work_dir / f"{Path(model).name}-dense-tasks"
            results["tasks"][f"{model}|dense"] = task_run(model, dense_output, "all")
            remember(results["tasks"][f"{model}|dense"]["command"])
            save()
        for ratio in args.ratios:
            for recovery in args.recoveries:
                key = run_key(model, ratio, recovery, args.seed, args.recover_tokens)
                if key not in results["runs"]:
                    results["runs"][key] = compress_run(model, ratio, recovery, args)
                    remember(results["runs"][key]["command"])
                    save()
                if args.tasks and recovery in args.tasks_for and key not in results["tasks"]:
                    output = Path(results["runs"][key]["output"])
                    results["tasks"][key] = task_run(str(output), output.with_name(output.name + "-tasks"))
                    remember(results["tasks"][key]["command"])
                    save()
            stages = [stage for stage in STAGE_TASKS if args.tasks and stage in args.tasks_for
                      and stage_key(model, ratio, args.seed, stage) not in results["tasks"]]
            if not stages:
                continue
            group = [run for run in results["runs"].values()
                     if (run["model"], run["ratio"], run["seed"]) == (model, ratio, args.seed)]
            source = next((Path(run["output"]) / STAGE_MODELS for run in group
                           if (Path(run["output"]) / STAGE_MODELS).is_dir()), None)
            if source is None:  # the cheapest run that exports the stages
                key = run_key(model, ratio, "none", args.seed, 0)
                results["runs"][key] = compress_run(model, ratio, "none", args)
                remember(results["runs"][key]["command"])
                save()
                source = Path(results["runs"][key]["output"]) / STAGE_MODELS
            for stage in stages:
                key = stage_key(model, ratio, args.seed, stage)
                output = args.work_dir / f"{Path(model).name}-{ratio:g}-s{args.seed}-{stage}-tasks"
                results["tasks"][key] = task_run(str(source / STAGE_TASKS[stage]), output)
                remember(results["tasks"][key]["command"])
                save()
    save()


if __name__ == "__main__":
    main()
