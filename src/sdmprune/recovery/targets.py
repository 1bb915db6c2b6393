"""What a recovery teacher gives for a batch: its targets at the target positions, and optionally hidden states."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class TopKTargets:
    """Teacher targets at n target positions: `log_probs` (n, k) fp32, log softmax(z/T) of its top-k tokens,
    `indices` (n, k) int64, their ids."""

    log_probs: torch.Tensor
    indices: torch.Tensor


@dataclass
class TeacherOutput:
    """The teacher on a batch: `targets` at its n target positions (logits (n, V), or cached top-k targets) and, when
    asked for, `hidden`: its hidden states after every decoder layer, each (m, H) at the m non-padding positions."""

    targets: torch.Tensor | TopKTargets
    hidden: list[torch.Tensor] | None = None


# (batch, whether hidden states are wanted) -> the teacher's output
Teacher = Callable[[dict[str, torch.Tensor], bool], TeacherOutput]
