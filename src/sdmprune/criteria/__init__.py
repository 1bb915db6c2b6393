"""Importance criteria: a registry of functions `ScoringContext -> per-layer neuron scores`.

A criterion returns one fp32 tensor of shape (I_l,) per layer; higher means more important.
Add one with `@register_criterion("name", needs_calibration=...)` in a module of this package and
import that module below; nothing else in the pipeline changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import MicroBatch, is_sharded, shard_windows, world_size
from ..errors import SdmpruneError
from ..masks import NeuronMasks
from ..teacher import Teacher


@dataclass
class ScoringContext:
    """What a criterion may use: the (masked) model, its masks, calibration windows and settings."""

    model: nn.Module
    masks: NeuronMasks
    calibration: torch.Tensor | None  # (N, S) token ids, or None for data-free criteria
    seed: int = 0
    teacher: Teacher | None = None  # for distillation losses
    alpha: float = 0.0  # weight of the KL term; 0 = plain cross-entropy
    temperature: float = 1.0  # applied to the teacher's logits
    micro_batch: int = 1  # windows per backward pass (SDMPrune takes |.| per micro-batch)
    bf16: bool = False  # bf16 autocast for the forward/backward passes
    importance: str = "weight"  # sdmprune: weight-space Taylor (the paper) or an activation-space variant

    def micro_batches(self) -> list[MicroBatch]:
        """This process's micro-batches of the calibration windows (all of them in a single process).

        Several processes (torchrun) each score a disjoint share; a criterion sums its partial results with
        `distributed.all_reduce_sum` where they are complete, before any nonlinear step.
        """
        share = shard_windows(self.calibration, self.micro_batch, lockstep=is_sharded(self.model))
        if not any(batch.counts for batch in share):
            batches = -(-self.calibration.shape[0] // self.micro_batch)
            raise SdmpruneError(f"{batches} calibration micro-batches for {world_size()} processes: each process "
                                "needs at least one; use more --calib-samples or fewer processes")
        return share


@dataclass(frozen=True)
class Criterion:
    name: str
    score: Callable[[ScoringContext], list[torch.Tensor]]
    needs_calibration: bool
    description: str
    bias_compensation: bool = False  # FLAP's bias compensation by default (PruneConfig.bias_compensation)


CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, *, needs_calibration: bool, bias_compensation: bool = False):
    """Decorator registering `fn(ctx) -> list of (I_l,) scores`; its docstring's first line is the help."""

    def decorate(fn: Callable[[ScoringContext], list[torch.Tensor]]):
        description = fn.__doc__.strip().splitlines()[0].rstrip(".") if fn.__doc__ else name
        CRITERIA[name] = Criterion(name, fn, needs_calibration, description, bias_compensation)
        return fn

    return decorate


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise SdmpruneError(f"unknown criterion '{name}': choose one of {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]


def compute_scores(name: str, context: ScoringContext) -> list[torch.Tensor]:
    """Scores of criterion `name`, fp32, with already-pruned neurons at -inf so they stay pruned."""
    criterion = get_criterion(name)
    if criterion.needs_calibration and context.calibration is None:
        raise SdmpruneError(f"criterion '{name}' needs calibration data: pass --calib")
    scores = criterion.score(context)
    result = []
    for layer, (layer_scores, keep) in enumerate(zip(scores, context.masks.keep, strict=True)):
        layer_scores = layer_scores.detach().float()
        if not torch.isfinite(layer_scores[keep]).all():
            raise SdmpruneError(f"criterion '{name}' produced non-finite scores in layer {layer}: "
                                "check the model and calibration data (try float32)")
        result.append(layer_scores.masked_fill(~keep, float("-inf")))
    return result


from . import flap, magnitude, random, sdmprune, taylor, wanda_sp  # noqa: E402,F401  (modules register themselves)
