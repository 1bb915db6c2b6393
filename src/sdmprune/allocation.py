"""From a pruning ratio to kept widths per layer, and from scores to keep-masks.

`ratio` is the fraction of *total* parameters removed (the SDMPrune tables' convention), all of it
taken from MLP neurons; `mlp_ratio` is the fraction of MLP neurons removed. The target is a budget
of kept neurons over all layers; an allocation spreads it over layers:

- `uniform`: the same width in every layer (the paper's choice);
- `global`: neurons ranked across layers on per-layer standardised scores (FLAP's choice), each layer's
  width kept within a band around the uniform width (`--width-band`, 0.25; none: unbounded, as FLAP);
- `layer-range`: the first L/8 and last L/16 layers stay dense, the others share the budget
  uniformly (LLM-Pruner's default keeps layers 0-3 and the last 2 of 32).

Each allocation is a registered class (`@ALLOCATIONS.register`). Widths are rounded down to a multiple
of `width_multiple`, so the achieved ratio is at least the requested one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .config import check_ratio
from .errors import SdmpruneError
from .masks import ParameterCount
from .options import Named, Registry, described

ALLOCATIONS = Registry("allocation")


def _round_down(width: float, multiple: int) -> int:
    return int(math.floor(width / multiple + 1e-9)) * multiple


def kept_budget(count: ParameterCount, *, ratio: float | None = None, mlp_ratio: float | None = None) -> float:
    """Neurons to keep over all layers (fractional) so that `ratio` of total parameters (or
    `mlp_ratio` of MLP neurons) is removed. Assumes every neuron costs the same (true of SwiGLU)."""
    if (ratio is None) == (mlp_ratio is None):
        raise SdmpruneError("give exactly one of --ratio (of total parameters) or --mlp-ratio (of MLP neurons)")
    if mlp_ratio is not None:
        check_ratio("mlp_ratio", mlp_ratio)
        return sum(count.widths) * (1 - mlp_ratio)
    check_ratio("ratio", ratio)
    return sum(count.widths) - ratio * count.total / count.per_neuron[0]


def dense_layers(n_layers: int) -> list[bool]:
    """Layers `layer-range` leaves dense: the first round(L/8) and the last round(L/16)."""
    first, last = round(n_layers / 8), round(n_layers / 16)
    return [layer < first or layer >= n_layers - last for layer in range(n_layers)]


def _unreachable(count: ParameterCount, width_multiple: int) -> SdmpruneError:
    reachable = (count.total - count.after([width_multiple] * len(count.widths))) / count.total
    return SdmpruneError(
        f"the requested ratio cannot be reached by pruning MLP neurons: MLPs hold {count.mlp / count.total:.1%} "
        f"of the parameters, so at most {reachable:.3f} of the total can be removed while keeping "
        f"{width_multiple} neuron(s) per layer; ask for less"
    )


class Allocation(Named):
    """Base class: kept width per layer for a budget of kept neurons over all layers."""

    needs_scores: ClassVar[bool] = False

    def widths(self, count: ParameterCount, budget: float, width_multiple: int,
               scores: Sequence[torch.Tensor] | None) -> list[int]:
        raise NotImplementedError


def _shared_width(count: ParameterCount, budget: float, width_multiple: int, dense: list[bool]) -> list[int]:
    """Layers marked `dense` keep their width; the others share the rest of the budget equally."""
    pruned = len(dense) - sum(dense)
    if pruned == 0:
        raise SdmpruneError("layer-range leaves every layer dense for a model this shallow: use another allocation")
    dense_width = sum(w for w, d in zip(count.widths, dense, strict=True) if d)
    width = _round_down((budget - dense_width) / pruned, width_multiple)
    if width < max(width_multiple, 1):
        raise _unreachable(count, width_multiple)
    return [w if d else min(width, w) for w, d in zip(count.widths, dense, strict=True)]


@ALLOCATIONS.register("uniform")
@dataclass
class Uniform(Allocation):
    """same width in every layer (the paper)"""

    def widths(self, count, budget, width_multiple, scores=None):
        return _shared_width(count, budget, width_multiple, [False] * len(count.widths))


@ALLOCATIONS.register("layer-range")
@dataclass
class LayerRange(Allocation):
    """first L/8 and last L/16 layers dense, the others uniform (LLM-Pruner)"""

    def widths(self, count, budget, width_multiple, scores=None):
        return _shared_width(count, budget, width_multiple, dense_layers(len(count.widths)))


def allocate_widths(
    count: ParameterCount,
    budget: float,
    *,
    allocation: str | Allocation = "uniform",
    width_multiple: int = 1,
    scores: Sequence[torch.Tensor] | None = None,
) -> list[int]:
    """Kept width per layer for a budget of kept neurons (`scores` needed for `global`)."""
    if width_multiple < 1:
        raise SdmpruneError(f"--width-multiple must be a positive integer, got {width_multiple}")
    if isinstance(allocation, str):
        allocation = ALLOCATIONS.get(allocation)()
    if allocation.needs_scores and scores is None:
        raise SdmpruneError(f"{allocation.name} allocation ranks neurons by score: it needs a criterion's scores")
    return allocation.widths(count, budget, width_multiple, scores)


def standardise(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-layer (s - mean) / std over the finite (still kept) scores; pruned stay -inf."""
    result = []
    for layer_scores in scores:
        finite = layer_scores[torch.isfinite(layer_scores)]
        std = finite.std() if finite.numel() > 1 else finite.new_tensor(1.0)
        result.append((layer_scores - finite.mean()) / std.clamp_min(1e-12))
    return result


