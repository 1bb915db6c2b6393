"""Export stages: slicing a masked model into a Hugging Face directory (`hf`), and gathering an FSDP-sharded
model first (`unshard`)."""

from .hf import export_pruned, model_card, slice_model
from .unshard import unshard_for_export

__all__ = ["export_pruned", "model_card", "slice_model", "unshard_for_export"]
