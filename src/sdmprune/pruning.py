"""One pruning run: score neurons with a criterion, allocate widths, set the masks.

    result = prune(model, PruneConfig(criterion="magnitude", ratio=0.2))
    result.masks      # NeuronMasks attached to `model`
    result.report     # what was asked, what was achieved (goes into pruning.json)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .allocation import ALLOCATIONS, achieved, keep_top, uniform_widths
from .criteria import ScoringContext, compute_scores, get_criterion
from .errors import SdmpruneError
from .masks import NeuronMasks, count_parameters


@dataclass
class PruneConfig:
    """Settings of a pruning run; each field's help is the CLI's help."""

    criterion: str = field(default="magnitude", metadata={"help": "importance criterion (see `sdmprune prune --help`)"})
    ratio: float | None = field(
        default=None, metadata={"help": "fraction of TOTAL parameters to remove, taken from MLP neurons (e.g. 0.2)"}
    )
    mlp_ratio: float | None = field(
        default=None, metadata={"help": "fraction of MLP neurons to remove instead of --ratio"}
    )
    width_multiple: int = field(
        default=1, metadata={"help": "round kept widths down to a multiple of this (e.g. 64 for fast kernels)"}
    )
    allocation: str = field(default="uniform", metadata={"help": "how widths are spread over layers: uniform"})
    seed: int = field(default=0, metadata={"help": "seed for every random choice; same seed, same result"})

    def validate(self) -> None:
        get_criterion(self.criterion)
        if self.allocation not in ALLOCATIONS:
            raise SdmpruneError(f"unknown allocation '{self.allocation}': choose {', '.join(ALLOCATIONS)}")

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


@dataclass
class PruneResult:
    masks: NeuronMasks
    report: dict


def prune(
    model: nn.Module,
    config: PruneConfig | None = None,
    *,
    calibration: torch.Tensor | None = None,
    calibration_summary: dict | None = None,
    **overrides,
) -> PruneResult:
    """Prune `model`'s MLP neurons by masking (weights untouched; `export_pruned` slices them).

    `calibration` is an (N, S) tensor of token ids for criteria that need data.
    Keyword overrides update `config`, e.g. `prune(model, ratio=0.2, criterion="random")`.
    """
    config = PruneConfig(**{**asdict(config or PruneConfig()), **overrides})
    config.validate()
    count = count_parameters(model)
    widths = uniform_widths(
        count, ratio=config.ratio, mlp_ratio=config.mlp_ratio, width_multiple=config.width_multiple
    )
    torch.manual_seed(config.seed)
    masks = NeuronMasks(model)
    scores = compute_scores(config.criterion, ScoringContext(model, masks, calibration, config.seed))
    masks.update(keep_top(scores, widths))
    report = {
        "method": config.criterion,
        "config": asdict(config),
        "requested": {"ratio": config.ratio, "mlp_ratio": config.mlp_ratio},
        "achieved": achieved(count, masks.widths),
        "widths_before": count.widths,
        "widths": masks.widths,
        "seed": config.seed,
        "calibration": calibration_summary,
    }
    return PruneResult(masks, report)
