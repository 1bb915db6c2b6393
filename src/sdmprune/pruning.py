"""One pruning run by scoring: the config, and `prune()`, the scoring stage of every recipe.

    result = prune(model, PruneConfig(ratio=0.2), calibration=ids)     # or prune(model, ratio=0.2, ...)
    result.masks      # NeuronMasks attached to `model` (weights untouched; export_pruned slices them)
    result.report     # what was asked, what was achieved, every step (goes into pruning.json)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .allocation import ALLOCATIONS, Allocation
from .config import RuntimeOptions, TargetOptions
from .criteria import CRITERIA, Criterion
from .errors import SdmpruneError
from .masks import NeuronMasks
from .options import build, described, registered, validate
from .schedule import run_schedule


@dataclass
class PruneConfig:
    """pruning"""

    target: TargetOptions = field(default_factory=TargetOptions)
    criterion: Criterion = registered(CRITERIA, "sdmprune", "importance criterion")
    allocation: Allocation = registered(ALLOCATIONS, "uniform", "how the kept neurons are spread over layers")
    width_multiple: int | None = field(default=None, metadata=described(
        "round kept widths down to a multiple of this (default: 32 with --gguf, for llama.cpp; else 1)"))
    steps: int = field(default=1, metadata=described(
        "prune-and-rescore steps of the (distillation) stage; 1 = one shot, as the paper"))
    bias_compensation: bool | None = field(default=None, metadata=described(
        "add the removed neurons' mean output to a down_proj bias, as FLAP does (exported via the config's "
        "mlp_bias; Llama only). Default: on for flap where the architecture can store it, off otherwise"))
    micro_batch: int = field(default=1, metadata=described(
        "calibration windows per backward pass (sdmprune takes |.| per micro-batch; official: 1)"))
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)

    def validate(self) -> None:
        for name in ("steps", "micro_batch", "width_multiple"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SdmpruneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


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
    state_dir: str | Path | None = None,
    resume: bool = False,
    **options,
) -> PruneResult:
    """Prune `model`'s MLP neurons by masking; keyword `options` (flat option names, as on the command line:
    `ratio=0.2, criterion="taylor", alpha=0.3`) update `config`.

    `calibration` is an (N, S) tensor of token ids for criteria that need data. With `state_dir`,
    the run state is saved after every step there, and `resume=True` continues from it.
    """
    config = build(PruneConfig, options, base=config)
    validate(config)
    if len(candidates := config.criterion.candidates()) > 1:
        raise SdmpruneError(f"choosing among {', '.join(candidates)} (--importance auto) needs the refit and held-out "
                            "windows: use sdmprune.selection.prune_and_refit (the prune recipe), or name one")
    masks, report = run_schedule(
        model, config, calibration, calibration_summary, Path(state_dir) if state_dir else None, resume
    )
    return PruneResult(masks, report)
