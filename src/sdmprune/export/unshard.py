"""FSDP-sharded models gathered back into one plain model on rank 0, so the ordinary exporters write them."""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import gathered, is_main
from ..masks import NeuronMasks
from ..models import load_model


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
    plain_masks.bias = list(masks.bias)
    return plain, plain_masks


def unshard_lora(peft_model, spec: str, lora, dtype: str, trust_remote_code: bool):
    """On rank 0, the FSDP-trained `peft_model` as a plain model on the CPU: the base reloaded from `spec`
    (its weights are frozen) with the gathered LoRA weights; None elsewhere. Every process calls it."""
    from peft import get_peft_model

    state = {name: gathered(param).detach().cpu().contiguous()
             for name, param in peft_model.named_parameters() if param.requires_grad}
    if not is_main():
        return None
    base, _ = load_model(spec, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    plain = get_peft_model(base, lora)
    unexpected = plain.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"LoRA weights without a place in the reloaded model: {unexpected[:3]}")
    return plain.eval()
