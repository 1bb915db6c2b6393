"""Command line: `sdmprune prune | eval | finetune | inspect` (each has --help)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path

from .allocation import ALLOCATIONS
from .criteria import CRITERIA, get_criterion
from .criteria.sdmprune import IMPORTANCES
from .data import TEXT_DATASETS, load_calibration, load_text
from .distributed import barrier, init_from_env, is_main, is_sharded, shard_model, shutdown, world_size
from .errors import SdmpruneError
from .evaluation.perplexity import perplexity, tokenize_windows
from .evaluation.tasks import ALL_TASKS, evaluate_tasks, parse_task_names, resolve_tasks, write_results
from .export import export_pruned, unshard_for_export
from .io import check_output_dir
from .masks import count_parameters
from .models import DEFAULT_MODEL, load_model
from .nuteprune import NutePruneConfig, nuteprune, write_training_outputs
from .pruning import PruneConfig, prune
from .recovery import FinetuneConfig, finetune, load_adapter
from .recovery.finetune import is_adapter_dir
from .schedule import STATE_JSON, check_plan, uses_bias_compensation
from .teacher import TEACHERS


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"hub id, local HF directory, .gguf file, or '{DEFAULT_MODEL}' (bundled; default)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype; auto = bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow custom model code from the hub (off by default)")


def _add_ppl_args(
    parser: argparse.ArgumentParser, *, default_data: str | None, default_tokens: int | None, bf16_flag: bool = True
) -> None:
    names = ", ".join(TEXT_DATASETS)
    parser.add_argument("--ppl-data", default=default_data,
                        help=f"perplexity text: a .txt/.raw/.jsonl file or a dataset name ({names}); "
                             "'none' skips it")
    parser.add_argument("--data-dir", default=None,
                        help="local directory holding the named datasets (default: $SDMPRUNE_DATA_DIR; "
                             "unset = Hugging Face hub)")
    parser.add_argument("--seq-len", type=int, default=512, help="perplexity window length in tokens")
    parser.add_argument("--max-tokens", type=int, default=default_tokens,
                        help="use only the first N tokens of the text (0 = all)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    if bf16_flag:  # `prune` has one --bf16 (a PruneConfig field) for scoring and evaluation alike
        parser.add_argument("--bf16", action="store_true", help="bf16 autocast for evaluation (CPU and GPU)")


METHODS = {
    "scoring": "score MLP neurons with --criterion and remove the least important (SDMPrune and the baselines)",
    "nuteprune": "learn hard-concrete masks over attention heads (key/value groups) and MLP neurons with LoRA and "
                 "numerous teachers from the same model (NutePrune); --calib windows are its training data",
}
CHOICES = {"criterion": sorted(CRITERIA), "allocation": list(ALLOCATIONS), "teacher": list(TEACHERS),
           "importance": list(IMPORTANCES)}


def _add_dataclass_args(parser: argparse.ArgumentParser, config_class, title: str, extra_help: dict | None = None,
                        skip: set[str] | None = None):
    """One option per field of a config dataclass (PruneConfig, FinetuneConfig), its help taken from the field;
    fields named in `skip` are left out (already defined by another config)."""
    group = parser.add_argument_group(title)
    for f in fields(config_class):
        if f.name in (skip or set()):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + (extra_help or {}).get(f.name, "")
        kind = f.type.split("|")[0].strip()
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        kind = {"int": int, "float": float, "str": str}[kind]
        required = f.default is MISSING
        group.add_argument(flag, type=kind, required=required, default=None if required else f.default,
                           choices=CHOICES.get(f.name), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdmprune",
        description="Structured pruning of causal LMs' MLP neurons, exported as plain Hugging Face models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser(
        "prune", help="prune a model and export it",
        description="Score MLP neurons, remove the least important, report perplexity before and after, and "
                    "write a Hugging Face directory (+ pruning.json, model card) that loads with plain "
                    "transformers. Example: sdmprune prune --ratio 0.2 --output runs/smollm2-p20",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_args(p)
    p.add_argument("--method", default="scoring", choices=list(METHODS),
                   help="; ".join(f"{name}: {text}" for name, text in METHODS.items()))
    criteria = "; ".join(f"{c.name}: {c.description}" for c in CRITERIA.values())
    _add_dataclass_args(p, PruneConfig, "pruning", {"criterion": f" ({criteria})"})
    _add_dataclass_args(p, NutePruneConfig, "nuteprune (--method nuteprune; --ratio, --bf16, --seed as above)",
                        skip={f.name for f in fields(PruneConfig)})
    calib = p.add_argument_group("calibration (criteria that need data)")
    calib.add_argument("--calib", default="c4",
                       help="a .txt/.jsonl file or directory, a dataset name (c4, wikitext2), or 'self' "
                            "(text sampled from the model itself)")
    calib.add_argument("--calib-samples", type=int, default=64, help="number of calibration windows")
    calib.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window")
    calib.add_argument("--calib-temperature", type=float, default=1.0, help="--calib self: sampling temperature")
    calib.add_argument("--calib-top-p", type=float, default=0.95, help="--calib self: nucleus sampling top-p")
    p.add_argument("--output", required=True, help="directory to write the pruned model to (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the state saved in --output after each step")
    p.add_argument("--fsdp", action="store_true",
                   help="shard the model over the processes of a torchrun / accelerate launch with FSDP2 (for models "
                        "that do not fit on one device); every process must pass it")
    p.add_argument("--padded", action="store_true",
                   help="if widths differ per layer, zero-pad every layer to the widest so plain transformers loads it")
    _add_ppl_args(p, default_data="wikitext2", default_tokens=16384, bf16_flag=False)

    e = commands.add_parser(
        "eval", help="perplexity and zero-shot tasks of a model (or of a LoRA adapter directory)",
        description="Perplexity over non-overlapping windows (--ppl-data, default wikitext2 unless --tasks) and "
                    "zero-shot tasks through lm-evaluation-harness (--tasks). Examples: "
                    "sdmprune eval --model runs/smollm2-p20 --ppl-data wikitext2 --max-tokens 16384; "
                    "sdmprune eval --model runs/smollm2-p20 --tasks sdmprune --limit 200 --output runs/p20-eval",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_args(e)
    _add_ppl_args(e, default_data=None, default_tokens=0)
    e.add_argument("--tasks", default=None,
                   help=f"comma-separated zero-shot tasks; with --data-dir / $SDMPRUNE_DATA_DIR the shipped local "
                        f"ones ({', '.join(ALL_TASKS)}; 'sdmprune' = the paper's 10, 'all' = all 12), else any "
                        "task the harness knows (online)")
    e.add_argument("--limit", type=int, default=None, help="--tasks: evaluate only the first N items of each task")
    e.add_argument("--output", default=None,
                   help="perplexity only: results JSON path (default: eval-<data>.json inside a local model "
                        "directory); with --tasks: directory for results.json and results.md (default: "
                        "eval-tasks/ inside a local model directory)")

    f = commands.add_parser(
        "finetune", help="LoRA recovery of a (pruned) model on instruction data",
        description="LoRA fine-tuning on Alpaca-format instruction data (prompt masked, EOS appended), optionally "
                    "distilling from the dense original (--kd). Writes the adapter, loss.json/.png, recovery.json "
                    "and with --merge a standalone merged/ model. Example: sdmprune finetune --model runs/p20 "
                    "--data ../shared/data/instruct/alpaca_data_1k.json --epochs 1 --merge --output runs/p20-lora",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_args(f)
    _add_dataclass_args(f, FinetuneConfig, "recovery")
    f.add_argument("--output", required=True, help="directory to write the adapter (and merged/) to (must not exist)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    f.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from the checkpoint saved in --output (same settings)")

    i = commands.add_parser(
        "inspect", help="layers, widths and parameter counts of a model",
        description="Example: sdmprune inspect runs/smollm2-p20",
    )
    i.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model spec, as for --model")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _load(args) -> tuple:
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code)
    if is_main():
        print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model, tokenizer


def _ppl_windows(args, model, tokenizer):
    if args.ppl_data in (None, "none"):
        return None
    text = load_text(args.ppl_data, args.data_dir)
    return tokenize_windows(tokenizer, text, args.seq_len, args.max_tokens or None, model)


def _calibration(args, model, tokenizer, seed: int) -> tuple:
    """`(windows (N, S), summary)` from --calib and its options."""
    return load_calibration(
        args.calib, tokenizer, n_samples=args.calib_samples, seq_len=args.calib_seq_len, seed=seed,
        model=model, data_dir=args.data_dir, temperature=args.calib_temperature, top_p=args.calib_top_p,
    )


def _print_perplexity_change(args, evaluation: dict) -> None:
    if evaluation:
        b, a = evaluation["before"], evaluation["after"]
        print(f"perplexity ({args.ppl_data}, {b['tokens']} tokens, windows of {b['seq_len']}): "
              f"{b['ppl']:.2f} -> {a['ppl']:.2f}")


def _ppl(args, model, tokenizer, windows) -> dict:
    result = perplexity(model, tokenizer, windows, batch_size=args.batch_size, bf16=args.bf16)
    return {"data": args.ppl_data, **result}


def _prepare_output(args) -> bool:
    """Check --output/--overwrite/--resume before any work; True if a saved run state is resumed."""
    output = Path(args.output)
    interrupted = (output / STATE_JSON).is_file() and not (output / "pruning.json").is_file()
    if args.resume:
        if not interrupted:
            raise SdmpruneError(f"nothing to resume: {output} holds no interrupted run")
        return True
    if interrupted and not args.overwrite:
        raise SdmpruneError(f"{output} holds an interrupted run: pass --resume to continue it or --overwrite "
                            "to start over")
    check_output_dir(output, args.overwrite)
    return False


def _reject_options_of_other_method(args, used, other) -> None:
    """Options of the `other` method's config that `used` lacks must keep their defaults."""
    names = {f.name for f in fields(used)}
    for f in fields(other):
        if f.name not in names and getattr(args, f.name) != f.default:
            raise SdmpruneError(f"--{f.name.replace('_', '-')} does not apply to --method {args.method}")


