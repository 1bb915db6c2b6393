"""The pruning schedule: the criterion's plan of prune-and-rescore steps, run with a resumable state.

A plan is a list of steps (the criterion's `plan`: SDMPrune's is a cross-entropy cold start followed by
`steps` distillation steps, every other criterion's `steps` equal steps); each step scores the currently
kept neurons, allocates a budget of kept neurons over layers and updates the masks. After each step the
masks, scores, RNG state and settings are saved (when a state directory is given), so an interrupted run
resumes exactly.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from .allocation import achieved, allocate_widths, keep_top, kept_budget
from .checkpoint import Checkpoint, prefixed, restore_rng, rng_tensors
from .criteria import ScoringContext, Step, compute_scores
from .criteria.activations import compensate_bias
from .distributed import broadcast_from_main, broadcast_masks
from .errors import SdmpruneError
from .masks import NeuronMasks, count_parameters
from .models.architectures import get_architecture
from .options import to_dict
from .teachers import RunView


def uses_bias_compensation(config, model: nn.Module) -> bool:
    """The config's choice, else automatic: the criterion's default (on for flap) when the architecture
    can store the bias (an MLP-bias config option: Llama), off otherwise."""
    if config.bias_compensation is not None:
        return config.bias_compensation
    return config.criterion.compensates_bias and get_architecture(model).bias_key is not None


def check_plan(model: nn.Module, config) -> list[Step]:
    """The steps of the run, failing before any work if the target is out of reach (`global` needs
    scores to allocate, and shares `uniform`'s bound) or a compensation bias could not be exported."""
    count = count_parameters(model)
    target = kept_budget(count, ratio=config.target.total_ratio, mlp_ratio=config.target.mlp_ratio)
    steps = config.criterion.plan(count, target, config.steps)
    if uses_bias_compensation(config, model) and get_architecture(model).bias_key is None:
        raise SdmpruneError(f"'{model.config.model_type}' has no MLP-bias option to store the compensation bias "
                            "in: pass --no-bias-compensation")
    early_check = "uniform" if config.allocation.needs_scores else config.allocation
    allocate_widths(count, steps[-1].budget, allocation=early_check, width_multiple=config.width_multiple or 1)
    return steps


def needs_calibration(config, model: nn.Module) -> bool:
    return config.criterion.needs_calibration or uses_bias_compensation(config, model)


def _state_tensors(masks: NeuronMasks, scores: list[torch.Tensor], history: list[list[torch.Tensor]]) -> dict:
    tensors = {f"keep.{i}": m.to(torch.uint8) for i, m in enumerate(masks.keep)}
    tensors |= {f"scores.{i}": s.float() for i, s in enumerate(scores)}
    tensors |= {f"history.{j}.{i}": m.to(torch.uint8) for j, step in enumerate(history) for i, m in enumerate(step)}
    return tensors | rng_tensors()


def run_schedule(
    model: nn.Module,
    config,
    calibration: torch.Tensor | None,
    calibration_summary: dict | None = None,
    state_dir: Path | None = None,
    resume: bool = False,
) -> tuple[NeuronMasks, dict]:
    """Run every step of the plan on `model` (masks attached), resuming from `state_dir` if asked."""
    count = count_parameters(model)
    steps = check_plan(model, config)
    compensate = uses_bias_compensation(config, model)
    if compensate and calibration is None:
        raise SdmpruneError("bias compensation needs calibration data (the removed neurons' mean output): pass "
                            "--calib, or --no-bias-compensation")
    if calibration is not None:  # several processes: every one scores its share of rank 0's windows
        calibration = broadcast_from_main(calibration)
    criterion = config.criterion
    run = RunView()
    criterion.attach(model, steps, run)  # before the masks: a copied teacher must be dense
    torch.manual_seed(config.runtime.seed)
    masks = run.masks = NeuronMasks(model)
    checkpoint = Checkpoint(state_dir)
    settings = {**to_dict(config), "calibration": calibration_summary}  # what a resumed run must match
    done, log = 0, []
    if resume and checkpoint.exists():
        progress, tensors = checkpoint.load(settings)
        done, log = progress["steps_done"], progress["log"]
        masks.update([tensors[f"keep.{i}"].bool() for i in range(len(masks.keep))])
        run.history[:] = [[prefixed(tensors, f"history.{j}.")[str(i)].bool().to(k.device)
                           for i, k in enumerate(masks.keep)] for j in range(done)]
        restore_rng(tensors)
    context = ScoringContext(model, masks, calibration, config.runtime.seed, micro_batch=config.micro_batch,
                             bf16=config.runtime.bf16)
    for index, step in enumerate(steps[done:], start=done):
        start = time.perf_counter()
        run.history.append(list(masks.keep))  # masks.update replaces the tensors: no copy needed
        scores = compute_scores(criterion, context, step)
        widths = allocate_widths(count, step.budget, allocation=config.allocation,
                                 width_multiple=config.width_multiple or 1, scores=scores)
        masks.update(broadcast_masks(keep_top(scores, widths)))  # rank 0 decides for every process
        log.append({"step": index + 1, "stage": step.stage, **step.settings, "widths": widths,
                    "seconds": round(time.perf_counter() - start, 3)})
        checkpoint.save(settings, {"steps_done": index + 1, "log": log}, _state_tensors(masks, scores, run.history))
    if compensate:
        compensate_bias(context)
    report = {
        "method": criterion.name,
        "config": to_dict(config),
        "requested": config.target.requested(),
        "achieved": achieved(count, masks.widths),
        "widths_before": count.widths,
        "widths": masks.widths,
        "seed": config.runtime.seed,
        "bias_compensation": compensate,
        "steps": log,
        "calibration": calibration_summary,
    }
    return masks, report
