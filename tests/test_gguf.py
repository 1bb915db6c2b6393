"""GGUF export: transformers' own GGUF reader gives back the HF export's logits and tokenizer; per-layer exports
read back as llama.cpp's `deci` with their true shapes; refusals; nothing is left behind on failure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import VOCAB, manual_report, random_keep, tiny_model
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import sdmprune.export.gguf as gguf_export
from sdmprune import SdmpruneError, export_pruned, prune
from sdmprune.export import export_gguf
from sdmprune.masks import HeadMasks, NeuronMasks

IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
Q = GGMLQuantizationType
# q8_0 against the unquantised export, on these random 2-layer models (logit std ≈ 1.1): measured 0.24 max
Q8_TOLERANCE = 0.5


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs tiny models: one thread."""


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with two merges, BOS/EOS and a chat template: 260 tokens, as many as the tiny models' rows."""
    vocab = {char: index for index, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"Ġt": 256, "he": 257})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t"), ("h", "e")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def tiny(arch: str, **overrides):
    """A tiny model whose embedding fits `bpe_tokenizer` as its class loads it (Qwen2's adds <|endoftext|>)."""
    return tiny_model(arch, **{"vocab_size": VOCAB + 1 if arch in ("qwen2", "qwen3") else VOCAB, **overrides})


def uniform_export(arch: str, tmp_path, width_multiple: int = 1):
    """A uniform 40%-of-MLP export of a tiny `arch` model."""
    model = tiny(arch)
    result = prune(model, mlp_ratio=0.4, criterion="random", seed=3, width_multiple=width_multiple)
    return export_pruned(model, bpe_tokenizer(), result.masks, tmp_path / f"{arch}-export", report=result.report)


def save(model, directory, tokenizer=None):
    """`model` saved as a plain HF directory with `tokenizer` (default `bpe_tokenizer()`)."""
    model.save_pretrained(directory)
    (tokenizer or bpe_tokenizer()).save_pretrained(directory)
    return directory


def read_back(path) -> AutoModelForCausalLM:
    """The GGUF file as transformers' own GGUF reader loads it."""
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_uniform_f32_round_trips_through_transformers(arch, tmp_path):
    out = uniform_export(arch, tmp_path)
    expected = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
    path = export_gguf(out, tmp_path / "gguf" / "model.gguf", dtype="f32", verify=True)
    assert (logits(read_back(path)) - expected).abs().max().item() <= 1e-4

    reader = GGUFReader(path)
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.feed_forward_length") == json.loads((out / "pruning.json").read_text())["widths"][0]
    assert field(reader, "tokenizer.ggml.pre") == ("gpt-2" if arch == "llama" else "qwen2")
    original, restored = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(path.parent,
                                                                                            gguf_file=path.name)
    text = "the theme of the tether"
    assert restored(text)["input_ids"] == original(text)["input_ids"]
    assert (restored.chat_template, restored.eos_token, restored.bos_token) == (TEMPLATE, "<eos>", "<bos>")
    assert not list(path.parent.glob(".*.tmp"))


def test_q8_0_equals_the_export_with_q8_0_weights(tmp_path):
    """With width 32 every matrix is quantised; the file's logits are the HF export's with each matrix replaced by
    its q8_0 round trip (to 1e-4), and within Q8_TOLERANCE of the unquantised export's."""
    out = uniform_export("llama", tmp_path, width_multiple=32)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    exact = logits(model)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                stored = quantize(param.numpy(), Q.Q8_0)
                param.copy_(torch.from_numpy(dequantize(stored, Q.Q8_0)))
    path = export_gguf(out, tmp_path / "gguf" / "model.gguf", dtype="q8_0", verify=True)
    assert {t.tensor_type for t in GGUFReader(path).tensors if len(t.shape) == 2} == {Q.Q8_0}
    got = logits(read_back(path))
    assert (got - logits(model)).abs().max().item() <= 1e-4
    assert (got - exact).abs().max().item() <= Q8_TOLERANCE


