"""The teacher registry and base class, and the one teacher forward every teacher uses.

A teacher is attached to the model before the pruning masks are (a copy must be taken while the model
is dense), sees the run through a `RunView` (the masks, and the masks every step started from), and
returns logits (B, S, V) for ids (B, S) as a constant for autograd. Add one with
`@TEACHERS.register("name")` on a dataclass subclassing `Teacher` (its fields are its options).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..distributed import inference_context
from ..masks import NeuronMasks
from ..options import Named, Registry

TEACHERS = Registry("teacher")


@dataclass
class RunView:
    """What a teacher may look at during a pruning run; `masks` is set once they are attached."""

    masks: NeuronMasks | None = None
    history: list[list[torch.Tensor]] = field(default_factory=list)  # history[j]: the masks step j + 1 started from


class Teacher(Named):
    """Base class: `attach` once before masking, then `logits` during the run."""

    def attach(self, model: nn.Module, run: RunView) -> None:
        self.model, self.run = model, run

    def check_steps(self, steps: int) -> None:
        """Fail early if the teacher cannot serve a distillation stage of `steps` steps."""

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`model`'s logits (B, S, V) for ids (B, S) without autograd, cloned into an ordinary tensor so
    autograd may save it in the student's graph."""
    with inference_context(model):
        logits = model(input_ids=ids, use_cache=False).logits
    return logits.clone()