def run_prune(args) -> None:
    if args.ratio is None and args.mlp_ratio is None:
        args.ratio = 0.2
    if args.method == "nuteprune":
        run_nuteprune(args)
        return
    _reject_options_of_other_method(args, PruneConfig, NutePruneConfig)
    config = PruneConfig(**{f.name: getattr(args, f.name) for f in fields(PruneConfig)})
    config.validate()
    resume = _prepare_output(args)

    if args.fsdp:
        args.device = "cpu"  # fully_shard moves each process's shard to its own GPU (or keeps it on the CPU)
    model, tokenizer = _load(args)
    if args.fsdp:
        shard_model(model)
    windows = _ppl_windows(args, model, tokenizer)
    before_count = count_parameters(model)
    check_plan(model, config)
    evaluation = {}
    if windows is not None:
        evaluation["before"] = _ppl(args, model, tokenizer, windows)
    calibration, calibration_summary = None, None
    if get_criterion(config.criterion).needs_calibration or uses_bias_compensation(config, model):
        calibration, calibration_summary = _calibration(args, model, tokenizer, config.seed)
    if Path(args.output).exists() and not resume and is_main():
        shutil.rmtree(args.output)  # --overwrite: the run state goes into the output directory
    barrier()
    result = prune(model, config, calibration=calibration, calibration_summary=calibration_summary,
                   state_dir=args.output, resume=resume)
    if windows is not None:
        evaluation["after"] = _ppl(args, model, tokenizer, windows)
    report = {**result.report, "source_model": args.model, "evaluation": evaluation}
    exported = unshard_for_export(model, result.masks) if is_sharded(model) else (model, result.masks)
    if not is_main():  # rank 0 exports and reports
        return
    export_model, export_masks = exported
    # The output directory holds the run state until the export replaces it.
    export_pruned(export_model, tokenizer, export_masks, args.output, report=report, overwrite=True,
                  padded=args.padded)

    achieved = result.report["achieved"]
    print(f"\n{args.model} -> {args.output}  ({config.criterion}, {config.allocation})")
    requested = f"ratio {config.ratio}" if config.ratio is not None else f"mlp-ratio {config.mlp_ratio}"
    print(f"requested {requested}; achieved ratio {achieved['ratio']:.4f} of total parameters, "
          f"{achieved['mlp_ratio']:.4f} of MLP neurons")
    print(f"parameters {before_count.total:,} -> {achieved['params_after']:,}; "
          f"MLP width {before_count.widths[0]} -> {min(result.masks.widths) if result.masks.keep else 0}")
    _print_perplexity_change(args, evaluation)
    print(f"wrote {args.output}/ (pruning.json, README.md, model.safetensors)")


