"""Quality benchmark: perplexity of the bundled SmolLM2-135M pruned by every method, no recovery training.

Regenerate everything (about 2.5 h on a 2-core CPU; runs already in the results file are skipped):

    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/quality.py

A subset, e.g. one method at one ratio:

    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/quality.py --methods sdmprune --ratios 0.2 --seeds 0

Every (method, ratio, seed) prunes with the C4 calibration windows of that seed (the same windows for
every method; `--calib` another source, into another results file), then measures WikiText-2 test and C4
held-out perplexity on fixed windows. Records
accumulate in bench/results/quality.json; quality.md (mean ± sample std over seeds, and paired
differences against the best baseline) and quality.png are rebuilt from it after every run.

`nuteprune` trains instead of scoring: NUTEPRUNE_WINDOWS C4 windows of the seed, one per step, and its
sparsity/teacher trajectory goes to results/<results name>-<method>-<ratio>-<seed>.png. Every new record carries
its budget (seconds, tokens seen) and the peak resident memory of the pruning call above the memory
before it (Linux VmHWM, reset just before the call; CUDA: peak allocated).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from sdmprune import load_model, perplexity, prune
from sdmprune.data import extend_calibration, load_calibration, load_text
from sdmprune.data.calibration import load_documents
from sdmprune.evaluation.perplexity import tokenize_windows
from sdmprune.io import atomic_file
from sdmprune.nuteprune import nuteprune, plot_trajectory
from sdmprune.options import build
from sdmprune.pruning import PruneConfig
from sdmprune.reconstruct import ReconstructConfig, reconstruct
from sdmprune.runtime import resolve_device, use_bf16
from sdmprune.selection import prune_and_refit, selection_windows

sys.path.insert(0, str(Path(__file__).parent))
from perf_common import PeakMemory  # noqa: E402

RESULTS = Path(__file__).parent / "results"

# Name -> PruneConfig settings. The first six are the paper's comparison (each baseline as its authors
# define its score, all with the paper's uniform allocation); the rest are our variants of SDMPrune.
FAITHFUL = {"criterion": "sdmprune", "importance": "weight", "bias_compensation": False}  # the paper's SDMPrune
PRESET = {"criterion": "sdmprune", "importance": "activation-wanda", "bias_compensation": False}  # our default
METHODS: dict[str, dict] = {
    "random": {"criterion": "random"},
    "magnitude": {"criterion": "magnitude"},
    "wanda-sp": {"criterion": "wanda-sp"},
    "taylor": {"criterion": "taylor"},
    "flap": {"criterion": "flap"},  # with its bias compensation
    "flap-global": {"criterion": "flap", "allocation": "global", "width_band": None},  # FLAP as its authors run it
    "sdmprune": FAITHFUL,
    "sdmprune-activation": {**PRESET, "importance": "activation"},
    "sdmprune-fisher": {**PRESET, "importance": "fisher"},
    "sdmprune-activation-wanda": PRESET,
    "sdmprune-activation-wanda+bias": {**PRESET, "bias_compensation": True},
    "sdmprune-weight-wanda": {**PRESET, "importance": "weight-wanda"},  # the preset's mean with the paper's Taylor
    # the preset and the paper's score, each scored and refitted, the one with the lower perplexity on further
    # calibration windows kept (sdmprune.selection); records only with a refit ("<method>+<refit>")
    "sdmprune-auto": {**PRESET, "importance": "auto"},
    "sdmprune-auto-global25": {**PRESET, "importance": "auto", "allocation": "global", "width_band": 0.25},
    # The preset over 4 prune-and-rescore steps (+ cold start) with the dense teacher (masks off) and with the
    # progressive one (the student of the previous step): both hold one model in memory.
    "sdmprune-steps4": {**PRESET, "steps": 4},
    "sdmprune-progressive": {**PRESET, "steps": 4, "teacher": "progressive", "teacher_lag": 1},
    # NutePrune: learned masks over key/value groups and MLP neurons (widths and head counts differ per layer),
    # LoRA merged; trained on NUTEPRUNE_WINDOWS windows, one per step.
    "nuteprune": {"method": "nuteprune", "train_steps": 500},
    # The preset with FLAP's non-uniform widths (standardised scores ranked across layers, unbounded) ...
    "sdmprune-activation-wanda-global": {**PRESET, "allocation": "global", "width_band": None},
    # ... and with every layer's width within ±25% (`--allocation global`'s default) / ±50% of the uniform width.
    "sdmprune-activation-wanda-global25": {**PRESET, "allocation": "global", "width_band": 0.25},
    "sdmprune-activation-wanda-global50": {**PRESET, "allocation": "global", "width_band": 0.5},
    "sdmprune-global25": {**FAITHFUL, "allocation": "global", "width_band": 0.25},  # the paper's scores, ±25% widths
    # The paper's claims (bench/paper_claims.py): the faithful sdmprune with one setting changed (the official
    # α, T at 20% are 0.4, 0.2), and NutePrune without its attention-group gates.
    "sdmprune-ce": {**FAITHFUL, "alpha": 0.0},  # cross-entropy Taylor in both stages
    "sdmprune-cold0": {**FAITHFUL, "cold_start": 0.0},
    "sdmprune-cold10": {**FAITHFUL, "cold_start": 0.1},
    "sdmprune-a0.2": {**FAITHFUL, "alpha": 0.2},
    "sdmprune-a0.6": {**FAITHFUL, "alpha": 0.6},
    "sdmprune-t0.5": {**FAITHFUL, "temperature": 0.5},
    "sdmprune-t1": {**FAITHFUL, "temperature": 1.0},
    "nuteprune-mlp": {"method": "nuteprune", "train_steps": 500, "head_gates": False},
}
# Reconstruction after the masks (`--reconstruct`, sdmprune.reconstruct): record "<method>+<refit>" holds the same
# masks as record "<method>" with the kept down_proj weights refitted. Refit name -> its settings: the first two fix
# the damping (the records made before the held-out choice existed); "sequential-holdout-128" is the package's default.
# The "-128" ones on 128 windows, the others on the scoring windows (refit_samples None).
REFITS = {
    "one-shot": ReconstructConfig("one-shot", refit_holdout=0, refit_samples=None),
    "sequential": ReconstructConfig("sequential", refit_holdout=0, refit_samples=None),
    # the damping chosen per layer on held-out windows
    "one-shot-holdout": ReconstructConfig("one-shot", refit_samples=None),
    "sequential-holdout": ReconstructConfig("sequential", refit_samples=None),
    "sequential-holdout4": ReconstructConfig("sequential", refit_candidates=4, refit_samples=None),  # a 4th damping: 3
    "sequential-holdout-128": ReconstructConfig("sequential", refit_samples=128),  # 128 windows: the scoring ones, more
    "sequential-holdout4-128": ReconstructConfig("sequential", refit_candidates=4, refit_samples=128),
    # the default's three candidates (1e-4, 3e-3, 0.1) shifted up or down by a factor of 3 (the largest one named)
    "sequential-holdout-128-top0.3": ReconstructConfig("sequential", damping=3e-4, refit_samples=128),
    "sequential-holdout-128-top0.03": ReconstructConfig("sequential", damping=3e-5, refit_samples=128),
}
# the choice among candidates runs with each refit: one record per refit, none without
CHOSEN = ("sdmprune-auto", "sdmprune-auto-global25")
REFITTED = ("wanda-sp", "flap", "flap-global", "sdmprune", "sdmprune-activation-wanda", "sdmprune-weight-wanda",
            "sdmprune-activation-wanda-global", "sdmprune-activation-wanda-global25",
            "sdmprune-activation-wanda-global50", "sdmprune-global25", "nuteprune", "sdmprune-steps4", *CHOSEN)
REFIT_MICRO_BATCH = 4
NUTEPRUNE_WINDOWS = 500
BASELINES = ("random", "magnitude", "wanda-sp", "taylor", "flap", "flap-global")
SEED_FREE = ("magnitude",)  # no calibration data and no randomness: one seed says everything
EVAL_SETS = {"wikitext2": "WikiText-2 test", "c4": "C4 held-out"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.4],
                        help="fractions of total parameters removed")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="calibration (and method) seeds")
    parser.add_argument("--refits", nargs="*", default=list(REFITS), choices=list(REFITS),
                        help="reconstructions measured besides none on the masks of each method in REFITTED (none: "
                             "pass no value)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="c4",
                        help="calibration text (default c4; any --calib source of `sdmprune prune`, e.g. a directory "
                             "of source files to calibrate a code model on code; another source needs another "
                             "--results file)")
    parser.add_argument("--eval-code", type=Path, default=None,
                        help="also measure perplexity on the source files directly inside this directory, joined "
                             "in name order (e.g. a package the --calib directory does not hold: a code model's own "
                             "domain); changes the settings, so another --results file")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration windows per run")
    parser.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="first N tokens of each evaluation text")
    parser.add_argument("--eval-seq-len", type=int, default=512, help="perplexity window length")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="run scoring and evaluation in fp32 (default: bf16 autocast where the device has "
                             "native bf16 matmuls, e.g. 1.5x faster on an AVX-512 CPU; fp32 elsewhere)")
    parser.add_argument("--results", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--force", action="store_true", help="re-run records already in the results file")
    args = parser.parse_args(argv)
    args.bf16 = use_bf16(resolve_device(), args.bf16)  # on a CPU without native bf16 the runs, and records, are fp32
    return args


def settings(args: argparse.Namespace) -> dict:
    """What every record of one results file shares; a run with other settings needs another file."""
    return {
        "model": args.model,
        "calibration": {"source": "c4 (../shared/data/c4/c4_en_train00000_first1000.jsonl)" if args.calib == "c4"
                        else str(Path(args.calib).expanduser().resolve()),
                        "samples": args.calib_samples, "seq_len": args.calib_seq_len,
                        "tokens": args.calib_samples * args.calib_seq_len},
        "evaluation": {"seq_len": args.eval_seq_len, "max_tokens": args.eval_tokens,
                       "sets": {"wikitext2": "wikitext2_raw/wiki.test.raw",
                                "c4": "c4/c4_en_sample300_llamafactory.jsonl",
                                **({"code": str(args.eval_code.expanduser().resolve())} if args.eval_code else {})}},
        "bf16": args.bf16,
        "torch": torch.__version__,
    }


def eval_sets(meta: dict) -> dict[str, str]:
    """The evaluation sets of a results file's settings: name -> title."""
    code = meta["evaluation"]["sets"].get("code")
    return {**EVAL_SETS, **({"code": f"Code ({Path(code).name}/*)"} if code else {})}


