"""Structured Wanda ("wanda-sp"): weight magnitude times input activation norm, per down_proj input channel."""

from __future__ import annotations

import torch

from . import ScoringContext, register_criterion
from .activations import collect_activation_stats


@register_criterion("wanda-sp", needs_calibration=True)
def wanda_sp(context: ScoringContext) -> list[torch.Tensor]:
    """Structured Wanda: mean over output rows of |W_down[:, i]|·‖X_i‖₂, X_i the neuron's output over tokens."""
    stats = collect_activation_stats(context)
    architecture = context.masks.architecture
    return [
        architecture.projections(mlp)[2].weight.detach().float().abs().mean(0) * stats.norm(layer)
        for layer, mlp in enumerate(architecture.mlps(context.model))
    ]
