"""The SDMPrune paper's claims, checked on a real model (Qwen2.5-Coder-0.5B by default): one command.

    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/paper_claims.py                 # all (hours)
    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/paper_claims.py --claims distillation cold-start

Each claim compares the paper's setting with variants that change one thing, at one ratio (20% of total
parameters: the official α, T are 0.4, 0.2 there), over the same seeds:

- distillation: the self-distillation Taylor score vs the cross-entropy one (α = 0 in both stages);
- cold-start: no cold start vs the official 2.5% of MLP width vs 10%;
- alpha, temperature: α 0.2 / 0.4 / 0.6 at T 0.2, and T 0.2 / 0.5 / 1 at α 0.4;
- attention: MLP-only vs MLP + attention pruning at the same total ratio, as NutePrune learns it with and
  without its attention-group gates (a scoring method has no head criterion of the paper's to compare; the
  learned gates decide how much attention to remove on their own, so the comparison isolates "may attention be
  pruned at all").

The runs are records of `bench/quality.py` (the method variants are in its METHODS; same calibration, evaluation
and memory accounting; no refit, since the claims are about choosing what to remove), kept in that model's quality
results file (or --results) so that runs shared with the quality tables are not repeated. The page, with each
variant's perplexity per seed and its paired difference against the paper's setting, goes to
bench/results/paper_claims[-MODEL].md, rebuilt each time from every results file of the model (its quality file and
the `-fp32` one): a claim is read from the file holding most of its runs, so claims run in fp32 and others under
bf16 autocast share one page, each section naming its precision. The page's commands are kept in
paper_claims[-MODEL].json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import quality  # noqa: E402

# claim -> (question, the paper's setting, the variants)
CLAIMS: dict[str, tuple[str, str, list[str]]] = {
    "distillation": ("Does the self-distillation loss choose better neurons than cross-entropy?", "sdmprune",
                     ["sdmprune-ce"]),
    "cold-start": ("Does the cross-entropy cold start help, and is 2.5% the right amount?", "sdmprune",
                   ["sdmprune-cold0", "sdmprune-cold10"]),
    "alpha": ("Is the official α = 0.4 (20%) near the best?", "sdmprune", ["sdmprune-a0.2", "sdmprune-a0.6"]),
    "temperature": ("Is the official T = 0.2 (20%) near the best?", "sdmprune", ["sdmprune-t0.5", "sdmprune-t1"]),
    "attention": ("Is MLP-only pruning better than MLP + attention at the same total ratio?", "nuteprune",
                  ["nuteprune-mlp"]),
}
LABELS = {"sdmprune": "the paper's setting (official α, T; cold start 2.5%)", "sdmprune-ce": "cross-entropy (α = 0)",
          "sdmprune-cold0": "no cold start", "sdmprune-cold10": "cold start 10%", "sdmprune-a0.2": "α = 0.2",
          "sdmprune-a0.6": "α = 0.6", "sdmprune-t0.5": "T = 0.5", "sdmprune-t1": "T = 1",
          "nuteprune": "NutePrune, attention groups and neurons", "nuteprune-mlp": "NutePrune, neurons only"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--claims", nargs="+", default=list(CLAIMS), choices=list(CLAIMS))
    parser.add_argument("--ratio", type=float, default=0.2, help="fraction of total parameters removed")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--results", type=Path, default=None,
                        help="the quality results file holding the runs (default: that of --model)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="run in fp32 (as bench/quality.py; the results file's records must share the precision)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def results_file(model: str) -> Path:
    return quality.RESULTS / ("quality.json" if model == "smollm2-135m" else f"quality-{model}.json")


def _cell(summary: dict, method: str, ratio: float, name: str) -> str:
    entry = summary.get((method, ratio), {}).get(name)
    if entry is None:
        return "—"
    values = ", ".join(f"{v:.1f}" for v in entry["values"])
    return f"{entry['mean']:.1f} ({values})"


def _difference(records: dict, method: str, baseline: str, ratio: float, name: str) -> str:
    diff = quality.paired_difference(records, method, baseline, ratio, name)
    if diff is None:
        return "—"
    spread = f" ± {diff['std']:.1f}" if diff["n"] > 1 else ""
    return f"{diff['mean']:+.1f}{spread} (n {diff['n']}, eval noise ±{100 * diff['eval_rel_err']:.1f}%)"


def claim_sources(files: dict[Path, dict], ratio: float) -> dict[str, Path]:
    """Each claim with records -> the results file holding most of its runs (the paper's setting and at least one
    variant at `ratio`); a claim may have been run in fp32 and another under bf16 autocast, each in its own file."""
    summaries = {path: quality.summarise(results["records"]) for path, results in files.items()}
    sources = {}
    for claim, (_, paper, variants) in CLAIMS.items():
        runs = {path: sum((method, ratio) in summary for method in (paper, *variants))
                for path, summary in summaries.items() if (paper, ratio) in summary}
        best = max(runs, key=runs.get, default=None)
        if best is not None and runs[best] >= 2:
            sources[claim] = best
    return sources


def claim_section(claim: str, results: dict, path: Path, ratio: float) -> list[str]:
    question, paper, variants = CLAIMS[claim]
    records, meta, dense = results["records"], results["settings"], results.get("dense", {})
    summary = quality.summarise(records)
    source = f"Records: `{path.name}` ({'bf16 autocast' if meta['bf16'] else 'fp32'}"
    if dense:
        source += f"; dense {dense['wikitext2']['ppl']:.2f} / {dense['c4']['ppl']:.2f}"
    lines = [f"## {question}", "", source + ").", "",
             "| variant | WikiText-2 | C4 | paired Δ WikiText-2 | paired Δ C4 |", "|---|---|---|---|---|"]
    for method in (paper, *variants):
        cells = [_cell(summary, method, ratio, name) for name in quality.EVAL_SETS]
        diffs = (["(reference)"] * 2 if method == paper else
                 [_difference(records, method, paper, ratio, name) for name in quality.EVAL_SETS])
        lines.append(f"| {LABELS[method]} (`{method}`) | {' | '.join(cells)} | {' | '.join(diffs)} |")
    return [*lines, ""]


def markdown(files: dict[Path, dict], page_commands: list[str], ratio: float) -> str:
    sources = claim_sources(files, ratio)
    meta = files[next(iter(sources.values()))]["settings"] if sources else next(iter(files.values()))["settings"]
    lines = [f"# The SDMPrune paper's claims on {meta['model']}", "",
             f"{ratio:.0%} of total parameters removed, no refit, no recovery; perplexity on the first "
             f"{meta['evaluation']['max_tokens']:,} tokens of WikiText-2 test / C4 held-out (windows of "
             f"{meta['evaluation']['seq_len']}), calibration {meta['calibration']['samples']} C4 windows of "
             f"{meta['calibration']['seq_len']} tokens per seed (the same windows for every variant). "
             "Each claim's runs share one results file, so one precision (named in its section). "
             "Each cell: mean over seeds (the seeds' values); the paired difference is variant − the paper's "
             "setting on the same seed (mean ± std over seeds), with the evaluation noise of that difference "
             "(the standard error of the per-window NLL difference). Negative = the variant is better.", ""]
    for claim, path in sources.items():
        lines += claim_section(claim, files[path], path, ratio)
    lines += ["This page (each command runs only the records missing from its results file, then rewrites the "
              "page from every results file of the model):", "", "```bash", *page_commands, "```", "",
              "Runs (records of `bench/quality.py`, commands as run, those with a claim's variants):", "", "```bash"]
    claim_methods = {m for claim in sources for m in CLAIMS[claim][2]}
    for path in dict.fromkeys(sources.values()):
        lines += [c for c in files[path].get("commands", []) if claim_methods & set(c.split())]
    return "\n".join([*lines, "```", ""])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = args.results or results_file(args.model)
    methods = list(dict.fromkeys(m for claim in args.claims for m in (CLAIMS[claim][1], *CLAIMS[claim][2])))
    precision = [] if args.bf16 else ["--no-bf16"]
    quality.main(["--model", args.model, "--results", str(path), "--methods", *methods, "--refits",
                  "--ratios", str(args.ratio), "--seeds", *map(str, args.seeds), *precision])
    default = results_file(args.model)
    candidates = [default, default.with_name(f"{default.stem}-fp32.json"), path]
    files = {p: json.loads(p.read_text()) for p in dict.fromkeys(candidates) if p.is_file()}
    suffix = "" if args.model == "qwen2.5-coder-0.5b" else f"-{Path(args.model).name}"
    page = path.parent / f"paper_claims{suffix}.md"
    log = page.with_suffix(".json")
    commands = json.loads(log.read_text())["commands"] if log.is_file() else []
    command = f"SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/paper_claims.py {' '.join(args.argv)}"
    commands = list(dict.fromkeys([*commands, command.strip()]))
    sources = claim_sources(files, args.ratio)
    quality.save_json(log, {"commands": commands, "sources": {claim: p.name for claim, p in sources.items()}})
    with quality.atomic_file(page) as tmp:
        tmp.write_text(markdown(files, commands, args.ratio))
    print(f"wrote {page} and {log.name}")


if __name__ == "__main__":
    main()
