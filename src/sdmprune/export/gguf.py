"""Write a GGUF file that llama.cpp loads, from an sdmprune export (any layout) or a plain Hugging Face directory.

Architecture written (llama.cpp's names):
- Same MLP width and head counts in every layer: the model's own, `llama` (Llama, SmolLM, Mistral), `qwen2` or
  `qwen3`. A uniform NutePrune export (fewer heads everywhere) stays `llama`/`qwen3`.
- Widths or key/value head counts that differ per layer (`layout: per-layer`): `deci` (DeciLM / Nemotron-NAS), whose
  `deci.feed_forward_length`, `deci.attention.head_count` and `deci.attention.head_count_kv` are per-layer arrays.
  `deci` is Llama's block (RMSNorm, SwiGLU, rotary attention) with optional q/k/v/o and MLP biases, so Llama,
  Mistral and Qwen2 fit; Qwen2 also goes there when heads were removed (llama.cpp's `qwen2` graph assumes
  heads × head_dim = hidden size) or its rotary embedding is scaled (`qwen2` reads no frequency factors).
- A padded export is an ordinary uniform model (the zero padding is written and computed).
Refused, with the reason: Qwen3 with per-layer shapes (`deci` has no q/k norms), a layer left with no neuron or no
key/value head (`deci` reads 0 as "no MLP" / "linear attention"), rotary scalings other than linear and llama3
(llama3 and linear become llama.cpp's per-dimension `rope_freqs` factors), partial rotary embeddings.

Weights: `dtype` is one of `GGUF_TYPES`. 1-D tensors (norms, biases, rope factors) are always f32. q8_0 and q4_0
quantise rows in blocks of 32 weights, so a matrix whose rows are not a multiple of 32 long (down_proj at a width
such as 757) is written f16 instead, as llama.cpp's own converter does; with q4_0 the token embedding and output
matrix are q8_0. Q/K rows are reordered from Hugging Face's half-split rotary layout to the adjacent pairs llama.cpp
rotates (`llama`, `deci`); `qwen2`/`qwen3` rotate half-split pairs and take the rows as they are.

Tokenizer: when the model came from a GGUF file (`source_model` in pruning.json naming a packaged alias or a .gguf
file, followed through earlier exports), its `tokenizer.*` metadata is copied verbatim; otherwise the Hugging Face
tokenizer is described to llama.cpp (byte-level BPE: tokens, token types, merges, pre-tokenizer name, special
token ids, add-BOS/EOS flags, chat template). `tokenizer_from` names a GGUF file to copy from instead.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    TokenType,
    get_tensor_name_map,
)
from gguf.quants import dequantize, quantize

from ..errors import SdmpruneError
from ..io import atomic_file
from ..models.architectures import attention_group_shape, get_architecture
from ..models.loading import load_model
from ..models.packaged import PACKAGED_MODELS, packaged_gguf

Q = GGMLQuantizationType
GGUF_TYPES: dict[str, GGMLQuantizationType] = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0,
                                               "q4_0": Q.Q4_0}
_FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
               "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}
_NATIVE = {"llama": MODEL_ARCH.LLAMA, "mistral": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2,
           "qwen3": MODEL_ARCH.QWEN3}
_ADJACENT_ROPE = {MODEL_ARCH.LLAMA, MODEL_ARCH.DECI}  # rotate pairs (2i, 2i+1): Q/K rows need reordering
_ROPE_FACTOR_ARCHS = {MODEL_ARCH.LLAMA, MODEL_ARCH.DECI}  # read a `rope_freqs` tensor
_ROPE_TYPES = {"default", "linear", "llama3"}  # static per-dimension scalings, expressible as rope_freqs
_EMBEDDINGS = {"token_embd.weight", "output.weight"}
_METADATA_DTYPES = {GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
                    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
                    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
                    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8"}
F16_MAX = 65504.0
# Split patterns of Hugging Face tokenizer.json pre-tokenizers -> llama.cpp's `tokenizer.ggml.pre` name; they
# differ only in how digits are grouped.
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_PRE_TOKENIZERS = {_WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe", _WORDS + r"\p{N}" + _REST: "qwen2"}


@dataclass(frozen=True)
class _Shapes:
    """Per-layer shapes read from the model's modules: MLP width, query heads, key/value heads; one head size."""

    widths: list[int]
    heads: list[int]
    kv_heads: list[int]
    head_dim: int

    @property
    def uniform(self) -> bool:
        return len(set(self.widths)) == 1 and len(set(self.heads)) == 1 and len(set(self.kv_heads)) == 1


