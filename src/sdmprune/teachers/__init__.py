"""Teachers for self-distillation: a registry of config classes, each one module.

A teacher is attached to the model before the pruning masks are (a copy must be taken while the model
is dense), sees the run through a `RunView` (the masks, and the masks every step started from), and
returns logits (B, S, V) for ids (B, S) as a constant for autograd. Add one with
`@TEACHERS.register("name")` on a dataclass subclassing `Teacher` (its fields are its options).
"""

from . import frozen_copy, masks_off, progressive  # noqa: F401  (modules register themselves)
from .base import TEACHERS, RunView, Teacher, forward_logits

__all__ = ["TEACHERS", "RunView", "Teacher", "forward_logits"]
