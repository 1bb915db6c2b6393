"""One pruning run: the config, and `prune()`, the entry point of the Python API.

    result = prune(model, PruneConfig(criterion="sdmprune", ratio=0.2), calibration=ids)
    result.masks      # NeuronMasks attached to `model` (weights untouched; export_pruned slices them)
    result.report     # what was asked, what was achieved, every step (goes into pruning.json)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .allocation import ALLOCATIONS, check_ratio
from .criteria import get_criterion
from .criteria.sdmprune import IMPORTANCES
from .errors import SdmpruneError
from .masks import NeuronMasks
from .options import described
from .schedule import run_schedule
from .teacher import TEACHERS


@dataclass
class PruneConfig:
    """Settings of a pruning run; each field's help is the CLI's help (`--field-name`)."""

    criterion: str = field(default="sdmprune", metadata=described("importance criterion"))
    ratio: float | None = field(default=None, metadata=described(
        "fraction of TOTAL parameters to remove, taken from MLP neurons (e.g. 0.2)"))
    mlp_ratio: float | None = field(default=None, metadata=described("fraction of MLP neurons to remove instead"))
    width_multiple: int = field(default=1, metadata=described("round kept widths down to a multiple of this (e.g. 64)"))
    allocation: str = field(default="uniform", metadata=described(
        "uniform: same width per layer | global: rank standardised scores across layers | "
        "layer-range: first L/8 and last L/16 layers dense"))
    steps: int = field(default=1, metadata=described(
        "prune-and-rescore steps of the (distillation) stage; 1 = one shot, as the paper"))
    teacher: str = field(default="masks-off", metadata=described(
        "masks-off: the model itself with masks off (no extra memory) | copy: a frozen second copy | "
        "progressive: the model with the masks of --teacher-lag steps earlier (dense at the start; no extra "
        "memory; needs --steps > --teacher-lag)"))
    teacher_lag: int = field(default=1, metadata=described(
        "--teacher progressive: the teacher of step k is the student of step k - lag (steps counted with the "
        "cold start as step 1)"))
    alpha: float | None = field(default=None, metadata=described(
        "sdmprune: KL weight α (default: official value for the nearest of the 20/30/40 percent targets)"))
    temperature: float | None = field(default=None, metadata=described(
        "sdmprune: teacher temperature T (default: official value for the nearest ratio)"))
    cold_start: float = field(default=0.025, metadata=described(
        "sdmprune: fraction of MLP width pruned by the cross-entropy cold start"))
    importance: str = field(default="activation-wanda", metadata=described(
        "sdmprune: activation-wanda (recommended, see bench/results/quality.md) = geometric mean of the "
        "activation Taylor score and structured Wanda's | weight = the paper's weight-space Taylor (faithful "
        "SDMPrune) | activation = sum over tokens of |a*dL/da| at the neuron's output | fisher = sum over "
        "tokens of (a*dL/da)^2"))
    bias_compensation: bool | None = field(default=None, metadata=described(
        "add the removed neurons' mean output to a down_proj bias, as FLAP does (exported via the config's "
        "mlp_bias; Llama only). Default: on for flap where the architecture can store it, off otherwise"))
    micro_batch: int = field(default=1, metadata=described(
        "calibration windows per backward pass (sdmprune takes |.| per micro-batch; official: 1)"))
    bf16: bool = field(default=False, metadata=described(
        "bf16 autocast for scoring passes (the CLI uses it for perplexity too); faster on CPU and GPU"))
    seed: int = field(default=0, metadata=described("seed for every random choice; same seed, same result"))

    def validate(self) -> None:
        get_criterion(self.criterion)
        if self.allocation not in ALLOCATIONS:
            raise SdmpruneError(f"unknown allocation '{self.allocation}': choose {', '.join(ALLOCATIONS)}")
        if self.importance not in IMPORTANCES:
            raise SdmpruneError(f"unknown importance '{self.importance}': choose {', '.join(IMPORTANCES)}")
        if self.teacher not in TEACHERS:
            raise SdmpruneError(f"unknown teacher '{self.teacher}': choose {', '.join(TEACHERS)}")
        if (self.ratio is None) == (self.mlp_ratio is None):
            raise SdmpruneError("give exactly one of --ratio (of total parameters) or --mlp-ratio (of MLP neurons)")
        if self.ratio is not None:
            check_ratio("ratio", self.ratio)
        else:
            check_ratio("mlp_ratio", self.mlp_ratio)
        for name in ("steps", "micro_batch", "width_multiple", "teacher_lag"):
            if getattr(self, name) < 1:
                raise SdmpruneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.teacher == "progressive" and self.criterion == "sdmprune" and self.steps <= self.teacher_lag:
            raise SdmpruneError(f"--teacher progressive with --teacher-lag {self.teacher_lag} needs --steps "
                                f"{self.teacher_lag + 1} or more: with fewer, every distillation step's teacher is "
                                "the dense model (use --teacher masks-off)")
        if not 0 < self.cold_start < 1:
            raise SdmpruneError(f"--cold-start must be in (0, 1), got {self.cold_start}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise SdmpruneError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.temperature is not None and self.temperature <= 0:
            raise SdmpruneError(f"--temperature must be positive, got {self.temperature}")


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
    **overrides,
) -> PruneResult:
    """Prune `model`'s MLP neurons by masking; keyword overrides update `config`.

    `calibration` is an (N, S) tensor of token ids for criteria that need data. With `state_dir`,
    the run state is saved after every step there, and `resume=True` continues from it.
    """
    config = PruneConfig(**{**asdict(config or PruneConfig()), **overrides})
    config.validate()
    masks, report = run_schedule(
        model, config, calibration, calibration_summary, Path(state_dir) if state_dir else None, resume
    )
    return PruneResult(masks, report)
