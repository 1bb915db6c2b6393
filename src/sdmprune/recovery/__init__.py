"""Recovery after pruning: LoRA fine-tuning on instruction data, optionally distilling from the dense model."""

from .adapter import is_adapter_dir, load_adapter
from .data import format_prompt, load_instructions, tokenize_example
from .finetune import FinetuneConfig

__all__ = ["FinetuneConfig", "format_prompt", "is_adapter_dir", "load_adapter", "load_instructions",
           "tokenize_example"]