def run_nuteprune(args) -> None:
    """`prune --method nuteprune`: masks learned with LoRA and numerous teachers, then the same export."""
    _reject_options_of_other_method(args, NutePruneConfig, PruneConfig)
    if args.fsdp or world_size() > 1:
        raise SdmpruneError("--method nuteprune runs in one process: launch it without torchrun / accelerate "
                            "and without --fsdp")
    config = NutePruneConfig(**{f.name: getattr(args, f.name) for f in fields(NutePruneConfig)})
    config.validate()
    resume = _prepare_output(args)
    model, tokenizer = _load(args)
    windows = _ppl_windows(args, model, tokenizer)
    evaluation = {"before": _ppl(args, model, tokenizer, windows)} if windows is not None else {}
    calibration, calibration_summary = _calibration(args, model, tokenizer, config.seed)
    if Path(args.output).exists() and not resume:
        shutil.rmtree(args.output)  # --overwrite: the run state goes into the output directory
    result = nuteprune(model, config, calibration=calibration, calibration_summary=calibration_summary,
                       state_dir=args.output, resume=resume)
    if windows is not None:
        evaluation["after"] = _ppl(args, result.model, tokenizer, windows)
    report = {**result.report, "source_model": args.model, "evaluation": evaluation}
    # The output directory holds the run state until the export replaces it.
    export_pruned(result.model, tokenizer, result.masks, args.output, report=report, overwrite=True,
                  padded=args.padded, heads=result.heads, extra=lambda tmp: write_training_outputs(result.log, tmp))

    achieved, training, memory = report["achieved"], report["training"], report["memory_bytes"]
    print(f"\n{args.model} -> {args.output}  (nuteprune, {training['steps']} steps)")
    print(f"requested ratio {config.ratio}; achieved ratio {achieved['ratio']:.4f} of total parameters "
          f"({achieved['mlp_ratio']:.4f} of MLP neurons, {achieved['kv_head_ratio']:.4f} of key/value heads); "
          f"expected sparsity at the end of training {training['final_expected_sparsity']:.4f}")
    print(f"parameters {achieved['params_before']:,} -> {achieved['params_after']:,}; MLP widths "
          f"{min(report['widths'])}..{max(report['widths'])}, key/value heads {min(report['kv_heads'])}.."
          f"{max(report['kv_heads'])} per layer")
    print(f"training: {training['tokens']:,} tokens in {training['seconds']:.0f} s; memory beyond the weights "
          f"{memory['state_total'] / 2**20:.2f} MiB (weights {memory['model_weights'] / 2**20:.1f} MiB)")
    _print_perplexity_change(args, evaluation)
    print(f"wrote {args.output}/ (pruning.json, README.md, model.safetensors, nuteprune_log.json, nuteprune.png)")


