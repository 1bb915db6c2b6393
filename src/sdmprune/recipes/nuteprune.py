"""Recipe `prune --method nuteprune`: masks over attention groups and MLP neurons learned with LoRA and
numerous teachers from the same model, then the same export.

    from sdmprune.recipes import nuteprune
    report = nuteprune.run(nuteprune.NutePruneRun.of(ratio=0.2, train_steps=500, output="runs/nute20"))

Steps: check every input → load → calibration (its training windows) → perplexity before → train
(resumable) → reconstruct (optional refit of the kept down_proj and o_proj weights towards the merged model with
the masks off, on the first --refit-samples of its windows) → perplexity after → export with the step log and
trajectory plot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checkpoint import clear_for_new_run, prepare_output
from ..distributed import world_size
from ..errors import SdmpruneError
from ..export import export_pruned
from ..nuteprune import NutePruneConfig, nuteprune, write_training_outputs
from ..options import validate
from ..reconstruct import ReconstructConfig
from ..selection import reconstruct_on
from .options import PruningRunOptions
from .prune import FINISHED
from .steps import (
    calibration_windows,
    load,
    measure,
    perplexity_change,
    perplexity_windows,
    refit_windows,
)


@dataclass
class NutePruneRun(PruningRunOptions):
    """Learn masks over attention groups and MLP neurons with NutePrune (the --calib windows are its training
    data), export."""

    nuteprune: NutePruneConfig = field(default_factory=NutePruneConfig)
    # off unless asked: NutePrune's masks are trained with LoRA, whose merged model (the refit's target with the
    # masks off) is not the original dense one, and the refit of its masks is not benchmarked yet
    reconstruction: ReconstructConfig = field(default_factory=lambda: ReconstructConfig(reconstruct="none"))


def run(config: NutePruneRun) -> dict:
    """Train the masks and export; returns the report written to pruning.json."""
    validate(config)
    if world_size() > 1:
        raise SdmpruneError("--method nuteprune runs in one process: launch it without torchrun / accelerate")
    settings, output = config.nuteprune, config.output.output
    resume = prepare_output(output, overwrite=config.output.overwrite, resume=config.output.resume, finished=FINISHED)
    model, tokenizer = load(config.model)
    windows = perplexity_windows(config.evaluation, config.data, model, tokenizer)
    calibration, summary = calibration_windows(config.calibration, config.data, model, tokenizer,
                                               settings.runtime.seed)
    if config.reconstruction.reconstruct != "none":
        windows_to_refit = refit_windows(config.reconstruction, config.calibration, config.data, model, tokenizer,
                                         settings.runtime.seed, calibration)
    bf16 = settings.runtime.bf16
    evaluation = {"before": measure(model, tokenizer, windows, config.evaluation, bf16)} if windows is not None else {}
    clear_for_new_run(output, resume)
    result = nuteprune(model, settings, calibration=calibration, calibration_summary=summary, state_dir=output,
                       resume=resume)
    if config.reconstruction.reconstruct != "none":  # deterministic: a resumed run refits again
        result.report["reconstruction"] = reconstruct_on(result.model, result.masks, windows_to_refit,
                                                         config.reconstruction, heads=result.heads,
                                                         micro_batch=settings.train_batch_size, bf16=bf16)
    if windows is not None:
        evaluation["after"] = measure(result.model, tokenizer, windows, config.evaluation, bf16)
    report = {**result.report, "source_model": config.model.model, "evaluation": evaluation}
    export_pruned(result.model, tokenizer, result.masks, output, report=report, overwrite=True,
                  padded=config.export.padded, heads=result.heads,
                  extra=lambda tmp: write_training_outputs(result.log, tmp))
    gguf = config.export.gguf.write(output)

    achieved, training, memory = report["achieved"], report["training"], report["memory_bytes"]
    print(f"\n{config.model.model} -> {output}  (nuteprune, {training['steps']} steps)")
    print(f"requested ratio {settings.ratio}; achieved ratio {achieved['ratio']:.4f} of total parameters "
          f"({achieved['mlp_ratio']:.4f} of MLP neurons, {achieved['kv_head_ratio']:.4f} of key/value heads); "
          f"expected sparsity at the end of training {training['final_expected_sparsity']:.4f}")
    print(f"parameters {achieved['params_before']:,} -> {achieved['params_after']:,}; MLP widths "
          f"{min(report['widths'])}..{max(report['widths'])}, key/value heads {min(report['kv_heads'])}.."
          f"{max(report['kv_heads'])} per layer")
    print(f"training: {training['tokens']:,} tokens in {training['seconds']:.0f} s; memory beyond the weights "
          f"{memory['state_total'] / 2**20:.2f} MiB (weights {memory['model_weights'] / 2**20:.1f} MiB)")
    print(perplexity_change(evaluation))
    print(f"wrote {output}/ (pruning.json, README.md, model.safetensors, nuteprune_log.json, nuteprune.png"
          f"{f', {gguf.name}' if gguf else ''})")
    return report
