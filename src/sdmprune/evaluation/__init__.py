"""Evaluation: perplexity (and, later, zero-shot tasks)."""

from .perplexity import perplexity, tokenize_windows

__all__ = ["perplexity", "tokenize_windows"]