def reference_q8_0(block: np.ndarray) -> bytes:
    """ggml's Q8_0 for one block of 32, element by element: d = max|x| / 127, q = round-half-away(x / d)."""
    d = float(np.abs(block).max()) / 127
    inverse = 1 / d if d else 0.0
    quants = [int(np.sign(v) * np.floor(abs(v) * inverse + 0.5)) for v in block.astype(np.float32) * np.float32(1)]
    return np.float16(d).tobytes() + np.array(quants, dtype=np.int8).tobytes()


def reference_q4_0(block: np.ndarray) -> bytes:
    """ggml's Q4_0 for one block of 32: d = (signed value of largest magnitude) / -8, q = min(15, int(x/d + 8.5));
    byte j holds element j in its low nibble and element j + 16 in its high nibble."""
    largest = float(block[np.argmax(np.abs(block))])
    d = largest / -8
    inverse = 1 / d if d else 0.0
    quants = [min(15, int(np.float32(v) * np.float32(inverse) + np.float32(8.5))) for v in block]
    packed = [quants[j] | (quants[j + 16] << 4) for j in range(16)]
    return np.float16(d).tobytes() + bytes(packed)


@pytest.mark.parametrize(("qtype", "reference"), [(Q.Q8_0, reference_q8_0), (Q.Q4_0, reference_q4_0)])
def test_gguf_quantisers_match_ggml_reference(qtype, reference):
    """gguf.quants writes the bytes ggml's reference quantiser writes (random blocks, a zero block, ties)."""
    rows = np.random.default_rng(0).normal(0, 0.2, (6, 64)).astype(np.float32)
    rows[1, :32] = 0
    rows[2, :32] = np.linspace(-1, 1, 32)
    rows[3, 32:] = -np.abs(rows[3, 32:])
    stored = quantize(rows, qtype)
    expected = b"".join(reference(block) for block in rows.reshape(-1, 32))
    assert stored.tobytes() == expected
    error = np.abs(dequantize(stored, qtype) - rows)
    assert np.all(error <= gguf_export._tolerance(rows, qtype))


def test_q4_0_round_trips_with_q8_0_embeddings(tmp_path):
    out = uniform_export("llama", tmp_path, width_multiple=32)
    path = export_gguf(out, tmp_path / "model.gguf", dtype="q4_0", verify=True)
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert types["token_embd.weight"] == types["output.weight"] == Q.Q8_0
    assert types["blk.0.ffn_down.weight"] == types["blk.1.attn_q.weight"] == Q.Q4_0
    assert types["blk.0.attn_norm.weight"] == Q.F32
    assert read_back(path).config.intermediate_size == 32


def test_rows_that_are_not_whole_blocks_fall_back_to_f16(tmp_path):
    out = uniform_export("llama", tmp_path)  # width 38: down_proj rows are 38 long
    with pytest.warns(UserWarning, match="written f16"):
        path = export_gguf(out, tmp_path / "model.gguf", dtype="q8_0", verify=True)
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == Q.F16 and types["blk.0.ffn_up.weight"] == Q.Q8_0
    expected = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
    assert (logits(read_back(path)) - expected).abs().max().item() <= Q8_TOLERANCE


def non_uniform_export(arch: str, tmp_path, heads: bool = False, padded: bool = False):
    """Widths 40 and 24 (of 64); with `heads`, layer 0 keeps one key/value group of two."""
    model = tiny(arch)
    head_masks = HeadMasks(model, [torch.tensor([False, True]), torch.tensor([True, True])]) if heads else None
    return export_pruned(model, bpe_tokenizer(), NeuronMasks(model, random_keep()), tmp_path / f"{arch}-per-layer",
                         report=manual_report(), heads=head_masks, padded=padded)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_per_layer_widths_are_written_as_deci(arch, tmp_path):
    out = non_uniform_export(arch, tmp_path)
    path = export_gguf(out, dtype="f16", verify=True)
    assert path == out / f"{out.name}-f16.gguf"
    reader = GGUFReader(path)
    assert field(reader, "general.architecture") == "deci"
    assert field(reader, "deci.feed_forward_length") == [40, 24]
    assert field(reader, "deci.attention.head_count") == [4, 4]
    assert field(reader, "deci.attention.head_count_kv") == [2, 2]
    assert field(reader, "deci.attention.key_length") == field(reader, "deci.rope.dimension_count") == 8
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert shapes["blk.0.ffn_down.weight"] == [40, 32] and shapes["blk.1.ffn_gate.weight"] == [32, 24]
    assert ("blk.0.attn_q.bias" in shapes) == (arch == "qwen2")
    assert ("output.weight" in shapes) == (arch == "llama")  # qwen2's tiny model ties its embeddings


