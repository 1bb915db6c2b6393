"""Structured Wanda ("wanda-sp"): weight magnitude times input activation norm, per down_proj input channel."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import gathered
from .activations import collect_activation_stats
from .registry import CRITERIA, Criterion, ScoringContext, Step


def structured_wanda(down_weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """(I,) scores mean_rows |W_down[:, i]| · ‖X_i‖₂ from W_down (H, I) and the (I,) activation norms."""
    return down_weight.detach().float().abs().mean(0) * norm


@CRITERIA.register("wanda-sp")
@dataclass
class WandaSP(Criterion):
    """structured Wanda: mean over output rows of |W_down[:, i]|·‖X_i‖₂, X_i the neuron's output over tokens"""

    def score(self, context: ScoringContext, step: Step) -> list[torch.Tensor]:
        stats = collect_activation_stats(context)
        architecture = context.masks.architecture
        return [
            structured_wanda(gathered(architecture.projections(mlp)[2].weight), stats.norm(layer))
            for layer, mlp in enumerate(architecture.mlps(context.model))
        ]
