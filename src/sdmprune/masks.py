"""Neuron masks over MLP widths, applied by hooks without copying weights, and parameter counting.

A neuron i of layer l is row i of W_gate and W_up and column i of W_down. Zeroing the input of
down_proj at i is exactly removing the neuron, so a mask is a forward pre-hook on down_proj. An
optional per-layer bias (FLAP's compensation for the removed neurons' mean output) is added to
down_proj's output by a forward hook, and switched off with the masks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .models.architectures import Architecture, get_architecture


class NeuronMasks:
    """Per-layer boolean keep-masks (True = keep) over MLP neurons, attached to a model.

    `keep[l]` has shape (I_l,), I_l the current width of layer l. While `enabled`, each down_proj
    sees its input multiplied by the mask; `disabled()` turns every mask off, so the same model
    serves as its own dense teacher.
    """

    def __init__(self, model: nn.Module, keep: Sequence[torch.Tensor] | None = None):
        self.model = model
        self.architecture: Architecture = get_architecture(model)
        downs = [self.architecture.projections(mlp)[2] for mlp in self.architecture.mlps(model)]
        if keep is None:
            keep = [torch.ones(down.in_features, dtype=torch.bool) for down in downs]
        if len(keep) != len(downs):
            raise ValueError(f"{len(keep)} masks for {len(downs)} layers")
        self.keep: list[torch.Tensor] = []
        self.down_bias: list[torch.Tensor | None] = [None] * len(downs)  # (H,) each, or None
        self.enabled = True
        self._handles = []
        for layer, (down, mask) in enumerate(zip(downs, keep, strict=True)):
            if mask.shape != (down.in_features,):
                raise ValueError(f"layer {layer}: mask shape {tuple(mask.shape)} != ({down.in_features},)")
            self.keep.append(mask.to(device=down.weight.device, dtype=torch.bool))
            self._handles.append(down.register_forward_pre_hook(self._hook(layer)))
            self._handles.append(down.register_forward_hook(self._bias_hook(layer)))

    def _hook(self, layer: int):
        def apply(module: nn.Module, args: tuple[torch.Tensor, ...]):
            if not self.enabled:
                return None
            x = args[0]
            return (x * self.keep[layer].to(x.dtype),) + args[1:]

        return apply

    def _bias_hook(self, layer: int):
        def add(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor):
            bias = self.down_bias[layer]
            if not self.enabled or bias is None:
                return None
            return output + bias.to(output.dtype)

        return add

    def update(self, keep: Sequence[torch.Tensor]) -> None:
        """Replace the masks (e.g. after another pruning step); shapes must match."""
        for layer, mask in enumerate(keep):
            self.keep[layer] = mask.to(device=self.keep[layer].device, dtype=torch.bool)

    @property
    def widths(self) -> list[int]:
        """Kept neurons per layer."""
        return [int(mask.sum()) for mask in self.keep]

    def kept_indices(self) -> list[list[int]]:
        return [torch.nonzero(mask).flatten().tolist() for mask in self.keep]

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the dense model: every mask off inside the block."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def remove(self) -> None:
        """Detach the hooks; the model is dense again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts; tied tensors (embedding = lm_head) are counted once."""

    total: int
    mlp: int
    mlp_per_layer: list[int]
    widths: list[int]  # MLP width per layer
    per_neuron: list[int]  # parameters removed with one neuron of each layer

    def after(self, widths: Sequence[int]) -> int:
        """Total parameters once every layer l keeps `widths[l]` neurons."""
        removed = sum((w0 - w) * p for w0, w, p in zip(self.widths, widths, self.per_neuron, strict=True))
        return self.total - removed


def count_parameters(model: nn.Module) -> ParameterCount:
    architecture = get_architecture(model)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields shared tensors once
    mlp_per_layer, widths, per_neuron = [], [], []
    for mlp in architecture.mlps(model):
        gate, up, down = architecture.projections(mlp)
        mlp_per_layer.append(sum(p.numel() for m in (gate, up, down) for p in m.parameters()))
        widths.append(down.in_features)
        per_neuron.append(
            gate.in_features + up.in_features + down.out_features
            + (gate.bias is not None) + (up.bias is not None)
        )
    return ParameterCount(total, sum(mlp_per_layer), mlp_per_layer, widths, per_neuron)
