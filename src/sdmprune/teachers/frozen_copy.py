"""A frozen deep copy of the dense model, as the official SDMPrune code holds (twice the weight memory)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..distributed import is_sharded
from ..errors import SdmpruneError
from .base import TEACHERS, RunView, Teacher, forward_logits


@TEACHERS.register("copy")
@dataclass
class Copy(Teacher):
    """a frozen second copy of the dense model (2x weight memory; for comparison)"""

    def attach(self, model: nn.Module, run: RunView) -> None:
        if is_sharded(model):
            raise SdmpruneError("an FSDP-sharded model cannot be deep-copied: use --teacher masks-off (the same "
                                "dense logits, no second copy) or drop --fsdp")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # before masking: hooks would be copied

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return forward_logits(self.model, ids)
