"""Model loading, the packaged-model registry and the architecture registry."""

from .architectures import ARCHITECTURES, Architecture, get_architecture, register
from .loading import DEFAULT_MODEL, load_model, load_pruned
from .packaged import PACKAGED_MODELS, packaged_gguf

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "DEFAULT_MODEL",
    "PACKAGED_MODELS",
    "get_architecture",
    "load_model",
    "load_pruned",
    "packaged_gguf",
    "register",
]
