"""NutePrune's less-sparse teachers for SDMPrune's prune-and-rescore steps: the teacher of step k is the
student of step k - lag (steps counted from 1, the cold start being step 1; the dense model before step 1),
i.e. the same model with that step's keep-masks swapped in for the teacher's pass. No extra memory."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SdmpruneError
from ..options import described
from .base import TEACHERS, Teacher, forward_logits


@TEACHERS.register("progressive")
@dataclass
class Progressive(Teacher):
    """the model with the masks of --teacher-lag steps earlier (dense at the start; no extra memory)"""

    teacher_lag: int = field(default=1, metadata=described(
        "the teacher of step k is the student of step k - lag (steps counted with the cold start as step 1)"))

    def validate(self) -> None:
        if self.teacher_lag < 1:
            raise SdmpruneError(f"--teacher-lag must be at least 1, got {self.teacher_lag}")

    def check_steps(self, steps: int) -> None:
        if steps <= self.teacher_lag:
            raise SdmpruneError(f"--teacher progressive with --teacher-lag {self.teacher_lag} needs --steps "
                                f"{self.teacher_lag + 1} or more: with fewer, every distillation step's teacher is "
                                "the dense model (use --teacher masks-off)")

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        masks, history = self.run.masks, self.run.history
        index = len(history) - 1 - self.teacher_lag  # the current step is len(history)
        if index < 0:
            with masks.disabled():
                return forward_logits(self.model, ids)
        student = masks.keep
        masks.keep = history[index]
        try:
            return forward_logits(self.model, ids)
        finally:
            masks.keep = student
