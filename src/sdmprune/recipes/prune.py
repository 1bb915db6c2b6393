"""Recipe `prune` (method `scoring`): SDMPrune and the baselines, from a model to an exported directory.

    from sdmprune.recipes import prune
    report = prune.run(prune.PruneRun.of(model="smollm2-135m", ratio=0.2, output="runs/p20"))

Steps: check every input → load → plan → calibration → perplexity before → score and mask (resumable,
state in the output directory) → reconstruct (optional refit of the kept weights) → perplexity after →
export (rank 0; gathered first under FSDP). With `--importance auto` (the default) the scoring and the refit run
once per candidate importance, and the one with the lowest perplexity on further calibration windows is kept
(`sdmprune.selection`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checkpoint import clear_for_new_run, prepare_output
from ..config import RuntimeOptions
from ..criteria.sdmprune import SDMPrune
from ..distributed import is_main, is_sharded, shard_model, world_size
from ..errors import SdmpruneError
from ..export import export_pruned, unshard_for_export
from ..masks import count_parameters
from ..options import validate
from ..pruning import PruneConfig
from ..reconstruct import ReconstructConfig
from ..schedule import check_plan, needs_calibration
from ..selection import describe_choice, prune_and_refit
from .options import ParallelOptions, PruningRunOptions
from .steps import (
    calibration_windows,
    load,
    measure,
    perplexity_change,
    perplexity_windows,
    refit_windows,
    selection_windows,
)

FINISHED = "pruning.json"


def recommended_pruning(**runtime) -> PruneConfig:
    """The default of `prune` and `compress`: SDMPrune with `--importance auto`. Over the records measured it kept
    the lower of the preset's and the paper's selections after the refit in most, gaining 2-15% where the preset
    alone is behind (Qwen2.5-Coder-0.5B) and losing 0.5-5.4% on its misses, where the selection windows barely
    separate the two (SmolLM2 at 20%, Qwen2.5-Coder-1.5B at 30%; README, "The choice of --importance auto"), for
    twice the scoring and refit time. `runtime`: RuntimeOptions fields."""
    return PruneConfig(criterion=SDMPrune(importance="auto"), runtime=RuntimeOptions(**runtime))


@dataclass
class PruneRun(PruningRunOptions):
    """Score MLP neurons with a criterion, remove the least important, export."""

    pruning: PruneConfig = field(default_factory=recommended_pruning)
    reconstruction: ReconstructConfig = field(default_factory=ReconstructConfig)
    parallel: ParallelOptions = field(default_factory=ParallelOptions)


def run(config: PruneRun) -> dict:
    """Prune and export; returns the report written to pruning.json."""
    validate(config)
    pruning, output = config.pruning, config.output.output
    choosing = len(pruning.criterion.candidates()) > 1
    if config.parallel.fsdp:
        refuse_what_fsdp_cannot_run(config.reconstruction.reconstruct, choosing)
    config.pruning.width_multiple = config.export.width_multiple(config.pruning.width_multiple)
    resume = prepare_output(output, overwrite=config.output.overwrite, resume=config.output.resume, finished=FINISHED)
    model, tokenizer = load(config.model, device="cpu" if config.parallel.fsdp else None)
    if config.parallel.fsdp:  # fully_shard moves each process's shard to its own GPU (or keeps it on the CPU)
        shard_model(model)
    before = count_parameters(model)
    check_plan(model, pruning)
    windows = perplexity_windows(config.evaluation, config.data, model, tokenizer)
    calibration = windows_to_refit = selection = None  # each (ids, summary) where needed
    refit = config.reconstruction.reconstruct
    if needs_calibration(pruning, model) or refit != "none":
        try:
            calibration = calibration_windows(config.calibration, config.data, model, tokenizer,
                                              pruning.runtime.seed)
            if refit != "none":
                windows_to_refit = refit_windows(config.reconstruction, config.calibration, config.data, model,
                                                 tokenizer, pruning.runtime.seed, calibration[0])
            if choosing:
                selection = selection_windows(config.calibration, config.data, model, tokenizer, pruning.runtime.seed)
        except SdmpruneError as error:
            if needs_calibration(pruning, model):
                raise
            raise SdmpruneError(f"{error} (the calibration windows serve --reconstruct {refit}; --reconstruct none "
                                "prunes without data)") from None
    evaluation = {}
    if windows is not None:
        evaluation["before"] = measure(model, tokenizer, windows, config.evaluation, pruning.runtime.bf16)
    clear_for_new_run(output, resume)
    # deterministic: a resumed run refits (and measures the candidates) again
    chosen = prune_and_refit(model, pruning, calibration=calibration, refit=windows_to_refit,
                             reconstruction=config.reconstruction, selection=selection, state_dir=output,
                             resume=resume, batch_size=config.evaluation.eval_batch_size)
    result = chosen.result
    if chosen.reconstruction is not None:
        result.report["reconstruction"] = chosen.reconstruction
    if chosen.report is not None:
        result.report["selection"] = chosen.report
    if windows is not None:
        evaluation["after"] = measure(model, tokenizer, windows, config.evaluation, pruning.runtime.bf16)
    report = {**result.report, "source_model": config.model.model, "evaluation": evaluation}
    exported = unshard_for_export(model, result.masks) if is_sharded(model) else (model, result.masks)
    if is_main():  # the output directory holds the run state until the export replaces it
        export_model, export_masks = exported
        export_pruned(export_model, tokenizer, export_masks, output, report=report, overwrite=True,
                      padded=config.export.padded)
        gguf = config.export.gguf.write(output)
        achieved = report["achieved"]
        requested = ", ".join(f"{k} {v}" for k, v in report["requested"].items() if v is not None)
        print(f"\n{config.model.model} -> {output}  ({report['method']}, {pruning.allocation.name}"
              f"{f', {world_size()} processes' if world_size() > 1 else ''})")
        print(f"requested {requested}; achieved ratio {achieved['ratio']:.4f} of total parameters, "
              f"{achieved['mlp_ratio']:.4f} of MLP neurons")
        if "selection" in report:
            print(describe_choice(report["selection"]))
        print(f"parameters {before.total:,} -> {achieved['params_after']:,}; MLP width {before.widths[0]} -> "
              f"{min(report['widths'])}")
        print(perplexity_change(evaluation))
        print(f"wrote {output}/ (pruning.json, README.md, model.safetensors{f', {gguf.name}' if gguf else ''})")
    return report


def refuse_what_fsdp_cannot_run(refit: str, choosing: bool) -> None:
    """One line naming every setting (the defaults among them) that an FSDP-sharded run cannot do, and the flags
    that make it runnable."""
    refused = {}
    if refit != "none":
        refused[f"--reconstruct {refit} (not yet)"] = "--reconstruct none"
    if choosing:  # its weight-space candidate needs each weight's whole gradient, which no process holds
        refused["--importance auto (its weight-space candidate)"] = "--importance activation-wanda"
    if refused:
        raise SdmpruneError(f"--fsdp cannot run {' nor '.join(refused)}: add {' '.join(refused.values())}, or run "
                            "without --fsdp")
