"""A LoRA adapter directory written by `sdmprune finetune`: recognised and loaded on its base model."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SdmpruneError
from ..models import load_model


def model_ref(spec: str) -> str:
    """How an adapter names its base: an absolute path for a local directory, else the spec itself."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def load_adapter(directory: str | Path, *, dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False):
    """`(PeftModel, tokenizer)`: the base named in adapter_config.json loaded with `load_model` (so pruned
    and per-layer exports work), with the adapter on top, in eval mode."""
    from peft import PeftModel

    directory = Path(directory)
    base = json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise SdmpruneError(f"{directory}/adapter_config.json names no base_model_name_or_path: set it to the "
                            "model the adapter was trained on")
    model, tokenizer = load_model(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(model, directory).eval(), tokenizer


def is_adapter_dir(spec: str) -> bool:
    return (Path(spec).expanduser() / "adapter_config.json").is_file()