@ALLOCATIONS.register("global")
@dataclass
class Global(Allocation):
    """rank standardised scores across layers (FLAP); widths differ per layer"""

    needs_scores = True
    width_band: float | None = field(default=0.25, metadata=described(
        "with --allocation global: keep every layer's width between (1 - b) and (1 + b) times the uniform width; "
        "none: unbounded, as FLAP (the default 0.25 is better than unbounded with the preset, bench/results/"
        "quality.md)"))

    def validate(self) -> None:
        if self.width_band is not None and not self.width_band > 0:
            raise SdmpruneError(f"--width-band must be positive, got {self.width_band}")

    def widths(self, count, budget, width_multiple, scores=None):
        return _global_widths(count, budget, width_multiple, scores, self.width_band)


def _global_widths(count: ParameterCount, budget: float, width_multiple: int, scores: Sequence[torch.Tensor],
                   band: float | None = None) -> list[int]:
    minimum = max(width_multiple, 1)
    total = math.floor(budget + 1e-9)
    if total < minimum * len(scores):
        raise _unreachable(count, width_multiple)
    sizes = [s.numel() for s in scores]
    lowest, highest = [minimum] * len(sizes), sizes
    if band is not None:
        uniform = total / len(sizes)
        lowest = [min(n, max(minimum, math.floor((1 - min(band, 1)) * uniform))) for n in sizes]
        highest = [max(low, min(n, math.ceil((1 + band) * uniform))) for low, n in zip(lowest, sizes, strict=True)]
    z = standardise(scores)
    # Each layer keeps its `lowest` best neurons; the rest of the budget goes to the best z-scores anywhere among
    # each layer's ranks `lowest` .. `highest` - 1 (a layer's ranks are descending, so it always keeps a prefix).
    ranked = []
    for layer_z, low, high in zip(z, lowest, highest, strict=True):
        layer_ranked = torch.sort(layer_z, descending=True, stable=True).values
        layer_ranked[:low] = float("-inf")
        layer_ranked[high:] = float("-inf")
        ranked.append(layer_ranked)
    pool = torch.cat(ranked)
    chosen = torch.zeros_like(pool, dtype=torch.bool)
    chosen[torch.argsort(pool, descending=True, stable=True)[: total - sum(lowest)]] = True
    parts = chosen.split([r.numel() for r in ranked])
    counts = [low + int(part.sum()) for low, part in zip(lowest, parts, strict=True)]
    return [max(minimum, _round_down(c, width_multiple)) for c in counts]


def keep_top(scores: Sequence[torch.Tensor], widths: Sequence[int]) -> list[torch.Tensor]:
    """Boolean masks keeping the `widths[l]` highest-scoring neurons of each layer (ties: lower index)."""
    masks = []
    for layer_scores, width in zip(scores, widths, strict=True):
        order = torch.argsort(layer_scores.float(), descending=True, stable=True)
        mask = torch.zeros(layer_scores.numel(), dtype=torch.bool, device=layer_scores.device)
        mask[order[:width]] = True
        masks.append(mask)
    return masks


def achieved(count: ParameterCount, widths: Sequence[int]) -> dict[str, float | int]:
    """Parameter counts and ratios after pruning to `widths`."""
    after = count.after(widths)
    return {
        "params_before": count.total,
        "params_after": after,
        "ratio": (count.total - after) / count.total,
        "mlp_ratio": 1 - sum(widths) / sum(count.widths),
    }
