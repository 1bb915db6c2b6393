"""Load a causal LM from a hub id, a local HF directory, a local `.gguf` file or a packaged-model alias.

Aliases (`smollm2-135m`, `qwen2.5-coder-0.5b`, `qwen2.5-coder-1.5b`) name GGUF files shipped in PyPI
packages (packaged.py). GGUF files are de-quantised once (~20 s for SmolLM2-135M, ~2 min for 0.5B
parameters on one CPU thread) and cached as a plain fp32 safetensors directory, so later loads take
seconds. The cache lives in `$SDMPRUNE_CACHE` (default `~/.cache/sdmprune`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..errors import SdmpruneError
from ..io import atomic_directory
from ..runtime import resolve_device, resolve_dtype
from .architectures import attention_group_shape, get_architecture
from .packaged import PACKAGED_MODELS, packaged_gguf
from .resize import resize_attention, resize_mlp

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("SDMPRUNE_CACHE", Path.home() / ".cache" / "sdmprune"))


def convert_gguf(gguf_path: Path) -> Path:
    """De-quantise a GGUF file into a cached plain HF directory (fp32 safetensors + tokenizer).

    The output head is tied to the embedding (`tie_word_embeddings=True`, one tensor stored) only when the
    de-quantised `lm_head.weight` equals `embed_tokens.weight` exactly (or the file has no separate head);
    otherwise both tensors are kept. Qwen2.5 GGUF files, for instance, store the head separately and at
    another quantisation than the embedding, although the original checkpoint ties them.
    """
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as error:  # the GGUF reader raises many types for a damaged file
        raise SdmpruneError(
            f"could not read GGUF file {gguf_path} ({type(error).__name__}: {str(error)[:200]}); "
            "check that it is a complete, supported GGUF model file"
        ) from error
    # A GGUF-loaded model refuses save_pretrained, and rebuilding a plain model to copy the weights into
    # would hold them twice (14 GB at 1.5B parameters): write config and safetensors directly instead.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    embedding = quantised.get_input_embeddings().weight  # (V, H)
    head_module = quantised.get_output_embeddings()
    head = head_module.weight  # (V, H)
    config.tie_word_embeddings = head is embedding or (head.shape == embedding.shape and torch.equal(head, embedding))
    state = {name: tensor.contiguous() for name, tensor in quantised.state_dict().items()}
    if config.tie_word_embeddings:  # stored once, as the embedding; loading ties the head to it
        head_name = next(name for name, module in quantised.named_modules() if module is head_module)
        state.pop(f"{head_name}.weight")
    with atomic_directory(target, overwrite=True) as tmp:
        config.save_pretrained(tmp)
        quantised.generation_config.save_pretrained(tmp)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
    return target


def _local_path(spec: str) -> Path | None:
    """The local file or directory `spec` names, or None for a hub id (`org/name` or `name`)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.startswith(("/", ".", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise SdmpruneError(f"model path '{spec}' does not exist: pass an existing directory, a .gguf file, "
                            f"a hub id, or '{DEFAULT_MODEL}'")
    return None


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, object]:
    """Load `(model, tokenizer)` from an alias, a local directory or `.gguf` file, or a hub id.

    A directory written by `export_pruned` with per-layer widths is loaded through `load_pruned`.
    The model is returned in eval mode on the chosen device.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if spec in PACKAGED_MODELS:
        source: str | Path = convert_gguf(packaged_gguf(spec))
    else:
        local = _local_path(spec)
        if local is not None and local.is_file():
            if local.suffix != ".gguf":
                raise SdmpruneError(f"'{spec}' is a file but not a .gguf model: pass a .gguf file or a directory")
            source = convert_gguf(local)
        else:
            source = local if local is not None else spec
    if isinstance(source, Path) and not (source / "config.json").is_file():
        raise SdmpruneError(f"'{source}' has no config.json: it is not a Hugging Face model directory")
    if isinstance(source, Path) and _has_per_layer_widths(source):
        return load_pruned(source, dtype=dtype, device=device)

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        get_architecture(config.model_type)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except SdmpruneError:
        raise
    except OSError as error:
        raise SdmpruneError(
            f"could not load model '{spec}' ({str(error).splitlines()[0][:200]}); check the hub id and your "
            "network, or pass a local directory or .gguf file"
        ) from error
    return model.to(torch_device).eval(), tokenizer


def _has_per_layer_widths(directory: Path) -> bool:
    record = directory / "pruning.json"
    if not record.is_file():
        return False
    return json.loads(record.read_text()).get("export", {}).get("layout") == "per-layer"


def _load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(directory / name))
    return state


def load_pruned(directory: str | Path, *, dtype: str = "auto", device: str = "auto"):
    """Load any sdmprune export, including per-layer widths, as `(model, tokenizer)`."""
    directory = Path(directory)
    record_path = directory / "pruning.json"
    if not record_path.is_file():
        raise SdmpruneError(f"{directory} has no pruning.json: it is not an sdmprune export")
    record = json.loads(record_path.read_text())
    torch_device = resolve_device(device)
    config = AutoConfig.from_pretrained(directory)
    architecture = get_architecture(config.model_type)
    per_layer = record["export"]["layout"] == "per-layer"
    stored: list[int] = (
        record["widths"] if per_layer else [record["export"]["intermediate_size"]] * len(record["widths"])
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for mlp, width in zip(architecture.mlps(model), stored, strict=True):
        resize_mlp(architecture, mlp, torch.arange(width), width)
    if per_layer and "kv_heads" in record:
        group_size, head_dim = attention_group_shape(model)
        for attention, n_groups in zip(architecture.attentions(model), record["kv_heads"], strict=True):
            resize_attention(architecture, attention, torch.arange(n_groups), n_groups, group_size, head_dim)
    missing, unexpected = model.load_state_dict(_load_state_dict(directory), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise SdmpruneError(f"{directory} does not match its pruning.json (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model = model.to(device=torch_device, dtype=resolve_dtype(dtype, torch_device)).eval()
    return model, AutoTokenizer.from_pretrained(directory)
