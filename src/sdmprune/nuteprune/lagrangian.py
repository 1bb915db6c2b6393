"""The sparsity constraint: a target that ramps up during a warm-up, enforced by a Lagrangian.

    penalty = λ1 · (ŝ - s_t) + λ2 · (ŝ - s_t)²

ŝ is the gates' expected sparsity, s_t the target at step t. The gates minimise the penalty, the
multipliers λ maximise it (gradient ascent), so λ grows until ŝ follows s_t. One global constraint:
widths and head counts come out different from layer to layer.
"""

from __future__ import annotations

import torch
from torch import nn


def sparsity_target(step: int, ratio: float, warmup_steps: int) -> float:
    """s_t for 0-based `step`: linear from 0 to `ratio` over `warmup_steps` steps, then `ratio`."""
    return ratio * min(1.0, (step + 1) / max(warmup_steps, 1))


class Lagrangian(nn.Module):
    """λ1·(ŝ - s_t) + λ2·(ŝ - s_t)²; `lambdas` (2,) start at 0 and are trained by gradient ascent."""

    def __init__(self, device: torch.device | str | None = None):
        super().__init__()
        self.lambdas = nn.Parameter(torch.zeros(2, device=device))

    def forward(self, expected: torch.Tensor, target: float) -> torch.Tensor:
        gap = expected - target
        return self.lambdas[0] * gap + self.lambdas[1] * gap.pow(2)
