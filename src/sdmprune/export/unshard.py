"""An FSDP-sharded model gathered back into one plain model on rank 0, so the ordinary exporter writes it."""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import is_main
from ..masks import NeuronMasks


def unshard_for_export(model: nn.Module, masks: NeuronMasks) -> tuple[nn.Module, NeuronMasks] | None:
    """A plain copy of an FSDP `model` on rank 0's CPU with `masks` attached (None elsewhere); call on every
    process. The full state comes from `get_model_state_dict(full_state_dict=True)`; buffers, which FSDP
    does not shard, are copied from the local module."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    plain_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = plain_class(model.config)
    plain.load_state_dict(state, assign=True)
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buffer.detach().to("cpu", copy=True)
    plain.tie_weights()
    plain_masks = NeuronMasks(plain.eval(), masks.keep)
    plain_masks.down_bias = list(masks.down_bias)
    return plain, plain_masks
