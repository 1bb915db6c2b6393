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
    code = main(["prune", "--ratio", "0.2", "--criterion", "magnitude", "--width-multiple", str(width_multiple),
                 "--ppl-data", "wikitext2", "--data-dir", str(data_dir), "--seq-len", "256",
                 "--max-tokens", "1024", "--output", str(out)])
    printed = capsys.readouterr().out
    print(printed)
    assert code == 0
    record = json.loads((out / "pruning.json").read_text())
    before, after = record["evaluation"]["before"], record["evaluation"]["after"]
    assert f"{before['ppl']:.2f} -> {after['ppl']:.2f}" in printed
    assert before["tokens"] == 4 * 255 and 10 < before["ppl"] < 60  # dense SmolLM2 on WikiText-2
    assert after["ppl"] > before["ppl"]

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    assert params == record["achieved"]["params_after"]
    one_multiple = width_multiple * 3 * 576 * 30 / 134_515_008
    assert 0.2 <= 1 - params / 134_515_008 < 0.2 + one_multiple
    assert model.config.intermediate_size % width_multiple == 0
