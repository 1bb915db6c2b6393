"""Magnitude baseline: a neuron is as important as the norm of its weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import gathered
from .registry import CRITERIA, Criterion, ScoringContext, Step


@CRITERIA.register("magnitude")
@dataclass
class Magnitude(Criterion):
    """L2 norm of the neuron's weights: row i of W_gate and W_up and column i of W_down"""

    needs_calibration = False

    @torch.inference_mode()
    def score(self, context: ScoringContext, step: Step) -> list[torch.Tensor]:
        architecture = context.masks.architecture
        scores = []
        for mlp in architecture.mlps(context.model):
            gate, up, down = (gathered(linear.weight).float() for linear in architecture.projections(mlp))
            squared = gate.pow(2).sum(dim=1) + up.pow(2).sum(dim=1) + down.pow(2).sum(dim=0)
            scores.append(squared.sqrt())
        return scores
