"""Hard-concrete (L0) gates over attention groups and MLP neurons, and their masks on the model.

One gate per attention group (a key/value head with its G query heads, so pruned layers stay GQA
layers) and one per MLP neuron, held in one flat vector: the groups of every layer, then the neurons
of every layer. Gate j has a parameter log α_j (Louizos et al., 2018); a sample is

    s = sigmoid((log u - log(1 - u) + log α) / β) · (ζ - γ) + γ,   z = clamp(s, 0, 1),   u ~ U(0, 1)

with β = 2/3, γ = -0.1, ζ = 1.1, and P(z ≠ 0) = sigmoid(log α - β · log(-γ / ζ)). The expected sparsity
is the expected fraction of the model's *total* parameters removed: Σ_j cost_j · P(z_j = 0) / total.

Deterministic masks for a target ratio remove gates in increasing order of log α until that fraction
of the total is removed; each layer keeps at least its best group and its best neuron, so every layer
stays a valid attention + MLP block. A layer's only group (Gemma 3 270M/1B have one key/value head) is
therefore never removed; its gate is held at 1 while training and left out of the expected sparsity. Without
head gates (`heads=False`: MLP neurons only, at the same total ratio) every group is held so.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import SdmpruneError
from ..masks import ChannelMasks, ParameterCount
from ..models.architectures import attention_group_shape, get_architecture

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
LOG_ALPHA_LIMIT = 4.6  # log α stays in [-4.6, 4.6]
U_EPS = 1e-6  # u is drawn from [ε, 1 - ε] so log u and log(1 - u) stay finite


def hard_concrete(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Gate values z in [0, 1] for uniform noise u (same shape as log_alpha)."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z ≠ 0) of each gate: the expected L0 norm, gate by gate."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


class HardConcreteGates(nn.Module):
    """log α of every attention group and MLP neuron of a model, with the costs of what each removes.

    `count` is the model's parameter count (from `count_parameters`): it gives the gates per layer
    (`kv_heads`, `widths`) and their costs (`per_kv_head`, `per_neuron`, of `total`). `heads=False` holds every
    attention group at 1: only neurons are removed.
    """

    def __init__(self, count: ParameterCount, init: float, device: torch.device | str | None = None,
                 heads: bool = True):
        super().__init__()
        self.count = count
        self.sizes = [*count.kv_heads, *count.widths]  # gates per segment: groups of each layer, then neurons
        per_gate = torch.tensor([*count.per_kv_head, *count.per_neuron], dtype=torch.float64)
        costs = per_gate.repeat_interleave(torch.tensor(self.sizes)).to(device)  # (N,) parameters removed per gate
        self.register_buffer("costs", costs, persistent=False)
        # A segment of one gate (a layer with a single key/value group) can never be removed by
        # `deterministic`; letting the sparsity loss push it down would train the student without attention in
        # that layer and count parameters the export keeps.
        sizes = torch.tensor(self.sizes)
        segment_removable = sizes > 1
        segment_removable[: len(count.kv_heads)] &= heads
        removable = segment_removable.repeat_interleave(sizes).to(device)  # (N,) bool
        self.register_buffer("removable", removable, persistent=False)
        self.log_alpha = nn.Parameter(torch.full((len(costs),), float(init), device=device))

    @property
    def n_layers(self) -> int:
        return len(self.count.widths)

    def split(self, values: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A flat (N,) vector as ([groups of layer l], [neurons of layer l])."""
        parts = list(values.split(self.sizes))
        return parts[: self.n_layers], parts[self.n_layers:]

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One stochastic gate vector z (N,), differentiable in log α; gates that cannot be removed are 1."""
        u = torch.rand(self.log_alpha.shape, generator=generator, device=self.log_alpha.device)
        z = hard_concrete(self.log_alpha, u.clamp(U_EPS, 1 - U_EPS))
        return torch.where(self.removable, z, torch.ones_like(z))

    def expected_sparsity(self) -> torch.Tensor:
        """Expected fraction of the total parameters removed (a differentiable scalar); a gate that cannot be
        removed counts as kept."""
        removed = ((1 - prob_nonzero(self.log_alpha)).double() * self.removable) @ self.costs
        return (removed / self.count.total).float()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_alpha.clamp_(-LOG_ALPHA_LIMIT, LOG_ALPHA_LIMIT)

    def max_ratio(self) -> float:
        """The largest ratio deterministic masks can reach (one group and one neuron kept per layer, every group
        where heads are not gated)."""
        kept = sum(float(costs[0]) for costs, removable in zip(self.costs.split(self.sizes),
                                                                 self.removable.split(self.sizes), strict=True)
                   if removable.any())  # the best gate of each removable segment stays
        return (float(self.costs[self.removable].sum()) - kept) / self.count.total

    @torch.no_grad()
    def deterministic(self, ratio: float, log_alpha: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean keep-mask (N,) removing at least `ratio` of the total parameters, lowest log α first.

        `log_alpha` defaults to the current one (a snapshot passes its own).
        """
        if ratio > self.max_ratio() + 1e-12:
            raise SdmpruneError(f"ratio {ratio} cannot be reached by removing attention groups and MLP neurons: at "
                                f"most {self.max_ratio():.3f} of the total (one group and one neuron kept per "
                                "layer); ask for less")
        log_alpha = (self.log_alpha if log_alpha is None else log_alpha).detach().double()
        order_key = log_alpha.clone()
        offsets = torch.tensor([0, *self.sizes], device=log_alpha.device).cumsum(0)[:-1]
        best = torch.stack([segment.argmax() for segment in log_alpha.split(self.sizes)]) + offsets
        order_key[best] = math.inf  # never removed
        order_key[~self.removable] = math.inf
        order = torch.argsort(order_key, stable=True)
        removed = self.costs[order].cumsum(0)  # parameters removed by the first 1, 2, ... gates of `order`
        n_remove = int((removed < ratio * self.count.total - 1e-6).sum()) + 1 if ratio > 0 else 0
        keep = torch.ones_like(log_alpha, dtype=torch.bool)
        keep[order[:n_remove]] = False
        return keep

    def removed_ratio(self, keep: torch.Tensor) -> float:
        """Fraction of the total parameters a keep-mask (N,) removes."""
        return float(self.costs[~keep].sum()) / self.count.total


class StructureMasks:
    """Multipliers on every attention group (o_proj input) and MLP neuron (down_proj input) of a model,
    set from one flat gate vector laid out as `HardConcreteGates`; `disabled()` is the unmasked model."""

    def __init__(self, model: nn.Module, gates: HardConcreteGates):
        architecture = get_architecture(model)
        group_size, head_dim = attention_group_shape(model)
        self.gates = gates
        heads, neurons = gates.split(torch.ones(len(gates.costs)))
        outs = [architecture.attention_projections(a)[3] for a in architecture.attentions(model)]
        downs = [architecture.projections(mlp)[2] for mlp in architecture.mlps(model)]
        self.heads = ChannelMasks(outs, heads, repeat=group_size * head_dim)
        self.neurons = ChannelMasks(downs, neurons)

    def set(self, values: torch.Tensor) -> None:
        """Gate values (N,), float or bool, for the following forward passes."""
        self.heads.keep, self.neurons.keep = self.gates.split(values)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        with self.heads.disabled(), self.neurons.disabled():
            yield

    def remove(self) -> None:
        self.heads.remove()
        self.neurons.remove()
