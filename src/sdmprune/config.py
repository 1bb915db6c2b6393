"""Option groups shared by several methods, each declared once and composed into the methods' configs
(a method may give a group other defaults through its `default_factory`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import SdmpruneError
from .options import described

DEFAULT_RATIO = 0.2


def check_ratio(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise SdmpruneError(f"--{name.replace('_', '-')} must be in (0, 1), got {value}")


@dataclass
class RuntimeOptions:
    """runtime"""

    bf16: bool = field(default=False, metadata=described(
        "bf16 autocast for every forward/backward pass (scoring, training, evaluation); faster on GPUs and on CPUs "
        "with native bf16 (AVX-512, AMX, Arm bf16); where the CPU has none, the passes run in fp32 with a warning"))
    seed: int = field(default=0, metadata=described(
        "seed for every random choice (calibration windows, ties, gate noise, data order, LoRA init): same seed, "
        "same result"))


@dataclass
class TargetOptions:
    """how much to remove"""

    ratio: float | None = field(default=None, metadata=described(
        f"fraction of TOTAL parameters to remove ({DEFAULT_RATIO} when --mlp-ratio is not given); scoring methods "
        "take it from MLP neurons, nuteprune from MLP neurons and attention groups"))
    mlp_ratio: float | None = field(default=None, metadata=described(
        "fraction of MLP neurons to remove instead of --ratio (scoring methods)"))

    def validate(self) -> None:
        if self.ratio is not None and self.mlp_ratio is not None:
            raise SdmpruneError("give one of --ratio (of total parameters) or --mlp-ratio (of MLP neurons), not both")
        for name in ("ratio", "mlp_ratio"):
            if getattr(self, name) is not None:
                check_ratio(name, getattr(self, name))

    @property
    def total_ratio(self) -> float | None:
        """The fraction of total parameters asked for (None when --mlp-ratio is)."""
        return DEFAULT_RATIO if self.ratio is None and self.mlp_ratio is None else self.ratio

    def requested(self) -> dict[str, float | None]:
        return {"ratio": self.total_ratio, "mlp_ratio": self.mlp_ratio}


@dataclass
class LoraOptions:
    """LoRA"""

    lora_r: int = field(default=8, metadata=described("LoRA rank"))
    lora_alpha: float = field(default=16.0, metadata=described("LoRA alpha (the update is scaled by alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=described("dropout on the LoRA input"))
    lora_targets: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", metadata=described(
        "comma-separated module names that get LoRA"))

    def validate(self) -> None:
        if self.lora_r < 1:
            raise SdmpruneError(f"--lora-r must be at least 1, got {self.lora_r}")
        if not 0 <= self.lora_dropout < 1:
            raise SdmpruneError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.targets():
            raise SdmpruneError("--lora-targets names no module: give e.g. q_proj,v_proj")

    def targets(self) -> list[str]:
        return [name for name in self.lora_targets.split(",") if name]


@dataclass
class TrainingOptions:
    """training"""

    lr: float = field(default=1e-4, metadata=described("learning rate of the LoRA weights (AdamW)"))
    max_grad_norm: float = field(default=1.0, metadata=described(
        "clip the LoRA gradient norm to this (0 = no clipping)"))
    save_every: int = field(default=100, metadata=described("save a resumable state every N steps (0 = never)"))

    def validate(self) -> None:
        if self.lr <= 0:
            raise SdmpruneError(f"--lr must be positive, got {self.lr}")
        if self.save_every < 0:
            raise SdmpruneError(f"--save-every must be 0 or more, got {self.save_every}")
        if self.max_grad_norm < 0:
            raise SdmpruneError(f"--max-grad-norm must be 0 or more, got {self.max_grad_norm}")
