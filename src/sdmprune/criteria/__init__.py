"""Importance criteria: a registry of config classes that score MLP neurons, one module each.

A criterion is a dataclass subclassing `Criterion` whose fields are its options (they become CLI options
listed under it). `score(context, step)` returns one fp32 tensor of shape (I_l,) per layer, higher meaning
more important; `plan` may split the run into stages (SDMPrune's cross-entropy cold start). Add one with
`@CRITERIA.register("name")` in any module; nothing else in the pipeline changes.
"""

from . import flap, magnitude, random, sdmprune, taylor, wanda_sp  # noqa: F401  (modules register themselves)
from .registry import CRITERIA, Criterion, ScoringContext, Step, compute_scores

__all__ = ["CRITERIA", "Criterion", "ScoringContext", "Step", "compute_scores"]
