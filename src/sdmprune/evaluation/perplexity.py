"""Perplexity over non-overlapping windows (METHOD.md protocol).

The text is tokenised once, cut into windows of `seq_len` tokens (the remainder dropped), and
PPL = exp(mean next-token NLL over every predicted token of every window).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..distributed import all_reduce_sum, inference_context, is_main, is_sharded, shard_windows
from ..errors import SdmpruneError
from ..runtime import autocast_context, context_length


def tokenize_windows(
    tokenizer, text: str, seq_len: int, max_tokens: int | None = None, model: nn.Module | None = None
) -> torch.Tensor:
    """(n_windows, seq_len) token ids: `text` tokenised once, optionally capped at `max_tokens`."""
    if seq_len < 2:
        raise SdmpruneError(f"--seq-len must be at least 2, got {seq_len}")
    limit = context_length(model) if model is not None else None
    if limit is not None and seq_len > limit:
        raise SdmpruneError(f"--seq-len {seq_len} is longer than the model's context ({limit} tokens): lower it")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise SdmpruneError(
            f"the text has {ids.numel()} tokens (after --max-tokens), fewer than one window of {seq_len}: "
            "use a longer text, a larger --max-tokens or a smaller --seq-len"
        )
    return ids[: n_windows * seq_len].view(n_windows, seq_len)


def perplexity(
    model: nn.Module,
    tokenizer,
    text: str | torch.Tensor,
    *,
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 1,
    bf16: bool = False,
    progress: bool = True,
) -> dict:
    """Perplexity of `model` on `text` (a string, or (n, seq_len) ids from `tokenize_windows`).

    Returns {"ppl", "nll", "nll_stderr", "window_nll", "tokens" (predicted tokens), "windows", "seq_len",
    "seconds", "tokens_per_s"}; `window_nll` is each window's mean NLL (nats) and `nll_stderr` the standard
    error of their mean (evaluation noise).
    """
    windows = text if isinstance(text, torch.Tensor) else tokenize_windows(tokenizer, text, seq_len, max_tokens, model)
    device = next(model.parameters()).device
    window_nll = torch.zeros(windows.shape[0], dtype=torch.float64)
    start = time.perf_counter()
    batches = shard_windows(windows, batch_size, lockstep=is_sharded(model))  # all of them in a single process
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not (progress and is_main()), leave=False):
        ids = batch.ids.to(device)
        with inference_context(model), autocast_context(device, bf16):
            logits = model(input_ids=ids, use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")  # (B, S-1)
        if batch.counts:
            window_nll[batch.start:batch.start + ids.shape[0]] = nll.mean(1).double().cpu()
    all_reduce_sum([window_nll])  # several processes: each window was filled by exactly one
    seconds = time.perf_counter() - start
    mean_nll = window_nll.mean().item()  # every window predicts seq_len - 1 tokens: the mean over tokens
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    if not math.isfinite(mean_nll):
        raise SdmpruneError("perplexity is not finite: the model produced inf/nan logits (try --dtype float32)")
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "nll_stderr": window_nll.std().item() / math.sqrt(len(window_nll)) if len(window_nll) > 1 else 0.0,
        "window_nll": window_nll.tolist(),
        "tokens": predicted,
        "windows": windows.shape[0],
        "seq_len": windows.shape[1],
        "seconds": seconds,
        "tokens_per_s": windows.numel() / seconds,
    }
