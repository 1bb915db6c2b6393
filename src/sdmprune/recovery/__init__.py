"""Recovery after pruning: LoRA fine-tuning on instruction data, optionally distilling from the dense model."""

from .data import format_prompt, load_instructions, tokenize_example
from .finetune import FinetuneConfig, finetune, load_adapter

__all__ = ["FinetuneConfig", "finetune", "format_prompt", "load_adapter", "load_instructions", "tokenize_example"]
