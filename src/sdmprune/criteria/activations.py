"""Statistics of each neuron's output (the input of down_proj) over the calibration tokens.

Collected by forward pre-hooks on down_proj, registered after the masks' hooks so pruned neurons read
as zero, in fp32. Mean and variance are merged across batches with Chan's update (no sum-of-squares
cancellation); `sum_sq` gives Wanda's ‖X_i‖₂. `compensate_bias` is FLAP's bias compensation, which any
criterion may use (`PruneConfig.bias_compensation`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..distributed import all_reduce_sum, gathered, inference_context, is_main, world_size
from ..runtime import autocast_context
from .registry import ScoringContext


@dataclass
class ActivationStats:
    """Per-layer (I_l,) fp32 statistics over `tokens` calibration tokens."""

    tokens: int
    mean: list[torch.Tensor]
    m2: list[torch.Tensor]  # sum of squared deviations from the mean
    sum_sq: list[torch.Tensor]

    def norm(self, layer: int) -> torch.Tensor:
        """‖X_i‖₂ over all tokens."""
        return self.sum_sq[layer].sqrt()

    def variance(self, layer: int) -> torch.Tensor:
        """Unbiased variance over tokens."""
        return self.m2[layer] / max(self.tokens - 1, 1)


def collect_activation_stats(context: ScoringContext, *, dense: bool = False) -> ActivationStats:
    """One forward pass over the calibration windows; `dense` runs with every mask off."""
    architecture = context.masks.architecture
    downs = [architecture.projections(mlp)[2] for mlp in architecture.mlps(context.model)]
    zeros = [torch.zeros(down.in_features, dtype=torch.float32, device=down.weight.device) for down in downs]
    stats = ActivationStats(0, [z.clone() for z in zeros], [z.clone() for z in zeros], [z.clone() for z in zeros])
    seen = [0] * len(downs)

    recording = True  # False during FSDP filler passes

    def hook(layer: int):
        def record(module, args):
            if not recording:
                return
            x = args[0].detach().flatten(0, -2).float()  # (tokens, I)
            n_a, n_b = seen[layer], x.shape[0]
            mean_b = x.mean(0)
            delta = mean_b - stats.mean[layer]
            stats.mean[layer] += delta * (n_b / (n_a + n_b))
            stats.m2[layer] += (x - mean_b).pow(2).sum(0) + delta.pow(2) * (n_a * n_b / (n_a + n_b))
            stats.sum_sq[layer] += x.pow(2).sum(0)
            seen[layer] = n_a + n_b

        return record

    handles = [down.register_forward_pre_hook(hook(layer)) for layer, down in enumerate(downs)]
    device = downs[0].weight.device
    try:
        with (context.masks.disabled() if dense else nullcontext(), autocast_context(device, context.bf16),
              inference_context(context.model)):
            for batch in tqdm(context.micro_batches(), desc="activation statistics", unit="batch", leave=False,
                              disable=not is_main()):
                recording = batch.counts
                context.model(input_ids=batch.ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    stats.tokens = seen[0]
    return merge_over_processes(stats)


def merge_over_processes(stats: ActivationStats) -> ActivationStats:
    """The statistics of every process's tokens together (identity in a single process).

    Exact pairwise merge in float64: the token-weighted mean first, then each process's M2 moved to that
    mean, `m2 + n·(mean - global mean)²`, summed; `sum_sq` and the counts simply add.
    """
    if world_size() == 1:
        return stats
    n = stats.tokens
    count = torch.tensor([float(n)], dtype=torch.float64, device=stats.mean[0].device)
    totals = [mean.double() * n for mean in stats.mean]
    sum_sq = [q.double() for q in stats.sum_sq]
    all_reduce_sum([count, *totals, *sum_sq])
    tokens = int(count.item())
    means = [total / tokens for total in totals]
    m2 = [v.double() + n * (m.double() - g).pow(2) for v, m, g in zip(stats.m2, stats.mean, means, strict=True)]
    all_reduce_sum(m2)
    return ActivationStats(tokens, [m.float() for m in means], [v.float() for v in m2], [q.float() for q in sum_sq])


def compensate_bias(context: ScoringContext) -> None:
    """Set each layer's down_proj bias to the removed neurons' mean contribution (dense statistics)."""
    stats = collect_activation_stats(context, dense=True)
    architecture = context.masks.architecture
    biases = []
    for layer, (mlp, keep) in enumerate(zip(architecture.mlps(context.model), context.masks.keep, strict=True)):
        down = gathered(architecture.projections(mlp)[2].weight).detach().float()  # (H, I)
        removed = (~keep).float() * stats.mean[layer]  # (I,): mean output of removed neurons, 0 for kept
        biases.append(down @ removed)
    context.masks.bias = biases
