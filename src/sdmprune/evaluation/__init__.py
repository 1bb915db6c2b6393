"""Evaluation: perplexity, and zero-shot tasks through lm-evaluation-harness."""

from .perplexity import perplexity, tokenize_windows
from .tasks import evaluate_tasks

__all__ = ["evaluate_tasks", "perplexity", "tokenize_windows"]