def load_results(path: Path, expected: dict) -> dict:
    if not path.is_file():
        return {"settings": expected, "records": {}}
    results = json.loads(path.read_text())
    threads = results["settings"].pop("threads", None)  # older files: one thread count for every record
    for record in results["records"].values():
        record.setdefault("threads", threads)
    if results["settings"] != expected:
        sys.exit(f"{path} was made with other settings ({results['settings']}); pass another --results")
    return results


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def evaluate(model, tokenizer, windows: dict[str, torch.Tensor], bf16: bool) -> dict:
    results = {}
    for name, ids in windows.items():
        result = perplexity(model, tokenizer, ids, bf16=bf16, progress=False)
        results[name] = {k: result[k] for k in ("ppl", "nll", "nll_stderr", "window_nll", "tokens", "seconds")}
    return results


class PeakUse:
    """Peak memory of a block above the memory before it, in MiB: CUDA allocations, else resident memory (the freed
    heap handed back to the system first, so that memory the block reuses counts: `trimmed`)."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated() / 2**20
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.rss = PeakMemory()
            self.before = self.rss.current_mib()
            self.rss.reset()
        return self

    def __exit__(self, *exc) -> None:
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else self.rss.peak_mib()
        self.record = {"kind": "cuda allocated" if torch.cuda.is_available() else "rss",
                       "before_mib": round(self.before, 1), "peak_extra_mib": round(peak - self.before, 1),
                       "trimmed": True}


def refit_record(report: dict, seconds: float, memory: dict) -> dict:
    """A record's "refit" entry from `reconstruct`'s report."""
    layers = report["layers"]
    return {"seconds": round(seconds, 1), "memory": memory,
            "settings": {k: report[k] for k in ("damping", "refit_holdout", "dampings_tried", "intercept",
                                                "normalised", "drift") if k in report},
            "mean_error_before": statistics.fmean(r["error_before"] for r in layers if "error_before" in r),
            "mean_error_after": statistics.fmean(r["error_after"] for r in layers if "error_after" in r),
            # with a holdout: how many layers chose each damping ("none": no refit)
            "dampings": dict(collections.Counter("none" if r["damping"] is None else f"{r['damping']:g}"
                                                 for r in layers if "damping" in r))}


def windows_to_refit(args, refit: str, calibration: torch.Tensor, tokenizer, seed: int, model
                     ) -> tuple[torch.Tensor, dict]:
    """`(windows, summary)`: the scoring windows (nuteprune: the first of its 500 training windows, as many as the
    scoring methods'), then, where the refit asks for more, more of the same source."""
    return extend_calibration(calibration[:args.calib_samples], REFITS[refit].refit_samples or args.calib_samples,
                              args.calib, tokenizer, seed=seed, model=model)


def run_choice(args, config: dict, model, tokenizer, calibration, summary, windows: dict,
               missing: list[str]) -> dict[str, dict]:
    """A method of CHOSEN choosing among candidates: one full choice per record in `missing`, each candidate's
    evaluation-set perplexities recorded beside its selection-window one."""
    selection = selection_windows(args.calib, tokenizer, seq_len=args.calib_seq_len, seed=config["seed"], model=model)
    records = {}
    for name in missing:
        refit = base_method(name)[1].removeprefix("+")
        start = time.perf_counter()
        with PeakUse() as memory:
            chosen = prune_and_refit(
                model, build(PruneConfig, config), calibration=(calibration, summary),
                refit=windows_to_refit(args, refit, calibration, tokenizer, config["seed"], model) if refit else None,
                reconstruction=REFITS[refit] if refit else None, selection=selection, batch_size=REFIT_MICRO_BATCH,
                inspect=lambda label: {"ppl": evaluate(model, tokenizer, windows, args.bf16)})
        seconds = time.perf_counter() - start
        result, choice = chosen.result, chosen.report
        passes = len(result.report["steps"]) * len(choice["candidates"])  # every candidate runs the same plan
        records[name] = {"method": name, "ratio": config["ratio"], "seed": config["seed"],
                         "config": {**config, "reconstruct": refit or "none"}, "achieved": result.report["achieved"],
                         "widths": result.masks.widths, "prune_seconds": round(seconds, 1),
                         "threads": torch.get_num_threads(),
                         "budget": {"passes": passes, "tokens": passes * summary["tokens"]}, "memory": memory.record,
                         "selection": choice, "ppl": choice["candidates"][choice["chosen"]]["ppl"]}
        if chosen.reconstruction is not None:  # the kept candidate's refit; prune_seconds holds every candidate's
            records[name]["refit"] = refit_record(chosen.reconstruction, chosen.reconstruction["seconds"],
                                                  memory.record)
        result.masks.remove()
    return records


def run_one(args, method: str, ratio: float, seed: int, windows: dict, missing: list[str]) -> dict[str, dict]:
    """Prune with `method`; evaluate the records named in `missing` ("<method>" and "<method>+<refit>"): records."""
    model, tokenizer = load_model(args.model)
    settings = dict(METHODS[method])
    learned = settings.pop("method", None) == "nuteprune"
    config = {**settings, "ratio": ratio, "seed": seed, "bf16": args.bf16}
    calibration, summary = load_calibration(args.calib, tokenizer, n_samples=NUTEPRUNE_WINDOWS if learned else
                                            args.calib_samples, seq_len=args.calib_seq_len, seed=seed, model=model)
    if method in CHOSEN:
        return run_choice(args, config, model, tokenizer, calibration, summary, windows, missing)
    start = time.perf_counter()
    with PeakUse() as memory:
        if learned:
            result = nuteprune(model, calibration=calibration, calibration_summary=summary, progress=False, **config)
            model = result.model
            plot_trajectory(result.log, args.results.parent / f"{args.results.stem}-{method}-{ratio}-{seed}.png")
        else:
            result = prune(model, calibration=calibration, calibration_summary=summary, **config)
    seconds = time.perf_counter() - start
    if learned:
        training = result.report["training"]
        budget = {"steps": training["steps"], "tokens": training["tokens"], "kv_heads": result.heads.kv_heads,
                  "final_expected_sparsity": training["final_expected_sparsity"],
                  "state_mib": result.report["memory_bytes"]["state_total"] / 2**20}
    else:
        passes = len(result.report["steps"])  # one pass over the windows per step (cold start included)
        budget = {"passes": passes, "tokens": passes * summary["tokens"]}
    common = {"method": method, "ratio": ratio, "seed": seed, "config": config,
              "achieved": result.report["achieved"], "widths": result.masks.widths,
              "prune_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "budget": budget,
              "memory": memory.record}
    records = {}
    if method in missing:
        records[method] = {**common, "ppl": evaluate(model, tokenizer, windows, args.bf16)}
    masks = result.masks
    compensation = list(masks.bias)  # flap's bias compensation: each refit starts from the plain masks
    for refit in REFITS:
        name = f"{method}+{refit}"
        if name not in missing:
            continue
        masks.bias = list(compensation)
        start = time.perf_counter()
        refit_ids, _ = windows_to_refit(args, refit, calibration, tokenizer, seed, model)
        with PeakUse() as refit_memory:
            report = reconstruct(model, masks, refit_ids, REFITS[refit], heads=result.heads if learned else None,
                                 micro_batch=REFIT_MICRO_BATCH, bf16=args.bf16)
        records[name] = {**common, "method": name, "config": {**config, "reconstruct": refit},
                         "refit": refit_record(report, time.perf_counter() - start, refit_memory.record),
                         "ppl": evaluate(model, tokenizer, windows, args.bf16)}
    return records


def method_names() -> list[str]:
    """Every record's method name in table order: each method, then its refits."""
    return [name for method in METHODS for name in (method, *(f"{method}+{refit}" for refit in REFITS))]


def base_method(name: str) -> tuple[str, str]:
    """("wanda-sp", "+one-shot") for "wanda-sp+one-shot"; ("wanda-sp", "") for "wanda-sp"."""
    method, plus, refit = name.partition("+")
    return (method, plus + refit) if refit in REFITS else (name, "")


def summarise(records: dict) -> dict:
    """(method, ratio) -> {eval set: {"mean", "std", "n", "values"}}."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for record in records.values():
        groups.setdefault((record["method"], record["ratio"]), []).append(record)
    summary = {}
    for key, group in groups.items():
        group.sort(key=lambda r: r["seed"])
        summary[key] = {}
        for name in group[0]["ppl"]:
            values = [r["ppl"][name]["ppl"] for r in group]
            summary[key][name] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
                "values": values,
                "seeds": [r["seed"] for r in group],
                # evaluation noise: relative PPL error from the window-to-window spread of the NLL
                "eval_rel_err": statistics.fmean(math.expm1(r["ppl"][name]["nll_stderr"]) for r in group),
            }
    return summary


def best_baseline(summary: dict, ratio: float, name: str, refit: str = "") -> str | None:
    """The baseline with the lowest mean PPL at `ratio` among those with the same refit suffix ("" or "+...")."""
    candidates = [m + refit for m in BASELINES if (m + refit, ratio) in summary]
    return min(candidates, key=lambda m: summary[(m, ratio)][name]["mean"]) if candidates else None


def two_sided_t_p_value(t: float, dof: int) -> float:
    """P(|T| >= |t|) for Student's t with `dof` (integer) degrees of freedom, in closed form (Abramowitz & Stegun
    26.7.3-4: a finite series in cos θ, θ = atan(|t| / sqrt(dof)))."""
    theta = math.atan(abs(t) / math.sqrt(dof))
    cos2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    for k in range(1 + dof % 2, dof - 2, 2):  # odd dof: ratios 2/3, 2·4/(3·5), ...; even: 1/2, 1·3/(2·4), ...
        term *= cos2 * k / (k + 1)
        total += term
    if dof % 2:
        inside = (2 / math.pi) * (theta + (math.sin(theta) * math.cos(theta) * total if dof > 1 else 0.0))
    else:
        inside = math.sin(theta) * total
    return max(0.0, 1.0 - inside)


def paired_difference(records: dict, method: str, baseline: str, ratio: float, name: str) -> dict | None:
    """PPL(method) - PPL(baseline) over shared seeds (same calibration windows, same evaluation windows).

    {"mean", "std" (over seeds), "n", "p", "eval_rel_err"}: `p` is the two-sided paired t-test's p-value over
    seeds (None below 2 seeds); the last is the evaluation noise of the difference, the standard error of the
    mean per-window NLL difference as a relative PPL error, averaged over seeds.
    """
    by_seed: dict[int, dict[str, dict]] = {}
    for record in records.values():
        if record["ratio"] == ratio and record["method"] in (method, baseline):
            by_seed.setdefault(record["seed"], {})[record["method"]] = record["ppl"][name]
    # a seed-free baseline (magnitude) is paired with every seed of the method
    if baseline in SEED_FREE:
        fixed = next((pair[baseline] for pair in by_seed.values() if baseline in pair), None)
        by_seed = {seed: {**pair, baseline: fixed} for seed, pair in by_seed.items() if fixed and method in pair}
    pairs = [pair for pair in by_seed.values() if len(pair) == 2]
    if not pairs:
        return None
    diffs = [pair[method]["ppl"] - pair[baseline]["ppl"] for pair in pairs]
    noise = []
    for pair in pairs:
        window_diff = [a - b for a, b in zip(pair[method]["window_nll"], pair[baseline]["window_nll"], strict=True)]
        noise.append(math.expm1(statistics.stdev(window_diff) / math.sqrt(len(window_diff))))
    mean, std = statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    p = None
    if len(diffs) > 1:
        if std > 0:
            p = two_sided_t_p_value(mean / (std / math.sqrt(len(diffs))), len(diffs) - 1)
        else:  # every seed the same difference: certain if it is not zero, no evidence at all if it is
            p = 0.0 if mean else 1.0
    return {"mean": mean, "std": std, "n": len(diffs), "p": p, "eval_rel_err": statistics.fmean(noise)}


def markdown(results: dict) -> str:
    records, meta = results["records"], results["settings"]
    summary = summarise(records)
    ratios = sorted({ratio for _, ratio in summary})
    methods = [m for m in method_names() if any((m, r) in summary for r in ratios)]
    dense = results.get("dense", {})
    calib, evaluation, sets = meta["calibration"], meta["evaluation"], eval_sets(meta)
    code = evaluation["sets"].get("code")
    lines = [
        f"# Quality benchmark: {meta['model']}, MLP neurons pruned, no recovery",
        "",
        f"Calibration: {calib['samples']} windows × {calib['seq_len']} tokens ({calib['tokens']:,} tokens) from "
        f"{calib['source']}, drawn per seed; every method sees the same windows for a seed. Evaluation: first "
        f"{evaluation['max_tokens']:,} tokens of each set, non-overlapping windows of {evaluation['seq_len']}. "
        + (f"Code: the source files directly inside {code}, joined in name order. " if code else "")
        + f"bf16 autocast: {meta['bf16']}. Cells: mean ± sample std of PPL over seeds (n = seeds); "
        "`ev±` is the evaluation noise (relative PPL error from the spread across windows).",
        "",
        "Rows: `random` … `flap-global` are the baselines as their authors score neurons (flap with its bias "
        "compensation), `sdmprune` is the paper's method (weight-space Taylor, official α/T, 2.5% cold start), "
        "`sdmprune-*` are our variants of it (importance in activation space, +bias = FLAP's compensation "
        "added); `sdmprune-activation-wanda` is our preset "
        "(`--importance activation-wanda`, the Python `prune()`'s default). Uniform widths for every scoring method "
        "but the `-global` rows. `sdmprune-auto` (`--importance auto`, the default of `sdmprune prune` and "
        "`compress`): the preset and `sdmprune`'s "
        "score each run and refitted, the one with the lower perplexity on further calibration windows kept (records "
        "only with a refit; see its table); `sdmprune-auto-global25`: the same with `--allocation global`. "
        "`sdmprune-steps4` / `sdmprune-progressive`: the preset over 4 prune-and-rescore steps with the dense "
        "teacher / with the previous step's student as teacher. `nuteprune`: masks learned over key/value groups "
        "and MLP neurons (widths and head counts differ per layer) with LoRA merged, trained on its own "
        f"{NUTEPRUNE_WINDOWS} windows of the seed (see the cost table). `-global`: FLAP's non-uniform widths "
        "(standardised scores ranked across layers, unbounded; `flap-global` is FLAP as its authors run it); "
        "`-global25` / `-global50`: the same with every layer within ±25% (`--allocation global`'s default "
        "`--width-band`) / ±50% of the uniform width. "
        "`+one-shot` / `+sequential`: the same masks with the kept "
        "down_proj weights (and for nuteprune o_proj's) refitted by `--reconstruct` (damping 1e-4, its default token "
        "weights and drift; on the seed's calibration windows, for nuteprune the first of its training windows, "
        "as many), replacing flap's compensation bias; `+one-shot-holdout` / `+sequential-holdout`: the same with "
        "the default `--refit-holdout 0.125`: each layer's damping (1e-4, 3e-3 or 0.1, or no refit) chosen on the "
        "last eighth of the windows, then solved on all of them; `+sequential-holdout4`: 3 as a fourth candidate "
        "(`--refit-candidates 4`); `+sequential-holdout-128` (the package's default): on 128 windows, the seed's "
        "calibration windows and more of the same source (`--refit-samples 128`); `+sequential-holdout4-128`: the same "
        "with the fourth damping; `+sequential-holdout-128-top0.3` / `-top0.03`: the same with the three candidates "
        "shifted up (3e-4, 9e-3, 0.3) or down (3e-5, 9e-4, 0.03) by a factor of 3 (`--damping 3e-4` / `3e-5`).",
        "",
        "Commands: " + "; ".join(f"`{command}`" for command in results.get(
            "commands", ["SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/quality.py"])),
        "",
    ]
    if dense:
        lines += ["Dense: " + ", ".join(f"{title} {dense[n]['ppl']:.2f}" for n, title in sets.items()), ""]
    for name, title in sets.items():
        lines += [f"## {title} perplexity", "", "| method | " + " | ".join(f"{r:.0%}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for method in methods:
            cells = []
            for ratio in ratios:
                cell = summary.get((method, ratio), {}).get(name)
                cells.append("" if cell is None else f"{cell['mean']:.2f} ± {cell['std']:.2f} (n={cell['n']})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        noise = [cell[name]["eval_rel_err"] for cell in summary.values()]
        lines += ["", "Absolute evaluation noise (window-to-window spread, the same windows for every model): "
                  f"{min(noise):.1%}–{max(noise):.1%} of PPL; differences between models are far less noisy "
                  "(below).", ""]
        lines += [f"Paired difference to the best baseline with the same refit (same seeds), {title}: "
                  "PPL(method) − PPL(baseline), mean ± std over seeds; p: two-sided paired t-test over seeds; "
                  "ev± is the evaluation noise of the difference (relative, from the per-window NLL differences).",
                  "",
                  "| method | " + " | ".join(f"{r:.0%}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
        for method in methods:
            if base_method(method)[0] in BASELINES:
                continue
            cells = []
            for ratio in ratios:
                baseline = best_baseline(summary, ratio, name, base_method(method)[1])
                diff = paired_difference(records, method, baseline, ratio, name) if baseline else None
                p = "" if diff is None or diff["p"] is None else f", p={diff['p']:.3f}"
                cells.append("" if diff is None else f"{diff['mean']:+.2f} ± {diff['std']:.2f} vs {baseline} "
                             f"(n={diff['n']}{p}, ev±{diff['eval_rel_err']:.1%})")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        refitted = [m for m in methods if base_method(m)[1]]
        if refitted:
            lines += [f"Gain of the refit, {title}: PPL(method + refit) − PPL(method), the same masks (paired seeds), "
                      "mean ± std over seeds.", "",
                      "| method | " + " | ".join(f"{r:.0%}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
            for method in refitted:
                diffs = [paired_difference(records, method, base_method(method)[0], ratio, name) for ratio in ratios]
                lines.append(f"| {method} | " + " | ".join("" if d is None else f"{d['mean']:+.2f} ± {d['std']:.2f} "
                                                           f"(n={d['n']})" for d in diffs) + " |")
            lines.append("")
    return "\n".join(lines + choice_table(records, sets) + cost_table(records))


def choice_table(records: dict, sets: dict[str, str]) -> list[str]:
    """Per record of a choosing method (CHOSEN): each candidate's selection-window and evaluation-set perplexities,
    the kept one in bold."""
    chosen = sorted((key for key, record in records.items() if "selection" in record),
                    key=lambda key: (records[key]["method"], records[key]["ratio"], records[key]["seed"]))
    if not chosen:
        return []
    lines = ["## The choice of `--importance auto`", "",
             "Each candidate scored, masked and refitted; kept: the lower perplexity on the selection windows "
             "(further calibration windows, their own seed), in bold. Evaluation sets measured on every candidate "
             "to check the choice.", "",
             "| record | ratio | seed | candidate | selection PPL | " + " | ".join(sets.values()) + " |",
             "|---|---|---|---|---|" + "---|" * len(sets)]
    for key in chosen:
        record = records[key]
        for label, candidate in record["selection"]["candidates"].items():
            mark = "**" if label == record["selection"]["chosen"] else ""
            lines.append(f"| {record['method']} | {record['ratio']:.0%} | {record['seed']} | {mark}{label}{mark} | "
                         f"{candidate['selection_ppl']:.2f} | "
                         + " | ".join(f"{candidate['ppl'][name]['ppl']:.2f}" for name in sets) + " |")
    return [*lines, "", *choice_gain_table(records, chosen, sets)]


def choice_gain_table(records: dict, chosen: list[str], sets: dict[str, str]) -> list[str]:
    """Per (choosing method, ratio, candidate): PPL(kept) − PPL(candidate) paired over seeds on each evaluation
    set, i.e. what choosing gained over always running that one candidate."""
    as_records = {f"{key}|{label}": {"method": f"{records[key]['method']}:{label}", "ratio": records[key]["ratio"],
                                     "seed": records[key]["seed"], "ppl": candidate["ppl"]}
                  for key in chosen for label, candidate in records[key]["selection"]["candidates"].items()}
    both = {**{key: records[key] for key in chosen}, **as_records}
    groups = sorted({(records[key]["method"], records[key]["ratio"], label)
                     for key in chosen for label in records[key]["selection"]["candidates"]})
    lines = ["Kept against always running one candidate: PPL(kept) − PPL(candidate), paired over seeds, mean ± std "
             "(n; p: two-sided paired t-test over seeds, from 2 seeds).", "",
             "| record | ratio | candidate | " + " | ".join(sets.values()) + " |", "|---|---|---|" + "---|" * len(sets)]
    for method, ratio, label in groups:
        cells = []
        for name in sets:
            diff = paired_difference(both, method, f"{method}:{label}", ratio, name)
            p = "" if diff["p"] is None else f", p={diff['p']:.3f}"
            cells.append(f"{diff['mean']:+.2f} ± {diff['std']:.2f} (n={diff['n']}{p})")
        lines.append(f"| {method} | {ratio:.0%} | {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def cost_table(records: dict) -> list[str]:
    """Mean time, tokens seen and peak memory of the pruning call per (method, ratio), for records that have them."""
    by_seed: dict[tuple[str, float], dict[int, dict]] = {}  # a refit record carries its masks' pruning call
    for record in records.values():
        if "memory" in record:
            by_seed.setdefault((base_method(record["method"])[0], record["ratio"]), {})[record["seed"]] = record
    groups = {key: list(seeds.values()) for key, seeds in by_seed.items()}
    if not groups:
        return []
    lines = ["## Cost of the pruning call", "",
             "Tokens: calibration tokens × scoring passes (cold start included; each pass also runs the teacher on "
             "them), or NutePrune's training tokens (one teacher forward and one student forward + backward each). "
             "Peak extra memory: peak resident memory during the call minus the memory before it (the model's "
             "weights are already loaded: the teacher's and the method's own memory, activations, gradients).", "",
             "| method | ratio | seconds | threads | tokens | peak extra memory (MiB) | NutePrune state (MiB) | n |",
             "|---|---|---|---|---|---|---|---|"]
    for (method, ratio), group in sorted(groups.items(), key=lambda item: (item[0][1], method_names().index(
            item[0][0]))):
        state = [r["budget"]["state_mib"] for r in group if "state_mib" in r["budget"]]
        lines.append(f"| {method} | {ratio:.0%} | {statistics.fmean(r['prune_seconds'] for r in group):.0f} | "
                     f"{', '.join(sorted({str(r['threads']) for r in group}))} | {group[0]['budget']['tokens']:,} | "
                     f"{statistics.fmean(r['memory']['peak_extra_mib'] for r in group):.0f} | "
                     f"{f'{statistics.fmean(state):.1f}' if state else ''} | {len(group)} |")
    return [*lines, "", *refit_cost_table(records)]


def refit_cost_table(records: dict) -> list[str]:
    """Mean time and peak memory of the reconstruction stage per (method, ratio), and its layer errors."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for record in records.values():
        if "refit" in record:
            groups.setdefault((record["method"], record["ratio"]), []).append(record)
    if not groups:
        return []
    lines = ["## Cost of the reconstruction stage", "",
             "Seconds and peak extra memory of `reconstruct` alone (after the masks; the model's weights already "
             "loaded; the first records measured no memory), and the layers' relative squared errors "
             "Σ w‖T − W u‖² / Σ w‖T‖² on the calibration tokens (mean over pruned layers) before (the plain masked "
             "layer) and after the refit.", "",
             "| method | ratio | seconds | threads | peak extra memory (MiB) | layer error before → after | n |",
             "|---|---|---|---|---|---|---|"]
    for (method, ratio), group in sorted(groups.items(), key=lambda item: (item[0][1], method_names().index(
            item[0][0]))):
        refits = [r["refit"] for r in group]
        trimmed = [r["memory"]["peak_extra_mib"] for r in refits if r["memory"].get("trimmed")]
        lines.append(f"| {method} | {ratio:.0%} | {statistics.fmean(r['seconds'] for r in refits):.0f} | "
                     f"{', '.join(sorted({str(r['threads']) for r in group}))} | "
                     f"{f'{statistics.fmean(trimmed):.0f}' if trimmed else ''} | "
                     f"{statistics.fmean(r['mean_error_before'] for r in refits):.3f} → "
                     f"{statistics.fmean(r['mean_error_after'] for r in refits):.3f} | {len(group)} |")
    return [*lines, ""]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(results["records"])
    sets = eval_sets(results["settings"])
    figure, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5))
    for axis, (name, title) in zip(axes, sets.items(), strict=True):
        for method in method_names():
            points = sorted((ratio, cell[name]) for (m, ratio), cell in summary.items() if m == method)
            if not points or method == "random" or method.startswith("magnitude"):
                continue
            refit = base_method(method)[1]
            axis.errorbar([100 * r for r, _ in points], [c["mean"] for _, c in points],
                          yerr=[c["std"] for _, c in points], marker={"": "o", "+one-shot": "s"}.get(refit, "^"),
                          capsize=3, label=method, linestyle="--" if base_method(method)[0] in BASELINES else "-")
        if "dense" in results:
            axis.axhline(results["dense"][name]["ppl"], color="gray", linewidth=0.8, label="dense")
        axis.set(title=f"{title} PPL (no recovery)", xlabel="parameters removed (%)", ylabel="perplexity",
                 yscale="log")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_reports(results: dict, json_path: Path) -> None:
    save_json(json_path, results)
    json_path.with_suffix(".md").write_text(markdown(results))
    plot(results, json_path.with_suffix(".png"))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = load_results(args.results, settings(args))
    if args.calib != "self":
        load_documents(args.calib)  # a wrong source fails now, not after the dense evaluation
    texts = {name: load_text(name) for name in EVAL_SETS}
    if args.eval_code:
        texts["code"] = "\n\n".join(load_documents(str(args.eval_code)))
    command = "SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/quality.py " + " ".join(argv or sys.argv[1:])
    if command.strip() not in results.setdefault("commands", []):
        results["commands"].append(command.strip())
    model, tokenizer = load_model(args.model)
    windows = {name: tokenize_windows(tokenizer, text, args.eval_seq_len, args.eval_tokens, model)
               for name, text in texts.items()}
    if "dense" not in results or args.force:
        results["dense"] = evaluate(model, tokenizer, windows, args.bf16)
    del model
    plan = [(m, r, s) for r in args.ratios for m in args.methods
            for s in (args.seeds[:1] if m in SEED_FREE else args.seeds)]
    for index, (method, ratio, seed) in enumerate(plan, 1):
        refitted = [f"{method}+{refit}" for refit in args.refits] if method in REFITTED else []
        wanted = (refitted or [method]) if method in CHOSEN else [method, *refitted]
        missing = [name for name in wanted if args.force or f"{name}|{ratio}|{seed}" not in results["records"]]
        if not missing:
            continue
        print(f"[{index}/{len(plan)}] {method} ratio={ratio} seed={seed}: {', '.join(missing)}", flush=True)
        for name, record in run_one(args, method, ratio, seed, windows, missing).items():
            results["records"][f"{name}|{ratio}|{seed}"] = record
            print(f"   {name}: " + ", ".join(f"{n} {v['ppl']:.2f}" for n, v in record["ppl"].items())
                  + f"  (prune {record['prune_seconds']} s"
                  + (f", refit {record['refit']['seconds']} s)" if "refit" in record else ")"), flush=True)
        write_reports(results, args.results)
    write_reports(results, args.results)


if __name__ == "__main__":
    main()
