"""LLM-Pruner's first-order Taylor importance with cross-entropy ("param_first", element-wise)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import all_reduce_sum, gathered, is_sharded
from .gradients import gradients_on_mlp_only, loss_backward_passes, mlp_weights
from .registry import CRITERIA, Criterion, ScoringContext, Step


@CRITERIA.register("taylor")
@dataclass
class Taylor(Criterion):
    """LLM-Pruner Taylor: sum of |w·g| over the neuron's gate row, up row and down column (CE loss)"""

    def score(self, context: ScoringContext, step: Step) -> list[torch.Tensor]:
        weights = mlp_weights(context)
        windows = context.calibration.shape[0]
        with gradients_on_mlp_only(context.model, weights):
            for _ in loss_backward_passes(context, "taylor"):  # plain next-token cross-entropy
                pass  # gradients accumulate over all micro-batches: one batched gradient of the summed loss
            if not is_sharded(context.model):  # FSDP has already summed them over processes (reduce-scatter)
                all_reduce_sum([weight.grad for triple in weights for weight in triple])
            with torch.no_grad():  # under FSDP the products are row shards (DTensors), gathered once summed
                return [
                    gathered((gate * gate.grad).float().abs().sum(1) + (up * up.grad).float().abs().sum(1)
                             + (down * down.grad).float().abs().sum(0)) / windows
                    for gate, up, down in weights
                ]
