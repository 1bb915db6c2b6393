"""The criterion registry, the base class, and what a criterion scores with (`ScoringContext`, `Step`).

A criterion is a dataclass subclassing `Criterion` whose fields are its options (they become CLI options
listed under it). `score(context, step)` returns one fp32 tensor of shape (I_l,) per layer, higher meaning
more important; `plan` may split the run into stages (SDMPrune's cross-entropy cold start). Add one with
`@CRITERIA.register("name")` in any module; nothing else in the pipeline changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..distributed import MicroBatch, is_sharded, shard_windows, world_size
from ..errors import SdmpruneError
from ..masks import NeuronMasks, ParameterCount
from ..options import Named, Registry
from ..teachers import RunView

CRITERIA = Registry("criterion")


@dataclass
class ScoringContext:
    """What a criterion may use: the (masked) model, its masks, calibration windows and runtime settings."""

    model: nn.Module
    masks: NeuronMasks
    calibration: torch.Tensor | None  # (N, S) token ids, or None for data-free criteria
    seed: int = 0
    micro_batch: int = 1  # windows per backward pass (SDMPrune takes |.| per micro-batch)
    bf16: bool = False  # bf16 autocast for the forward/backward passes

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
class Step:
    """One prune-and-rescore step: score, then keep `budget` neurons over all layers."""

    stage: str  # e.g. "cold-start" or "prune"
    budget: float
    settings: dict[str, Any] = field(default_factory=dict)  # the criterion's per-step settings (e.g. α, T)


class Criterion(Named):
    """Base class of the registered criteria."""

    needs_calibration: ClassVar[bool] = True
    compensates_bias: ClassVar[bool] = False  # FLAP's bias compensation by default (PruneConfig.bias_compensation)

    def plan(self, count: ParameterCount, target: float, steps: int) -> list[Step]:
        """`steps` equal steps from the current widths down to `target` kept neurons."""
        start = float(sum(count.widths))
        return [Step("prune", start + (target - start) * k / steps) for k in range(1, steps + 1)]

    def attach(self, model: nn.Module, plan: list[Step], run: RunView) -> None:
        """Called once before the masks are attached (e.g. to set up a teacher)."""

    def score(self, context: ScoringContext, step: Step) -> list[torch.Tensor]:
        raise NotImplementedError

    def candidates(self) -> dict[str, Criterion]:
        """The criteria a run tries in turn, keeping the one whose pruned (and refitted) model has the lowest
        perplexity on the selection windows (`sdmprune.selection`), by label; one, itself, unless it asks for a
        choice (sdmprune's `--importance auto`)."""
        return {self.name: self}


def compute_scores(criterion: Criterion, context: ScoringContext, step: Step | None = None) -> list[torch.Tensor]:
    """Scores of `criterion`, fp32, with already-pruned neurons at -inf so they stay pruned."""
    if criterion.needs_calibration and context.calibration is None:
        raise SdmpruneError(f"criterion '{criterion.name}' needs calibration data: pass --calib")
    scores = criterion.score(context, step or Step("prune", 0.0))
    result = []
    for layer, (layer_scores, keep) in enumerate(zip(scores, context.masks.keep, strict=True)):
        layer_scores = layer_scores.detach().float()
        if not torch.isfinite(layer_scores[keep]).all():
            raise SdmpruneError(f"criterion '{criterion.name}' produced non-finite scores in layer {layer}: "
                                "check the model and calibration data (try float32)")
        result.append(layer_scores.masked_fill(~keep, float("-inf")))
    return result
