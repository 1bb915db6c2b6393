"""Integration: the bundled SmolLM2-135M pruned 20%, exported, reloaded with plain transformers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sdmprune import load_model
from sdmprune.cli import main

pytestmark = pytest.mark.slow
SHARED_DATA = Path(os.environ.get("SDMPRUNE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="module")
def data_dir() -> Path:
    wiki = SHARED_DATA / "wikitext2_raw" / "wiki.test.raw"
    assert wiki.is_file(), f"{wiki} not found: set SDMPRUNE_DATA_DIR to the shared data directory"
    return SHARED_DATA


def test_bundled_model_loads_from_cache():
    load_model("smollm2-135m", device="cpu")  # converts once if the cache is empty
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    seconds = time.perf_counter() - start
    print(f"cached load of smollm2-135m: {seconds:.1f} s")
    assert seconds < 15
    assert model.config.num_hidden_layers == 30 and model.config.intermediate_size == 1536
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not hasattr(model.config, "quantization_config")


def test_prune_20_percent_exports_a_plain_model(tmp_path, data_dir, capsys):
    out = tmp_path / "smollm2-p20"
    width_multiple = 8
    # the default sequential refit on 16 × 128 C4 tokens, the 8 scoring windows and 8 more (seconds, not the
    # default 128 × 256)
    code = main(["prune", "--ratio", "0.2", "--criterion", "magnitude", "--width-multiple", str(width_multiple),
                 "--calib-samples", "8", "--calib-seq-len", "128", "--refit-samples", "16",
                 "--ppl-data", "wikitext2", "--data-dir", str(data_dir), "--seq-len", "256",
                 "--max-tokens", "1024", "--output", str(out)])
    printed = capsys.readouterr().out
    print(printed)
    assert code == 0
    record = json.loads((out / "pruning.json").read_text())
    before, after = record["evaluation"]["before"], record["evaluation"]["after"]
    assert f"{before['ppl']:.2f} -> {after['ppl']:.2f}" in printed
    assert before["tokens"] == 4 * 255 and 10 < before["ppl"] < 60  # dense SmolLM2 on WikiText-2
    assert after["ppl"] > before["ppl"] and record["reconstruction"]["mode"] == "sequential"
    assert record["reconstruction"]["tokens"] == 16 * 128 and record["reconstruction"]["calibration"]["windows"] == 16

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    assert params == record["achieved"]["params_after"]
    one_multiple = width_multiple * 3 * 576 * 30 / 134_515_008
    assert 0.2 <= 1 - params / 134_515_008 < 0.2 + one_multiple
    assert model.config.intermediate_size % width_multiple == 0


@pytest.mark.parametrize(("case", "message"), [
    ("empty", "has no text"),
    ("binary", "is not UTF-8 text"),
    ("too-long", "longer than the model's context"),
    ("missing", "not found"),
    ("too-short", "no calibration document has"),
])
def test_bad_calibration_fails_in_seconds_before_any_model_pass(case, message, tmp_path, data_dir, capsys,
                                                               monkeypatch):
    """Each bad --calib exits 2 with one line, before the dense perplexity pass (which alone takes ~30 s)."""
    load_model("smollm2-135m", device="cpu")  # the conversion (first run only) is not what is timed
    calib = {"empty": tmp_path / "empty.txt", "binary": tmp_path / "weights.txt", "too-long": tmp_path / "ok.txt",
             "missing": tmp_path / "nope.txt", "too-short": tmp_path / "short.txt"}[case]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "weights.txt").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "ok.txt").write_text("Some text. " * 200)
    (tmp_path / "short.txt").write_text("A few words only.")
    seq_len = "100000" if case == "too-long" else "256"
    import sdmprune.recipes.steps as steps

    monkeypatch.setattr(steps, "perplexity", lambda *a, **k: pytest.fail("perplexity ran before the check"))
    start = time.perf_counter()
    code = main(["prune", "--ratio", "0.2", "--calib", str(calib), "--calib-seq-len", seq_len, "--ppl-data",
                 "wikitext2", "--data-dir", str(data_dir), "--output", str(tmp_path / "out")])
    seconds = time.perf_counter() - start
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert seconds < 10, f"{case}: {seconds:.1f} s"
    assert not (tmp_path / "out").exists()
