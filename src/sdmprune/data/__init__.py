"""Text sources for perplexity, and calibration windows for importance criteria."""

from .calibration import extend_calibration, load_calibration
from .text import CALIBRATION_DATASETS, TEXT_DATASETS, load_text

__all__ = ["CALIBRATION_DATASETS", "TEXT_DATASETS", "extend_calibration", "load_calibration", "load_text"]
