"""Random baseline: the floor any real criterion must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import CRITERIA, Criterion, ScoringContext, Step


@CRITERIA.register("random")
@dataclass
class Random(Criterion):
    """uniform random scores from a generator seeded with --seed"""

    needs_calibration = False

    def score(self, context: ScoringContext, step: Step) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(context.seed)
        return [torch.rand(mask.numel(), generator=generator) for mask in context.masks.keep]
