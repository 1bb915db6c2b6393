"""Tiny randomly initialised models of every supported architecture, built in code (no downloads)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers import decoders as tokenizer_decoders
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
VOCAB = 260


def tiny_config(model_type: str, **overrides):
    settings = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=model_type in ("qwen2", "qwen3", "gemma3_text"),
    )
    if model_type == "qwen3":
        settings["head_dim"] = 8
    if model_type == "gemma3_text":
        # As Gemma 3 270M/1B: one key/value head, head_dim not hidden/heads, sliding layers then a full one.
        # A window of 4 tokens is shorter than the test inputs, so the sliding mask matters.
        layers = overrides.get("num_hidden_layers", settings["num_hidden_layers"])
        settings.update(num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                        layer_types=["full_attention" if (i + 1) % 2 == 0 else "sliding_attention"
                                     for i in range(layers)])
    settings.update(overrides)
    return AutoConfig.for_model(model_type, **settings)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    with torch.no_grad():  # random init gives near-uniform logits; widen them so differences show
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    return model.eval()


def manual_report(mlp_ratio: float | None = None, widths_before: tuple[int, ...] = (64, 64)) -> dict:
    """The report `export_pruned` needs for masks set by hand on a tiny model (no parameter counts)."""
    return {"method": "manual", "requested": {"ratio": None, "mlp_ratio": mlp_ratio}, "seed": 0,
            "achieved": {"ratio": 0.0, "mlp_ratio": mlp_ratio or 0.0, "params_before": 0, "params_after": 0},
            "widths_before": list(widths_before)}


def random_keep(widths: tuple[int, ...] = (40, 24), intermediate: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Per layer, a boolean keep mask over `intermediate` neurons with `widths[layer]` of them kept at random."""
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for width in widths:
        mask = torch.zeros(intermediate, dtype=torch.bool)
        mask[torch.randperm(intermediate, generator=generator)[:width]] = True
        keep.append(mask)
    return keep


def byte_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with 256 byte tokens + EOS; with `bos` also a BOS token that, like SmolLM2's
    tokenizer, it defines but does not add."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizer_decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", bos_token="<bos>" if bos else None)


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread (and do not compete with other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture
def saved_model(tmp_path, tokenizer):
    """A tiny Llama saved as a local HF directory."""
    directory = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


@pytest.fixture
def shared_data():
    """The shared data directory: $SDMPRUNE_DATA_DIR, else ../shared/data next to the repository."""
    import os
    from pathlib import Path

    directory = Path(os.environ.get("SDMPRUNE_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))
    assert directory.is_dir(), f"{directory} not found: set SDMPRUNE_DATA_DIR to the shared data directory"
    return directory


def sigkill_at_loss_script(condition: str) -> str:
    """A Python script running `sdmprune.cli.main(sys.argv[1:])` that SIGKILLs its own process at the loss
    evaluation where `condition` (on `calls`, the count of losses so far, and `os`) first holds."""
    return f"""
import os, signal, sys
import sdmprune.criteria.gradients as gradients
from sdmprune.cli import main

calls = 0
original = gradients.self_distillation_loss

def loss_then_die(*args, **kwargs):
    global calls
    calls += 1
    if {condition}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)

gradients.self_distillation_loss = loss_then_die
sys.exit(main(sys.argv[1:]))
"""
