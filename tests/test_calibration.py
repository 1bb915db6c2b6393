"""Calibration windows: sources, eligibility, determinism, data-free sampling and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from sdmprune import SdmpruneError
from sdmprune.data import extend_calibration, load_calibration
from sdmprune.data.calibration import MORE_WINDOWS_SEED


@pytest.fixture
def corpus(tmp_path):
    """A JSONL file: two short documents of 'a' and two long ones of digits and of letters."""
    path = tmp_path / "docs.jsonl"
    documents = ["a" * 10, "0123456789" * 8, "a" * 12, "klmnopqrst" * 6]
    path.write_text("\n".join(json.dumps({"text": d}) for d in documents) + "\n")
    return path


def test_windows_come_from_long_enough_documents_only(corpus, tokenizer):
    ids, summary = load_calibration(str(corpus), tokenizer, n_samples=40, seq_len=20, seed=0)
    assert ids.shape == (40, 20) and ids.dtype == torch.long
    a = tokenizer.convert_tokens_to_ids("a")
    assert not (ids == a).any()  # the 'a' documents are shorter than a window
    texts = [tokenizer.decode(row) for row in ids]
    assert all(t in "0123456789" * 8 or t in "klmnopqrst" * 6 for t in texts)
    assert {t[0].isdigit() for t in texts} == {True, False}  # both long documents are drawn from
    assert summary == {"source": str(corpus), "samples": 40, "seq_len": 20, "tokens": 800, "seed": 0,
                       "documents": 2}


def test_same_seed_same_windows(corpus, tokenizer):
    first, _ = load_calibration(str(corpus), tokenizer, n_samples=8, seq_len=16, seed=5)
    again, _ = load_calibration(str(corpus), tokenizer, n_samples=8, seq_len=16, seed=5)
    other, _ = load_calibration(str(corpus), tokenizer, n_samples=8, seq_len=16, seed=6)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_more_windows_follow_the_first_draw_and_come_from_another_one(corpus, tokenizer):
    first, _ = load_calibration(str(corpus), tokenizer, n_samples=8, seq_len=16, seed=5)
    more, summary = extend_calibration(first, 20, str(corpus), tokenizer, seed=5)
    other, _ = load_calibration(str(corpus), tokenizer, n_samples=12, seq_len=16, seed=5 + MORE_WINDOWS_SEED)
    assert more.shape == (20, 16) and torch.equal(more[:8], first) and torch.equal(more[8:], other)
    assert summary == {"windows": 20, "from_first_draw": 8, "more_seed": 5 + MORE_WINDOWS_SEED}
    fewer, summary = extend_calibration(first, 3, str(corpus), tokenizer, seed=5)
    assert torch.equal(fewer, first[:3]) and summary == {"windows": 3, "from_first_draw": 3, "more_seed": None}


def test_directory_and_text_files(tmp_path, tokenizer):
    (tmp_path / "one.txt").write_text("x" * 50)
    (tmp_path / "two.jsonl").write_text(json.dumps({"text": "y" * 50}) + "\n")
    (tmp_path / "three.py").write_text("w" * 50)  # source code counts: calibrate a code model on code
    (tmp_path / "skip.csv").write_text("z" * 50)
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "deeper.txt").write_text("v" * 50)  # only the files directly inside
    ids, summary = load_calibration(str(tmp_path), tokenizer, n_samples=60, seq_len=10, seed=0)
    letters = {tokenizer.decode(row)[0] for row in ids}
    assert letters == {"x", "y", "w"} and summary["documents"] == 3


def test_too_little_data_says_how_much_was_found(corpus, tokenizer):
    with pytest.raises(SdmpruneError, match="found 4 documents, the longest has 80 tokens"):
        load_calibration(str(corpus), tokenizer, n_samples=4, seq_len=81, seed=0)


@pytest.mark.parametrize(("spec", "message"), [
    ("nope", "unknown calibration data 'nope'"),
    ("missing/file.jsonl", "not found"),
])
def test_bad_sources(spec, message, tokenizer):
    with pytest.raises(SdmpruneError, match=message):
        load_calibration(spec, tokenizer, n_samples=2, seq_len=8)


def test_bad_jsonl_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine text"}\n{"content": "no text field"}\n')
    with pytest.raises(SdmpruneError, match="line 2 .* 'text' field"):
        load_calibration(str(path), tokenizer, n_samples=2, seq_len=4)


def test_sequence_longer_than_the_context(corpus, tokenizer):
    with pytest.raises(SdmpruneError, match="longer than the model's context"):
        load_calibration(str(corpus), tokenizer, n_samples=2, seq_len=129, model=tiny_model("llama"))


def test_self_calibration_samples_full_length_text_deterministically(tokenizer):
    model = tiny_model("llama")
    ids, summary = load_calibration("self", tokenizer, n_samples=3, seq_len=12, seed=1, model=model,
                                    temperature=1.0, top_p=0.9)
    again, _ = load_calibration("self", tokenizer, n_samples=3, seq_len=12, seed=1, model=model,
                                temperature=1.0, top_p=0.9)
    assert ids.shape == (3, 12) and torch.equal(ids, again)
    assert (ids[:, 0] == tokenizer.eos_token_id).all()  # no BOS: sampling starts from EOS
    assert (ids[:, 1:] != tokenizer.eos_token_id).all() and (ids < len(tokenizer)).all()
    assert summary["source"] == "self" and summary["tokens"] == 36 and summary["top_p"] == 0.9
    with pytest.raises(SdmpruneError, match="no model was given"):
        load_calibration("self", tokenizer, n_samples=1, seq_len=4)


def test_shared_c4_calibration_file(shared_data, tokenizer):
    """The named dataset reads the shared C4 calibration file (one document per line)."""
    ids, summary = load_calibration("c4", tokenizer, n_samples=4, seq_len=64, seed=0, data_dir=shared_data)
    assert ids.shape == (4, 64) and summary["documents"] > 900
