"""Model loading and the architecture registry."""

from .architectures import ARCHITECTURES, Architecture, get_architecture, register
from .loading import DEFAULT_MODEL, load_model, load_pruned

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "DEFAULT_MODEL",
    "get_architecture",
    "load_model",
    "load_pruned",
    "register",
]
