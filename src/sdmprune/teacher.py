"""The teacher for self-distillation: the same model with its masks off, or a separate frozen copy.

The default costs no memory: the masks-off pass runs the dense model under `torch.inference_mode()`
(`torch.no_grad()` for an FSDP-sharded model).
`copy` holds a second full model, as the official SDMPrune code does, for comparison.
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import nn

from .distributed import inference_context, is_sharded
from .errors import SdmpruneError
from .masks import NeuronMasks

TEACHERS = ("masks-off", "copy")


class Teacher(Protocol):
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Teacher logits (B, S, V) for ids (B, S), a constant for autograd."""


class MasksOffTeacher:
    """The student model itself with every mask disabled: the original dense model."""

    def __init__(self, model: nn.Module, masks: NeuronMasks):
        self.model, self.masks = model, masks

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with self.masks.disabled(), inference_context(self.model):
            logits = self.model(input_ids=ids, use_cache=False).logits
        return logits.clone()  # an ordinary tensor, so autograd may save it


class CopyTeacher:
    """A frozen deep copy of the dense model (twice the weight memory)."""

    def __init__(self, model: nn.Module):
        if is_sharded(model):
            raise SdmpruneError("an FSDP-sharded model cannot be deep-copied: use --teacher masks-off (the same "
                                "dense logits, no second copy) or drop --fsdp")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(input_ids=ids, use_cache=False).logits
        return logits.clone()


def copy_teacher_before_masking(model: nn.Module, kind: str) -> CopyTeacher | None:
    """The copy must be taken while the model is still dense (hooks would be copied too)."""
    if kind not in TEACHERS:
        raise SdmpruneError(f"unknown teacher '{kind}': choose {', '.join(TEACHERS)}")
    return CopyTeacher(model) if kind == "copy" else None
