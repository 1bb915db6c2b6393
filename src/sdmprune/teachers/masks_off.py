"""The default teacher: the student model itself with every mask off, i.e. the original dense model.

It costs no memory: the pass runs under `torch.inference_mode()` (`torch.no_grad()` for an FSDP model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import TEACHERS, Teacher, forward_logits


@TEACHERS.register("masks-off")
@dataclass
class MasksOff(Teacher):
    """the model itself with its masks off (the dense model; no extra memory)"""

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with self.run.masks.disabled():
            return forward_logits(self.model, ids)
