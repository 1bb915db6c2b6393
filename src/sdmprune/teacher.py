"""The teacher for self-distillation: the same model with its masks off, or a separate frozen copy.

The default costs no memory: the masks-off pass runs the dense model under `torch.inference_mode()`
(`torch.no_grad()` for an FSDP-sharded model).
`copy` holds a second full model, as the official SDMPrune code does, for comparison.
`progressive` is the student of an earlier step: the same model with that step's masks swapped in
for the teacher's pass (NutePrune's less-sparse teachers, for SDMPrune's prune-and-rescore steps).
"""

from __future__ import annotations

import copy
from typing import Protocol

import torch
from torch import nn

from .distributed import inference_context, is_sharded
from .errors import SdmpruneError
from .masks import NeuronMasks

TEACHERS = ("masks-off", "copy", "progressive")


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`model`'s logits (B, S, V) for ids (B, S) without autograd, cloned into an ordinary tensor so
    autograd may save it in the student's graph."""
    with inference_context(model):
        logits = model(input_ids=ids, use_cache=False).logits
    return logits.clone()


class Teacher(Protocol):
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Teacher logits (B, S, V) for ids (B, S), a constant for autograd."""


class MasksOffTeacher:
    """The student model itself with every mask disabled: the original dense model."""

    def __init__(self, model: nn.Module, masks: NeuronMasks):
        self.model, self.masks = model, masks

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        with self.masks.disabled():
            return forward_logits(self.model, ids)


class ProgressiveTeacher:
    """The student of step k - `lag` as the teacher of step k (steps counted from 1; the dense model
    before step 1). `history[j]` is the list of keep-masks step j + 1's student ran with, appended by
    the schedule as each step starts; the earlier masks are swapped in for the teacher's pass only."""

    def __init__(self, model: nn.Module, masks: NeuronMasks, history: list[list[torch.Tensor]], lag: int):
        self.model, self.masks, self.history, self.lag = model, masks, history, lag

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        index = len(self.history) - 1 - self.lag  # the current step is len(history)
        if index < 0:
            return MasksOffTeacher(self.model, self.masks).logits(ids)
        student = self.masks.keep
        self.masks.keep = self.history[index]
        try:
            return forward_logits(self.model, ids)
        finally:
            self.masks.keep = student


class CopyTeacher:
    """A frozen deep copy of the dense model (twice the weight memory)."""

    def __init__(self, model: nn.Module):
        if is_sharded(model):
            raise SdmpruneError("an FSDP-sharded model cannot be deep-copied: use --teacher masks-off (the same "
                                "dense logits, no second copy) or drop --fsdp")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return forward_logits(self.model, ids)


def copy_teacher_before_masking(model: nn.Module, kind: str) -> CopyTeacher | None:
    """The copy must be taken while the model is still dense (hooks would be copied too)."""
    if kind not in TEACHERS:
        raise SdmpruneError(f"unknown teacher '{kind}': choose {', '.join(TEACHERS)}")
    return CopyTeacher(model) if kind == "copy" else None
