"""Masks over MLP neurons and attention heads, applied by hooks without copying weights, and parameter counting.

A neuron i of layer l is row i of W_gate and W_up and column i of W_down. Zeroing the input of
down_proj at i is exactly removing the neuron, so a mask is a forward pre-hook on down_proj. An
optional per-layer bias (FLAP's compensation for the removed neurons' mean output, or the intercept of a
reconstruction) is added to down_proj's output by a forward hook, and an optional per-layer weight (the
kept weights refitted by `sdmprune.reconstruct`) replaces down_proj's weight there; both are switched off
with the masks, so the model's own weights always stay the dense ones.

An attention *group* is one key/value head with the G query heads that share it (GQA; G = 1 without
it). Zeroing the o_proj input of the group's G query heads removes the group: its k/v rows and q rows
then feed nothing. Removing whole groups keeps G, so a pruned layer is still an ordinary GQA layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .models.architectures import Architecture, attention_group_shape, get_architecture


class ChannelMasks:
    """Per-layer multipliers on the input channels of one linear per layer, applied by forward pre-hooks.

    `keep[l]` has shape (n_l,); entry i multiplies `repeat` consecutive input channels of `linears[l]`.
    Boolean keep-masks (True = keep) for pruning; float gates while NutePrune learns them. While
    `enabled`, the linears see their inputs multiplied, compute their output with `weight[l]` ((out, in),
    removed columns zero: a reconstruction's refit) in place of their own weight when one is set, and add
    `bias[l]` ((out,): a compensation bias or a refit's intercept) when one is set; `disabled()` turns all of
    it off, so the model's own weights always stay the dense ones.
    """

    def __init__(self, linears: Sequence[nn.Module], keep: Sequence[torch.Tensor], repeat: int = 1):
        if len(keep) != len(linears):
            raise ValueError(f"{len(keep)} masks for {len(linears)} layers")
        self.repeat = repeat
        self.linears = list(linears)
        self.keep: list[torch.Tensor] = []
        self.weight: list[torch.Tensor | None] = [None] * len(linears)
        self.bias: list[torch.Tensor | None] = [None] * len(linears)
        self.enabled = True
        self._handles = []
        for layer, (linear, mask) in enumerate(zip(linears, keep, strict=True)):
            if mask.shape != (linear.in_features // repeat,):
                raise ValueError(f"layer {layer}: mask shape {tuple(mask.shape)} != ({linear.in_features // repeat},)")
            self.keep.append(mask.to(device=linear.weight.device))
        self.attach()

    def attach(self) -> None:
        """Register the hooks (again, after `remove`): the model is masked by these masks."""
        if self._handles:
            raise RuntimeError("the masks are already attached")
        for layer, linear in enumerate(self.linears):
            self._handles.append(linear.register_forward_pre_hook(self._hook(layer)))
            self._handles.append(linear.register_forward_hook(self._output_hook(layer)))

    def _hook(self, layer: int):
        def apply(module: nn.Module, args: tuple[torch.Tensor, ...]):
            if not self.enabled:
                return None
            return (args[0] * self.channel_mask(layer).to(args[0].dtype),) + args[1:]

        return apply

    def _output_hook(self, layer: int):
        def replace(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor):
            weight, bias = self.weight[layer], self.bias[layer]
            if not self.enabled or (weight is None and bias is None):
                return None
            if weight is not None:  # args: the masked input; the dense product is discarded
                return self.refitted_output(layer, module, args[0])
            return output + bias.to(output.dtype)

        return replace

    def refitted_output(self, layer: int, linear: nn.Module, inputs: torch.Tensor,
                        channels: torch.Tensor | None = None) -> torch.Tensor:
        """`linear`'s output with layer `layer`'s refit (`weight[l]`, set, and `bias[l]`) on `inputs`: the masked
        input (..., in), or with `channels` (k,) the kept input channels alone (..., k)."""
        weight, bias = self.weight[layer], self.bias[layer]
        output = F.linear(inputs, weight if channels is None else weight[:, channels], linear.bias)
        return output if bias is None else output + bias.to(output.dtype)

    def channel_mask(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s mask over the linear's input channels, (in,)."""
        mask = self.keep[layer]
        return mask.repeat_interleave(self.repeat) if self.repeat > 1 else mask

    def kept_indices(self) -> list[list[int]]:
        return [torch.nonzero(mask).flatten().tolist() for mask in self.keep]

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the unmasked model: every mask off inside the block."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def remove(self) -> None:
        """Detach the hooks; the model is unmasked again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class NeuronMasks(ChannelMasks):
    """Per-layer boolean keep-masks (True = keep) over MLP neurons, attached to a model.

    `keep[l]` has shape (I_l,), I_l the current width of layer l; the masked linears are the down_projs
    (`weight[l]`: (H, I_l), `bias[l]`: (H,)). `disabled()` turns the masks off, so the same model serves as
    its own dense teacher.
    """

    def __init__(self, model: nn.Module, keep: Sequence[torch.Tensor] | None = None):
        self.model = model
        self.architecture: Architecture = get_architecture(model)
        downs = [self.architecture.projections(mlp)[2] for mlp in self.architecture.mlps(model)]
        if keep is None:
            keep = [torch.ones(down.in_features, dtype=torch.bool) for down in downs]
        super().__init__(downs, [mask.bool() for mask in keep])

    def update(self, keep: Sequence[torch.Tensor]) -> None:
        """Replace the masks (e.g. after another pruning step); shapes must match."""
        for layer, mask in enumerate(keep):
            self.keep[layer] = mask.to(device=self.keep[layer].device, dtype=torch.bool)

    @property
    def widths(self) -> list[int]:
        """Kept neurons per layer."""
        return [int(mask.sum()) for mask in self.keep]


class HeadMasks(ChannelMasks):
    """Per-layer boolean keep-masks (True = keep) over attention groups (a key/value head and its G
    query heads), attached to a model: each o_proj sees the group's G·d input channels multiplied
    (`weight[l]`: o_proj's (H, heads·d) refit)."""

    def __init__(self, model: nn.Module, keep: Sequence[torch.Tensor] | None = None):
        self.model = model
        self.architecture: Architecture = get_architecture(model)
        group_size, head_dim = attention_group_shape(model)
        outs = [self.architecture.attention_projections(a)[3] for a in self.architecture.attentions(model)]
        if keep is None:
            keep = [torch.ones(o.in_features // (group_size * head_dim), dtype=torch.bool) for o in outs]
        super().__init__(outs, [mask.bool() for mask in keep], repeat=group_size * head_dim)

    @property
    def kv_heads(self) -> list[int]:
        """Kept key/value heads (groups) per layer."""
        return [int(mask.sum()) for mask in self.keep]


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts; tied tensors (embedding = lm_head) are counted once."""

    total: int
    mlp: int
    mlp_per_layer: list[int]
    widths: list[int]  # MLP width per layer
    per_neuron: list[int]  # parameters removed with one neuron of each layer
    kv_heads: list[int] = field(default_factory=list)  # attention groups (key/value heads) per layer
    per_kv_head: list[int] = field(default_factory=list)  # parameters removed with one group of each layer

    def after(self, widths: Sequence[int], kv_heads: Sequence[int] | None = None) -> int:
        """Total parameters once every layer l keeps `widths[l]` neurons (and `kv_heads[l]` attention groups)."""
        removed = sum((w0 - w) * p for w0, w, p in zip(self.widths, widths, self.per_neuron, strict=True))
        if kv_heads is not None:
            removed += sum((k0 - k) * p for k0, k, p in zip(self.kv_heads, kv_heads, self.per_kv_head, strict=True))
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
    group_size, head_dim = attention_group_shape(model)
    kv_heads, per_kv_head = [], []
    for attention in architecture.attentions(model):
        q, k, v, o = architecture.attention_projections(attention)
        kv_heads.append(k.out_features // head_dim)
        per_kv_head.append(
            group_size * head_dim * (q.in_features + o.out_features + (q.bias is not None))
            + head_dim * (k.in_features + v.in_features + (k.bias is not None) + (v.bias is not None))
        )
    return ParameterCount(total, sum(mlp_per_layer), mlp_per_layer, widths, per_neuron, kv_heads, per_kv_head)
