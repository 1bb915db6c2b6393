"""Random baseline: the floor any real criterion must beat."""

from __future__ import annotations

import torch

from . import ScoringContext, register_criterion


@register_criterion("random", needs_calibration=False)
def random_scores(context: ScoringContext) -> list[torch.Tensor]:
    """Uniform random scores from a generator seeded with --seed."""
    generator = torch.Generator().manual_seed(context.seed)
    return [torch.rand(mask.numel(), generator=generator) for mask in context.masks.keep]
