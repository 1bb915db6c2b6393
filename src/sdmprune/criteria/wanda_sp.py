"""Structured Wanda ("wanda-sp"): weight magnitude times input activation norm, per down_proj input channel."""

from __future__ import annotations

import torch

from ..distributed import gathered
from . import ScoringContext, register_criterion
from .activations import collect_activation_stats


def structured_wanda(down_weight: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """(I,) scores mean_rows |W_down[:, i]| · ‖X_i‖₂ from W_down (H, I) and the (I,) activation norms."""
    return down_weight.detach().float().abs().mean(0) * norm


@register_criterion("wanda-sp", needs_calibration=True)
def wanda_sp(context: ScoringContext) -> list[torch.Tensor]:
    """Structured Wanda: mean over output rows of |W_down[:, i]|·‖X_i‖₂, X_i the neuron's output over tokens."""
    stats = collect_activation_stats(context)
    architecture = context.masks.architecture
    return [
        structured_wanda(gathered(architecture.projections(mlp)[2].weight), stats.norm(layer))
        for layer, mlp in enumerate(architecture.mlps(context.model))
    ]
