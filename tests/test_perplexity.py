"""Perplexity follows the window protocol and equals a direct computation."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from sdmprune import SdmpruneError, perplexity, runtime
from sdmprune.data import load_text
from sdmprune.evaluation import tokenize_windows


def test_perplexity_equals_direct_computation(tokenizer):
    model = tiny_model("llama")
    text = "abcdefghij" * 10  # 100 byte tokens
    result = perplexity(model, tokenizer, text, seq_len=32, batch_size=2, progress=False)
    ids = torch.tensor(tokenizer(text)["input_ids"][:96]).view(3, 32)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert result["windows"] == 3 and result["tokens"] == 3 * 31 and result["seq_len"] == 32
    assert result["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    per_window = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
    assert result["window_nll"] == pytest.approx(per_window.tolist(), rel=1e-5)
    assert result["nll_stderr"] == pytest.approx(per_window.std().item() / math.sqrt(3), rel=1e-4)
    capped = perplexity(model, tokenizer, text, seq_len=32, max_tokens=64, progress=False)
    assert capped["windows"] == 2


def test_bf16_autocast_is_close(tokenizer, monkeypatch):
    monkeypatch.setattr(runtime, "native_bf16", lambda device_type: True)  # autocast runs whatever this CPU has
    model = tiny_model("llama")
    text = "hello world, " * 20
    fp32 = perplexity(model, tokenizer, text, seq_len=64, progress=False)["ppl"]
    bf16 = perplexity(model, tokenizer, text, seq_len=64, bf16=True, progress=False)["ppl"]
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)


def test_bf16_runs_in_fp32_without_native_bf16(tokenizer, monkeypatch):
    monkeypatch.setattr(runtime, "native_bf16", lambda device_type: False)  # e.g. an AVX2-only CPU
    runtime._warn_bf16_unavailable.cache_clear()
    model = tiny_model("llama")
    text = "hello world, " * 20
    fp32 = perplexity(model, tokenizer, text, seq_len=64, progress=False)["ppl"]
    with pytest.warns(UserWarning, match="no native bf16 matrix products .* running in fp32"):
        bf16 = perplexity(model, tokenizer, text, seq_len=64, bf16=True, progress=False)["ppl"]
    assert bf16 == fp32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        assert perplexity(model, tokenizer, text, seq_len=64, bf16=True, progress=False)["ppl"] == fp32
    with pytest.warns(UserWarning, match="~100x slower than float32"):
        assert runtime.resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert runtime.library_versions()["bf16_autocast"] == "unavailable (runs in fp32)"


def test_window_errors(tokenizer):
    model = tiny_model("llama")  # context 128
    with pytest.raises(SdmpruneError, match="longer than the model's context"):
        tokenize_windows(tokenizer, "x" * 1000, 256, model=model)
    with pytest.raises(SdmpruneError, match="fewer than one window of 64"):
        tokenize_windows(tokenizer, "short", 64, model=model)


def test_text_sources(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "first"}\n{"text": "second"}\n')
    assert load_text(str(jsonl)) == "first\n\nsecond"
    (tmp_path / "wikitext2_raw").mkdir()
    (tmp_path / "wikitext2_raw" / "wiki.test.raw").write_bytes(b" = A = \r\n \r\n text \r\n")
    assert load_text("wikitext2", tmp_path) == " = A = \n\n \n\n text \n\n"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SdmpruneError, match="is empty"):
        load_text(str(empty))
    with pytest.raises(SdmpruneError, match="neither a file nor a dataset name"):
        load_text(str(tmp_path / "missing.txt"))
