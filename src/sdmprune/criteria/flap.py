"""FLAP: fluctuation of each neuron's output, and bias compensation for the removed ones.

    score_i = Var_tokens(X_i) · ‖W_down[:, i]‖²

FLAP ranks standardised scores across layers (`--allocation global`, which standardises per layer);
under `uniform` the ranking within a layer is the same with or without standardisation. After the
final masks are set, the removed neurons' mean output `W_down[:, removed] · mean(X_removed)` over the
calibration tokens of the dense model is added as a down_proj bias, so the layer's output keeps its
mean (`activations.compensate_bias`, on by default for this criterion and available to every other).
The export stores that bias with the config's `mlp_bias` (zero gate/up biases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import gathered
from .activations import collect_activation_stats
from .registry import CRITERIA, Criterion, ScoringContext, Step


@CRITERIA.register("flap")
@dataclass
class Flap(Criterion):
    """FLAP fluctuation: variance of the neuron's output over tokens × ‖W_down[:, i]‖², plus bias compensation"""

    compensates_bias = True

    def score(self, context: ScoringContext, step: Step) -> list[torch.Tensor]:
        stats = collect_activation_stats(context)
        architecture = context.masks.architecture
        return [
            stats.variance(layer) * gathered(architecture.projections(mlp)[2].weight).detach().float().pow(2).sum(0)
            for layer, mlp in enumerate(architecture.mlps(context.model))
        ]
