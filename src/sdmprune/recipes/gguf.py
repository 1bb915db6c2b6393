"""Recipe `gguf`: an export (or any Hugging Face directory of a supported architecture) as one GGUF file for
llama.cpp.

    from sdmprune.recipes import gguf
    path = gguf.run(gguf.GgufRun.of(directory="runs/p20", gguf="q8_0"))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..options import FromOptions, described, validate
from .options import GgufOptions


@dataclass
class GgufRun(FromOptions):
    """Write an export as one GGUF file for llama.cpp (tokenizer and chat template included)."""

    directory: str = field(metadata=described("the export (or Hugging Face model directory)", positional=True))
    gguf_path: str | None = field(default=None, metadata=described(
        "where to write the file (default: DIRECTORY/<name>-<type>.gguf; an existing file is refused)"))
    gguf: GgufOptions = field(default_factory=lambda: GgufOptions(gguf="f16"))


def run(config: GgufRun) -> Path:
    validate(config)
    path = config.gguf.write(config.directory, config.gguf_path)
    print(f"wrote {path} ({config.gguf.gguf}, {path.stat().st_size / 2**20:.1f} MiB)")
    return path