def run_eval(args) -> None:
    names = parse_task_names(args.tasks) if args.tasks else None
    if args.ppl_data is None:
        args.ppl_data = "none" if names else "wikitext2"
    output = args.output
    if output is None and Path(args.model).is_dir():
        output = Path(args.model) / ("eval-tasks" if names else f"eval-{Path(args.ppl_data).stem}.json")
    if names and output is None:
        raise SdmpruneError("--tasks writes results.json and results.md: pass --output DIR")
    if args.limit is not None and args.limit < 1:
        raise SdmpruneError(f"--limit must be at least 1, got {args.limit}")
    selection = resolve_tasks(names, args.data_dir) if names else None  # fail before loading the model
    if is_adapter_dir(args.model):
        model, tokenizer = load_adapter(args.model, dtype=args.dtype, device=args.device,
                                        trust_remote_code=args.trust_remote_code)
    else:
        model, tokenizer = _load(args)
    windows = _ppl_windows(args, model, tokenizer)
    if windows is None and not names:
        raise SdmpruneError("nothing to evaluate: pass --ppl-data or --tasks")
    result = {"model": args.model}
    if windows is not None:  # several processes: each evaluates a share of the windows
        result["perplexity"] = ppl = _ppl(args, model, tokenizer, windows)
    if not is_main():  # rank 0 alone runs the zero-shot tasks and writes the results
        return
    if windows is not None:
        print(f"perplexity {ppl['ppl']:.3f} on {args.ppl_data} ({ppl['tokens']} tokens, windows of "
              f"{ppl['seq_len']}, {ppl['tokens_per_s']:.0f} tokens/s)")
    if names:
        result |= evaluate_tasks(model, tokenizer, selection, limit=args.limit, batch_size=args.batch_size,
                                 bf16=args.bf16)
        for name, r in result["tasks"].items():
            print(f"{name:15s} {r['metric']:15s} {100 * r['value']:6.2f}  (n={r['n']})")
        if result["average"] is not None:
            print(f"{'average (10)':31s} {100 * result['average']:6.2f}")
        write_results(result, output, title=f"Zero-shot results: {args.model}")
        print(f"wrote {output}/results.json and results.md ({result['seconds']:.0f} s)")
        return
    if output is not None:
        Path(output).write_text(json.dumps(result, indent=1))
        print(f"wrote {output}")