def test_per_layer_kv_heads_and_padded_twin(tmp_path):
    out = non_uniform_export("llama", tmp_path, heads=True)
    reader = GGUFReader(export_gguf(out, verify=True))
    assert field(reader, "deci.attention.head_count") == [2, 4]
    assert field(reader, "deci.attention.head_count_kv") == [1, 2]
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight"] == [32, 16] and shapes["blk.0.attn_k.weight"] == [32, 8]
    assert shapes["blk.0.attn_output.weight"] == [16, 32] and shapes["blk.1.attn_q.weight"] == [32, 32]

    padded = non_uniform_export("llama", tmp_path / "padded", heads=True, padded=True)
    path = export_gguf(padded, dtype="f32", verify=True)
    assert field(GGUFReader(path), "general.architecture") == "llama"
    expected = logits(AutoModelForCausalLM.from_pretrained(padded, dtype=torch.float32).eval())
    assert (logits(read_back(path)) - expected).abs().max().item() <= 1e-4


def test_uniform_heads_removed(tmp_path):
    """Fewer heads than hidden / head_dim: Llama stays `llama` (key length written), Qwen2 needs `deci`."""
    for arch, expected_arch in (("llama", "llama"), ("qwen2", "deci")):
        model = tiny(arch)
        heads = HeadMasks(model, [torch.tensor([False, True]), torch.tensor([True, False])])
        widths = NeuronMasks(model, [torch.ones(64, dtype=torch.bool)] * 2)
        out = export_pruned(model, bpe_tokenizer(), widths, tmp_path / arch, report=manual_report(), heads=heads)
        path = export_gguf(out, dtype="f32", verify=True)
        reader = GGUFReader(path)
        assert field(reader, "general.architecture") == expected_arch
        assert field(reader, f"{expected_arch}.attention.head_count") in (2, [2, 2])
        if arch == "llama":
            expected = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
            assert (logits(read_back(path)) - expected).abs().max().item() <= 1e-4


def test_mistral_is_written_as_llama_with_its_window_as_context(tmp_path):
    """llama.cpp's `llama` graph attends to the whole context; within Mistral's sliding window that is the same
    function, so the window caps the context length. (Named so: transformers reads a general.name containing
    "mistral" as its own mistral type, which its GGUF loader lacks.)"""
    model = tiny("mistral", sliding_window=64)
    path = export_gguf(save(model, tmp_path / "windowed"), tmp_path / "windowed.gguf", dtype="f32", verify=True)
    reader = GGUFReader(path)
    assert (field(reader, "general.architecture"), field(reader, "llama.context_length")) == ("llama", 64)
    assert (logits(read_back(path)) - logits(model)).abs().max().item() <= 1e-4