def export_gguf(
    model_dir: str | Path,
    output_path: str | Path | None = None,
    *,
    dtype: str = "f16",
    verify: bool = False,
    overwrite: bool = False,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Write `model_dir` (an sdmprune export of any layout, or a plain HF directory) as one GGUF file.

    `output_path` defaults to `<model_dir>/<dir name>-<dtype>.gguf`; an existing file is refused unless
    `overwrite`. The file is written under a temporary name and renamed at the end, so a failure leaves nothing.
    `verify` reads it back with `gguf.GGUFReader` before the rename and checks every tensor's shape and
    (de-quantised) values against the exported weights within the type's rounding error, and every metadata
    value. `tokenizer_from`: a GGUF file whose `tokenizer.*` metadata to copy (default: the source GGUF named in
    pruning.json, else a conversion of the directory's Hugging Face tokenizer). Returns the path written.
    """
    model_dir = Path(model_dir)
    if dtype not in GGUF_TYPES:
        raise SdmpruneError(f"unknown GGUF type '{dtype}': choose one of {', '.join(GGUF_TYPES)}")
    output = Path(output_path) if output_path is not None else model_dir / f"{model_dir.resolve().name}-{dtype}.gguf"
    if output.exists() and not overwrite:
        raise SdmpruneError(f"{output} already exists: choose another output path or pass --overwrite")
    model, tokenizer = load_model(str(model_dir), dtype="float32", device="cpu")
    shapes = _layer_shapes(model)
    rope_factors = _rope_factors(model, shapes.head_dim)
    arch = _choose_arch(model, shapes, rope_factors)
    record_path = model_dir / "pruning.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    tokenizer_source = Path(tokenizer_from) if tokenizer_from is not None else _source_gguf(model_dir)
    tensors = _named_tensors(model, arch, shapes, rope_factors)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output) as tmp:
        writer = GGUFWriter(tmp, MODEL_ARCH_NAMES[arch])
        try:
            _add_general(writer, model_dir, record, dtype)
            _add_hyperparameters(writer, model, shapes, arch)
            n_vocab = model.get_input_embeddings().weight.shape[0]
            if tokenizer_source is not None:
                _copy_tokenizer(writer, tokenizer_source, n_vocab)
            else:
                _convert_tokenizer(writer, tokenizer, n_vocab, model_dir)
            types = {}
            for name, array in tensors.items():
                types[name] = _tensor_type(name, array, dtype)
                data = array if types[name] == Q.F32 else quantize(array, types[name])
                writer.add_tensor(name, data, raw_dtype=None if types[name] == Q.F32 else types[name])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        fallback = sorted(name for name, qtype in types.items() if qtype == Q.F16 and dtype in ("q8_0", "q4_0"))
        if fallback:
            warnings.warn(f"{len(fallback)} matrices of {model_dir} have rows that are not whole blocks of 32 weights "
                          f"and were written f16, not {dtype} (e.g. {fallback[0]}): prune with --width-multiple 32",
                          stacklevel=2)
        if verify:
            _verify(tmp, tensors, types, dict(writer.kv_data[0]))
    return output


def _layer_shapes(model: torch.nn.Module) -> _Shapes:
    architecture = get_architecture(model)
    _, head_dim = attention_group_shape(model)
    widths = [architecture.projections(mlp)[0].out_features for mlp in architecture.mlps(model)]
    heads, kv_heads = [], []
    for attention in architecture.attentions(model):
        q, k, _, _ = architecture.attention_projections(attention)
        heads.append(q.out_features // head_dim)
        kv_heads.append(k.out_features // head_dim)
    if min(widths) == 0 or min(kv_heads) == 0:
        raise SdmpruneError("a layer has no MLP neuron or no key/value head left, which llama.cpp reads as a different "
                            "layer type: prune so that every layer keeps at least one of each")
    return _Shapes(widths, heads, kv_heads, head_dim)


def _rope_factors(model: torch.nn.Module, head_dim: int) -> np.ndarray | None:
    """llama.cpp's per-dimension rotary frequency divisors (head_dim / 2,), or None when the rotation is plain."""
    config = model.config
    parameters = getattr(config, "rope_parameters", None) or {}
    rope_type = parameters.get("rope_type", "default")
    partial = getattr(config, "partial_rotary_factor", None) or 1.0
    if rope_type not in _ROPE_TYPES or partial != 1.0:
        raise SdmpruneError(f"rotary embedding '{rope_type}' (partial factor {partial}) cannot be written as GGUF by "
                            f"sdmprune: only full rotations of type {', '.join(sorted(_ROPE_TYPES))} are supported")
    rotary = model.model.rotary_emb
    if getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise SdmpruneError(f"rotary embedding '{rope_type}' scales attention, which sdmprune cannot write as GGUF")
    theta = parameters.get("rope_theta", 10000.0)
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factors = (plain / rotary.inv_freq.double().cpu()).numpy().astype(np.float32)
    return None if np.allclose(factors, 1.0, rtol=1e-6) else factors


def _choose_arch(model: torch.nn.Module, shapes: _Shapes, rope_factors: np.ndarray | None) -> MODEL_ARCH:
    model_type = model.config.model_type
    if model_type not in _NATIVE:
        raise SdmpruneError(f"sdmprune cannot write '{model_type}' models as GGUF: supported are "
                            f"{', '.join(sorted(_NATIVE))}")
    native = _NATIVE[model_type]
    fits = shapes.uniform and (rope_factors is None or native in _ROPE_FACTOR_ARCHS)
    if native == MODEL_ARCH.QWEN2:
        fits = fits and shapes.heads[0] * shapes.head_dim == model.config.hidden_size
    if fits:
        return native
    if native == MODEL_ARCH.QWEN3:
        reason = "per-layer widths or head counts" if not shapes.uniform else "a scaled rotary embedding"
        raise SdmpruneError(f"llama.cpp cannot represent this qwen3 model with {reason} (its per-layer architecture "
                            "'deci' has no q/k norms): export it with --padded (uniform shapes) instead")
    return MODEL_ARCH.DECI


def _adjacent_pairs(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's rows (or bias entries) from the half-split rotary layout, dimension i paired with
    i + d/2, to adjacent pairs (2i, 2i + 1). rows: (n_heads·d, ...) -> same shape."""
    half = rows.shape[0] // n_heads // 2
    return rows.reshape(n_heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _named_tensors(model: torch.nn.Module, arch: MODEL_ARCH, shapes: _Shapes,
                   rope_factors: np.ndarray | None) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in PyTorch layout (out, in) for every weight, in file order."""
    names = get_tensor_name_map(arch, len(shapes.widths))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors: dict[str, np.ndarray] = {}
    if rope_factors is not None:
        tensors["rope_freqs.weight"] = rope_factors
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp multiplies by the token embedding when there is no output matrix
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise SdmpruneError(f"tensor {hf_name} has no counterpart in llama.cpp's '{MODEL_ARCH_NAMES[arch]}' "
                                "architecture, so the model cannot be written as GGUF")
        array = tensor.detach().float().cpu().numpy()
        found = re.fullmatch(r"blk\.(\d+)\.attn_([qk])\.(weight|bias)", name)
        if found and arch in _ADJACENT_ROPE:
            layer = int(found.group(1))
            array = _adjacent_pairs(array, (shapes.heads if found.group(2) == "q" else shapes.kv_heads)[layer])
        tensors[name] = np.ascontiguousarray(array)
    return tensors


def _tensor_type(name: str, array: np.ndarray, dtype: str) -> GGMLQuantizationType:
    """The stored type of one tensor: f32 for 1-D ones, f16 where rows are not whole quantisation blocks."""
    if array.ndim == 1:
        return Q.F32
    qtype = Q.Q8_0 if dtype == "q4_0" and name in _EMBEDDINGS else GGUF_TYPES[dtype]
    if array.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F16
    if qtype == Q.F16 and np.abs(array).max() > F16_MAX:
        raise SdmpruneError(f"{name} has values beyond the f16 range (±{F16_MAX:g}): export as bf16 or f32 instead")
    return qtype


def _context_length(config) -> int:
    """The context llama.cpp may use: a sliding window (Mistral), which llama.cpp's `llama` graph does not
    apply, caps it at the window, where full attention is the same function."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) and window:
        return min(config.max_position_embeddings, window)
    return config.max_position_embeddings


def _add_general(writer: GGUFWriter, model_dir: Path, record: dict, dtype: str) -> None:
    writer.add_type("model")
    writer.add_name(model_dir.resolve().name)
    if record:
        achieved = record.get("achieved", {}).get("ratio")
        writer.add_description(
            f"pruned with sdmprune ({record.get('method', 'unknown method')}"
            + (f", {achieved:.4f} of parameters removed" if achieved is not None else "")
            + f", layout {record.get('export', {}).get('layout', 'uniform')}) from {record.get('source_model', '?')}")
    writer.add_file_type(_FILE_TYPES[dtype])
    if dtype in ("q8_0", "q4_0"):
        writer.add_quantization_version(2)


def _add_hyperparameters(writer: GGUFWriter, model: torch.nn.Module, shapes: _Shapes, arch: MODEL_ARCH) -> None:
    config = model.config
    per_layer = arch == MODEL_ARCH.DECI
    writer.add_context_length(_context_length(config))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(shapes.widths))
    writer.add_feed_forward_length(shapes.widths if per_layer else shapes.widths[0])
    writer.add_head_count(shapes.heads if per_layer else shapes.heads[0])
    writer.add_head_count_kv(shapes.kv_heads if per_layer else shapes.kv_heads[0])
    writer.add_key_length(shapes.head_dim)
    writer.add_value_length(shapes.head_dim)
    writer.add_rope_dimension_count(shapes.head_dim)
    writer.add_rope_freq_base((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])


def _source_gguf(model_dir: Path) -> Path | None:
    """The GGUF file the model was converted from: pruning.json's `source_model` (a packaged alias or a .gguf
    file), followed through exports made from exports. None when the chain ends elsewhere."""
    seen: set[Path] = set()
    directory = model_dir.resolve()
    while directory not in seen and (directory / "pruning.json").is_file():
        seen.add(directory)
        spec = json.loads((directory / "pruning.json").read_text()).get("source_model")
        if not spec:
            return None
        if spec in PACKAGED_MODELS:
            return packaged_gguf(spec)
        path = Path(spec).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            return path
        directory = path.resolve()
    return None


def _read_metadata(path: Path) -> dict[str, tuple[GGUFValueType, GGUFValueType | None, object]]:
    """Every metadata entry of a little-endian GGUF file as key -> (type, array item type, value), strings as raw
    bytes. Reads only the metadata section, in bulk (GGUFReader maps every string of a 49k-token vocabulary into
    its own array, which takes seconds)."""
    V = GGUFValueType
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        magic, version, _, n_entries = struct.unpack_from("<4sIQQ", data, 0)
        if magic != b"GGUF" or not 2 <= version <= 3:
            raise SdmpruneError(f"{path} is not a little-endian GGUF file of version 2 or 3")
        offset = struct.calcsize("<4sIQQ")

        def string() -> bytes:
            nonlocal offset
            (length,) = struct.unpack_from("<Q", data, offset)
            offset += 8 + length
            return bytes(data[offset - length:offset])

        def value(kind: GGUFValueType) -> object:
            nonlocal offset
            if kind == V.STRING:
                return string()
            item = np.dtype(_METADATA_DTYPES[kind])
            offset += item.itemsize
            return np.frombuffer(data, item, 1, offset - item.itemsize)[0].item()

        entries = {}
        for _ in range(n_entries):
            key = string().decode()
            (kind,) = struct.unpack_from("<I", data, offset)
            offset += 4
            if kind != V.ARRAY:
                entries[key] = (V(kind), None, value(V(kind)))
                continue
            sub, count = struct.unpack_from("<IQ", data, offset)
            offset += 12
            if sub == V.STRING:
                items = [string() for _ in range(count)]
            elif sub == V.ARRAY:
                raise SdmpruneError(f"{path} has a nested array under {key}, which sdmprune does not copy")
            else:
                item = np.dtype(_METADATA_DTYPES[V(sub)])
                items = np.frombuffer(data, item, count, offset).tolist()
                offset += item.itemsize * count
            entries[key] = (V.ARRAY, V(sub), items)
    return entries


def _copy_tokenizer(writer: GGUFWriter, source: Path, n_vocab: int) -> None:
    """Copy every `tokenizer.*` entry of `source` byte for byte, with its value types."""
    if not source.is_file():
        raise SdmpruneError(f"tokenizer source {source} does not exist: pass an existing .gguf file")
    entries = {key: entry for key, entry in _read_metadata(source).items() if key.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in entries:
        raise SdmpruneError(f"{source} has no tokenizer.ggml.tokens: pass a GGUF file that contains a tokenizer")
    n_tokens = len(entries["tokenizer.ggml.tokens"][2])
    if n_tokens != n_vocab:
        raise SdmpruneError(f"the tokenizer of {source} has {n_tokens} tokens but the model's embedding has {n_vocab} "
                            "rows: pass the GGUF file of the model this one was pruned from")
    for key, (kind, sub, value) in entries.items():
        writer.add_key_value(key, value, kind, sub_type=sub)


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer of tokenizer.json, or None when it is not one we know."""
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    kinds = [step["type"] for step in steps]
    if kinds[-1] != "ByteLevel" or steps[-1].get("add_prefix_space", False):
        return None
    byte_regex = steps[-1].get("use_regex", True)
    if kinds == ["ByteLevel"] and byte_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_regex:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_regex:
        return _SPLIT_PRE_TOKENIZERS.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def _convert_tokenizer(writer: GGUFWriter, tokenizer, n_vocab: int, model_dir: Path) -> None:
    """Describe a Hugging Face byte-level BPE tokenizer to llama.cpp (`tokenizer.ggml.model` = gpt2)."""
    description = json.loads(tokenizer.backend_tokenizer.to_str())
    model = description["model"]
    pre = _pre_tokenizer_name(description.get("pre_tokenizer"))
    if model["type"] != "BPE" or model.get("byte_fallback") or pre is None:
        raise SdmpruneError(f"the tokenizer of {model_dir} is not a byte-level BPE tokenizer that sdmprune can "
                            "describe to llama.cpp: pass tokenizer_from (--tokenizer-from) with a GGUF file of the "
                            "original model, e.g. one made by llama.cpp's convert_hf_to_gguf.py")
    tokens = [f"[PAD{index}]" for index in range(n_vocab)]
    types = [TokenType.UNUSED] * n_vocab
    entries = [(token, index, TokenType.NORMAL) for token, index in model["vocab"].items()]
    entries += [(added["content"], added["id"], TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED)
                for added in description["added_tokens"]]
    for token, index, kind in entries:
        if index >= n_vocab:
            raise SdmpruneError(f"the tokenizer of {model_dir} has token id {index} but the model's embedding has only "
                                f"{n_vocab} rows: the tokenizer does not belong to this model")
        tokens[index], types[index] = token, kind
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    if merges:
        writer.add_token_merges(merges)
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
               "pad": tokenizer.pad_token_id}
    for kind, token_id in special.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    probe = tokenizer("a")["input_ids"]  # whether encoding adds BOS / EOS around the text
    writer.add_add_bos_token(special["bos"] is not None and probe[:1] == [special["bos"]])
    writer.add_add_eos_token(special["eos"] is not None and probe[-1:] == [special["eos"]])
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def _tolerance(expected: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Largest admissible |stored - expected| per element (or per 32-weight block for q8_0 / q4_0)."""
    magnitude = np.abs(expected)
    if qtype == Q.F32:
        return np.zeros_like(magnitude)
    if qtype == Q.F16:
        return magnitude * 2.0**-11 + 2.0**-24  # half an f16 ulp, or of the subnormal spacing
    if qtype == Q.BF16:
        return magnitude * 2.0**-8
    block = GGML_QUANT_SIZES[qtype][0]
    blocks = magnitude.reshape(-1, block)
    # q8_0: scale d = max/127, rounding error d/2; q4_0: scale max/8, error up to d (the top level is clipped).
    # Both: the scale is stored f16 (relative 2^-11, times at most 127 or 8 levels).
    steps = 1 / 254 if qtype == Q.Q8_0 else 1 / 8
    limit = blocks.max(axis=1, keepdims=True) * (steps + 2.0**-11) * 1.001 + 2.0**-24
    return np.broadcast_to(limit, blocks.shape).reshape(expected.shape)


def _verify(path: Path, tensors: dict[str, np.ndarray], types: dict[str, GGMLQuantizationType],
            metadata: dict) -> None:
    """Read `path` back and compare tensor names, types, shapes, values and every metadata value written."""
    reader = GGUFReader(path)
    stored = {tensor.name: tensor for tensor in reader.tensors}
    if set(stored) != set(tensors):
        raise SdmpruneError(f"GGUF verification failed for {path}: tensors {sorted(set(stored) ^ set(tensors))} differ")
    for name, expected in tensors.items():
        tensor = stored[name]
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        if tensor.tensor_type != types[name] or shape != expected.shape:
            raise SdmpruneError(f"GGUF verification failed for {path}: {name} is {tensor.tensor_type.name} {shape}, "
                                f"expected {types[name].name} {expected.shape}")
        values = dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
        error = np.abs(values - expected) - _tolerance(expected, types[name])
        if not np.all(error <= 0):
            raise SdmpruneError(f"GGUF verification failed for {path}: {name} differs from the exported weights by up "
                                f"to {float(np.max(np.abs(values - expected))):.3g} ({types[name].name})")
    for key, value in metadata.items():
        field = reader.fields.get(key)
        expected = value.value
        if field is not None and value.type == GGUFValueType.FLOAT32:
            expected = float(np.float32(expected))
        elif field is not None and value.type == GGUFValueType.STRING:
            expected = expected.decode() if isinstance(expected, bytes) else expected
        elif field is not None and value.type == GGUFValueType.ARRAY:
            expected = [item.decode() if isinstance(item, bytes) else item for item in expected]
        if field is None or field.contents() != expected:
            raise SdmpruneError(f"GGUF verification failed for {path}: metadata {key} was not read back as written")
