"""Shape surgery on a decoder's projections: keep chosen MLP neurons or attention groups, optionally
zero-padded to a larger size. Used to slice a pruned model (export) and to build one with per-layer
shapes before loading its weights (`load_pruned`)."""

from __future__ import annotations

import torch
from torch import nn

from .architectures import Architecture


def take(tensor: torch.Tensor, dim: int, index: torch.Tensor, size: int) -> nn.Parameter:
    """Entries `index` of `tensor` along `dim`, zero-padded to `size` (>= len(index)) there."""
    kept = tensor.detach().index_select(dim, index.to(tensor.device))
    if size > index.numel():
        pad_shape = list(kept.shape)
        pad_shape[dim] = size - index.numel()
        kept = torch.cat([kept, kept.new_zeros(pad_shape)], dim=dim)
    return nn.Parameter(kept.contiguous(), requires_grad=tensor.requires_grad)


def resize_outputs(linear: nn.Linear, index: torch.Tensor, size: int) -> None:
    linear.weight = take(linear.weight, 0, index, size)
    if linear.bias is not None:
        linear.bias = take(linear.bias, 0, index, size)
    linear.out_features = size


def resize_mlp(architecture: Architecture, mlp: nn.Module, index: torch.Tensor, width: int) -> None:
    """Keep neurons `index` of one MLP, zero-padded to `width` (>= len(index)), in place."""
    gate, up, down = architecture.projections(mlp)
    for linear in (gate, up):
        resize_outputs(linear, index, width)
    down.weight = take(down.weight, 1, index, width)
    down.in_features = width


def resize_attention(architecture: Architecture, attention: nn.Module, index: torch.Tensor, n_groups: int,
                      group_size: int, head_dim: int) -> None:
    """Keep attention groups `index` (key/value heads with their G query heads) of one attention block,
    zero-padded to `n_groups` (>= len(index)) groups, in place."""
    q, k, v, o = architecture.attention_projections(attention)
    index = index.to(q.weight.device)

    def channels(width: int) -> torch.Tensor:  # the rows of each kept group in a (groups·width)-row weight
        return (index[:, None] * width + torch.arange(width, device=index.device)).flatten()

    resize_outputs(q, channels(group_size * head_dim), n_groups * group_size * head_dim)
    for linear in (k, v):
        resize_outputs(linear, channels(head_dim), n_groups * head_dim)
    o.weight = take(o.weight, 1, channels(group_size * head_dim), n_groups * group_size * head_dim)
    o.in_features = n_groups * group_size * head_dim