def test_tokenizer_is_copied_from_the_source_gguf(tmp_path):
    """A model that came from a GGUF file (pruning.json's source_model) gets that file's tokenizer.* keys, byte for
    byte; a tokenizer of another size is refused."""
    source = export_gguf(save(tiny("llama"), tmp_path / "dense"), tmp_path / "source.gguf", dtype="f32")
    model = tiny("llama")
    result = prune(model, mlp_ratio=0.25, criterion="magnitude")
    other = bpe_tokenizer()
    other.chat_template = "{{ 'not the source template' }}"
    out = export_pruned(model, other, result.masks, tmp_path / "pruned",
                        report={**result.report, "source_model": str(source)})
    copied = GGUFReader(export_gguf(out, verify=True))
    original = GGUFReader(source)
    keys = sorted(key for key in original.fields if key.startswith("tokenizer."))
    assert keys == sorted(key for key in copied.fields if key.startswith("tokenizer."))
    for key in keys:
        assert copied.fields[key].contents() == original.fields[key].contents(), key

    bigger = save(tiny("llama", vocab_size=VOCAB + 8), tmp_path / "bigger")
    with pytest.raises(SdmpruneError, match="has 260 tokens but the model's embedding has 268 rows"):
        export_gguf(bigger, tokenizer_from=source)


def test_scaled_rotary_embedding_becomes_rope_factors(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}
    for arch, expected_arch in (("llama", "llama"), ("qwen2", "deci")):
        model = tiny(arch, rope_parameters=scaling)
        path = export_gguf(save(model, tmp_path / arch), dtype="f32", verify=True)
        reader = GGUFReader(path)
        assert field(reader, "general.architecture") == expected_arch
        factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
        plain = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
        assert np.allclose(factors, plain / model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
        assert factors.max() > 1  # low frequencies are slowed down


def test_refusals(tmp_path):
    out = non_uniform_export("qwen3", tmp_path)
    with pytest.raises(SdmpruneError, match="qwen3 .* per-layer widths .*--padded"):
        export_gguf(out)
    with pytest.raises(SdmpruneError, match="unknown GGUF type 'q5_k': choose one of f32, f16, bf16, q8_0, q4_0"):
        export_gguf(out, dtype="q5_k")
    (out / "taken.gguf").write_bytes(b"")
    with pytest.raises(SdmpruneError, match="already exists"):
        export_gguf(out, out / "taken.gguf")

    yarn = tiny("llama", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                          "original_max_position_embeddings": 32})
    with pytest.raises(SdmpruneError, match="rotary embedding 'yarn'"):
        export_gguf(save(yarn, tmp_path / "yarn"))

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(SdmpruneError, match="not a byte-level BPE tokenizer .* tokenizer_from"):
        export_gguf(save(tiny("llama"), tmp_path / "word-level", word_level))
    assert [p.name for p in tmp_path.rglob("*.gguf*")] == ["taken.gguf"]


def test_failure_leaves_no_file(tmp_path, monkeypatch):
    out = uniform_export("llama", tmp_path)
    target = tmp_path / "model.gguf"
    monkeypatch.setattr(gguf_export, "_tolerance", lambda expected, qtype: np.full(expected.shape, -1.0))
    with pytest.raises(SdmpruneError, match="verification failed .* differs from the exported weights"):
        export_gguf(out, target, verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-export"]

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf_export.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export_gguf(out, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-export"]


def test_prune_with_gguf_rounds_widths_for_llama_cpp_and_writes_the_file(saved_model, tmp_path, capsys):
    """`prune --gguf TYPE` writes the GGUF beside the export; without --width-multiple widths become multiples of
    32 (llama.cpp's kernels); `sdmprune gguf DIR` converts an existing export."""
    from sdmprune.cli import main

    argv = ["prune", "--model", str(saved_model), "--mlp-ratio", "0.3", "--criterion", "magnitude", "--ppl-data",
            "none", "--reconstruct", "none", "--gguf", "f32"]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 0
    record = json.loads((tmp_path / "a" / "pruning.json").read_text())
    assert record["widths"] == [32, 32] and (tmp_path / "a" / "a-f32.gguf").stat().st_size > 0
    assert main([*argv, "--width-multiple", "8", "--output", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "pruning.json").read_text())["widths"] == [40, 40]
    assert main(["gguf", str(tmp_path / "b"), "--gguf", "q8_0", "--gguf-path", str(tmp_path / "b.gguf")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "b.gguf").is_file()
