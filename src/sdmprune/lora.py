"""Attaching LoRA adapters (peft) to a model, for every method that trains them (NutePrune, recovery)."""

from __future__ import annotations

from torch import nn

from .config import LoraOptions
from .errors import SdmpruneError


def attach_lora(model: nn.Module, options: LoraOptions, **settings):
    """`(peft_model, lora_config)`: `model` with LoRA layers injected in place per `options`; `settings` go to
    peft's `LoraConfig` (e.g. task_type, base_model_name_or_path)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                      target_modules=options.targets(), bias="none", **settings)
    try:
        return get_peft_model(model, lora), lora
    except ValueError as error:
        raise SdmpruneError(f"LoRA could not be attached ({str(error).splitlines()[0][:200]}): check "
                            "--lora-targets against the model's module names") from error
