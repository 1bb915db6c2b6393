"""From a pruning ratio to kept widths per layer, and from scores to keep-masks.

`ratio` is the fraction of *total* parameters removed (the SDMPrune tables' convention), all of it
taken from MLP neurons; `mlp_ratio` is the fraction of MLP neurons removed. Widths are rounded
down to a multiple of `width_multiple`, so the achieved ratio is at least the requested one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import SdmpruneError
from .masks import ParameterCount

ALLOCATIONS = ("uniform",)


def check_ratio(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise SdmpruneError(f"--{name.replace('_', '-')} must be in (0, 1), got {value}")


def _round_down(width: float, multiple: int) -> int:
    return int(math.floor(width / multiple + 1e-9)) * multiple


def uniform_widths(
    count: ParameterCount,
    *,
    ratio: float | None = None,
    mlp_ratio: float | None = None,
    width_multiple: int = 1,
) -> list[int]:
    """The same kept width in every layer (capped at a layer's current width)."""
    if (ratio is None) == (mlp_ratio is None):
        raise SdmpruneError("give exactly one of --ratio (of total parameters) or --mlp-ratio (of MLP neurons)")
    if width_multiple < 1:
        raise SdmpruneError(f"--width-multiple must be a positive integer, got {width_multiple}")
    if mlp_ratio is not None:
        check_ratio("mlp_ratio", mlp_ratio)
        widths = [_round_down(w * (1 - mlp_ratio), width_multiple) for w in count.widths]
        width = min(widths)
    else:
        check_ratio("ratio", ratio)
        # Solve sum_l (I_l - w) * p_l = ratio * total for the common width w.
        neuron_params = sum(count.per_neuron)
        exact = (sum(w * p for w, p in zip(count.widths, count.per_neuron, strict=True))
                 - ratio * count.total) / neuron_params
        width = _round_down(exact, width_multiple)
        widths = [min(width, w) for w in count.widths]
    if width < width_multiple or width < 1:
        reachable = (count.total - count.after([width_multiple] * len(count.widths))) / count.total
        raise SdmpruneError(
            f"the requested ratio cannot be reached by pruning MLP neurons: MLPs hold "
            f"{count.mlp / count.total:.1%} of the parameters, so at most {reachable:.3f} of the total can be "
            f"removed while keeping {width_multiple} neuron(s) per layer; ask for less"
        )
    return widths


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
