"""The order in which training runs visit their examples: a fresh permutation per epoch, seeded by
(seed, epoch), so a resumed run sees exactly what the uninterrupted one would."""

from __future__ import annotations

import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """(n,) int64: the order of epoch `epoch` (0-based) over n examples."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def example_at(position: int, n: int, seed: int) -> int:
    """The example visited at `position` (0-based, counted over all epochs) of a run over n examples."""
    epoch, slot = divmod(position, n)
    return int(epoch_permutation(n, seed, epoch)[slot])
