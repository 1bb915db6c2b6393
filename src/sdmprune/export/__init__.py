"""Export stages: slicing a masked model into a Hugging Face directory (`hf`), gathering an FSDP-sharded
model first (`unshard`), and writing an export as a GGUF file for llama.cpp (`gguf`)."""

from .gguf import GGUF_TYPES, export_gguf
from .hf import export_copy, export_pruned, model_card, slice_model
from .unshard import unshard_for_export, unshard_lora

__all__ = ["GGUF_TYPES", "export_copy", "export_gguf", "export_pruned", "model_card", "slice_model",
           "unshard_for_export", "unshard_lora"]
