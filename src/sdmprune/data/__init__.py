"""Text sources for perplexity, and calibration windows for importance criteria."""

from .calibration import load_calibration
from .text import CALIBRATION_DATASETS, TEXT_DATASETS, load_text

__all__ = ["CALIBRATION_DATASETS", "TEXT_DATASETS", "load_calibration", "load_text"]