def run_finetune(args) -> None:
    config = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    record = finetune(args.model, args.output, config, dtype=args.dtype, device=args.device,
                      trust_remote_code=args.trust_remote_code, overwrite=args.overwrite, resume=args.resume)
    if not is_main():  # rank 0 wrote the outputs and reports
        return
    teacher = f", KD from {record['teacher']}" if config.kd else ""
    print(f"\n{args.model} -> {args.output}  (LoRA r={config.lora_r}{teacher})")
    print(f"{record['steps']} steps ({record['epochs']:.2f} epochs of {record['examples']} examples), "
          f"{record['tokens']:,} tokens in {record['seconds']:.0f} s ({record['tokens_per_s']:.0f} tokens/s); "
          f"final loss {record['final_loss']:.4f}")
    print(f"wrote {args.output}/ (adapter, loss.json, loss.png, recovery.json{', merged/' if config.merge else ''})")


def run_inspect(args) -> None:
    if not is_main():  # nothing to share out: rank 0 answers
        return
    model, _ = load_model(args.model, device="cpu")
    count = count_parameters(model)
    info = {
        "model": args.model,
        "model_type": model.config.model_type,
        "layers": len(count.widths),
        "hidden_size": model.config.hidden_size,
        "params_total": count.total,
        "params_mlp": count.mlp,
        "widths": count.widths,
        "mlp_params_per_layer": count.mlp_per_layer,
    }
    record = Path(args.model) / "pruning.json"
    if record.is_file():
        pruning = json.loads(record.read_text())
        info["pruning"] = {k: pruning[k] for k in ("method", "requested", "achieved", "widths", "export")}
    if args.json:
        print(json.dumps(info, indent=1))
        return
    print(f"{args.model}: {info['model_type']}, {info['layers']} layers, hidden {info['hidden_size']}")
    print(f"parameters: {count.total:,} total, {count.mlp:,} in MLPs ({count.mlp / count.total:.1%})")
    widths = info.get("pruning", {}).get("widths", count.widths)
    print("layer  MLP width  MLP params")
    for layer, (width, params) in enumerate(zip(widths, count.mlp_per_layer, strict=True)):
        print(f"{layer:5d}  {width:9d}  {params:10,}")
    if "pruning" in info:
        p = info["pruning"]
        print(f"pruned with {p['method']}: requested {p['requested']}, achieved ratio {p['achieved']['ratio']:.4f}"
              f", layout {p['export']['layout']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    joined = init_from_env()  # under torchrun / accelerate launch: join the other processes
    try:
        {"prune": run_prune, "eval": run_eval, "finetune": run_finetune, "inspect": run_inspect}[args.command](args)
    except SdmpruneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if joined:
            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
