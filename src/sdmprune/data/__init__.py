"""Text sources for perplexity and calibration."""

from .text import TEXT_DATASETS, load_text

__all__ = ["TEXT_DATASETS", "load_text"]
