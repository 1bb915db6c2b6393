"""Evaluation text from a local file or a named dataset.

A name (`wikitext2`, `c4`) is read from a local data directory when one is given (`data_dir` or
`$SDMPRUNE_DATA_DIR`, laid out as `../shared/data`), else loaded from the Hugging Face hub with
the `datasets` package (`pip install sdmprune[eval]`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SdmpruneError


def _join_rows(rows: list[str]) -> str:
    """The perplexity anchors' convention: dataset rows joined with a blank line."""
    return "\n\n".join(rows)


def _read_lines(path: Path) -> str:
    return _join_rows(path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n"))


def _read_jsonl(path: Path) -> str:
    rows = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return _join_rows(rows)


def _hub_wikitext2() -> list[str]:
    from datasets import load_dataset

    return load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]


def _hub_c4() -> list[str]:
    from datasets import load_dataset

    shard = "en/c4-validation.00000-of-00008.json.gz"
    return load_dataset("allenai/c4", data_files={"validation": shard}, split="validation")["text"][:1100]


@dataclass(frozen=True)
class TextDataset:
    local_file: str  # relative to the data directory
    read_local: Callable[[Path], str]
    load_hub_rows: Callable[[], list[str]]


TEXT_DATASETS = {
    "wikitext2": TextDataset("wikitext2_raw/wiki.test.raw", _read_lines, _hub_wikitext2),
    # No C4 validation shard is available offline: the local one is a sample held apart from calibration.
    "c4": TextDataset("c4/c4_en_sample300_llamafactory.jsonl", _read_jsonl, _hub_c4),
}


def data_dir(explicit: str | Path | None = None) -> Path | None:
    value = explicit or os.environ.get("SDMPRUNE_DATA_DIR")
    return Path(value).expanduser() if value else None


def load_text(spec: str, data_directory: str | Path | None = None) -> str:
    """Text of a `.txt`/`.raw` file, a `.jsonl` file (`text` field), or a dataset name."""
    if spec in TEXT_DATASETS:
        dataset = TEXT_DATASETS[spec]
        directory = data_dir(data_directory)
        if directory is not None:
            path = directory / dataset.local_file
            if not path.is_file():
                raise SdmpruneError(f"{path} not found: the data directory must contain {dataset.local_file}")
            text = dataset.read_local(path)
        else:
            try:
                text = _join_rows(dataset.load_hub_rows())
            except ImportError as error:
                raise SdmpruneError(f"loading '{spec}' from the hub needs `pip install datasets`; or set "
                                    "SDMPRUNE_DATA_DIR to a local data directory") from error
            except Exception as error:
                raise SdmpruneError(f"could not load '{spec}' from the hub ({type(error).__name__}); set "
                                    "SDMPRUNE_DATA_DIR to a local data directory or pass a text file") from error
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SdmpruneError(f"text '{spec}' is neither a file nor a dataset name ({', '.join(TEXT_DATASETS)})")
        text = _read_jsonl(path) if path.suffix == ".jsonl" else path.read_text(encoding="utf-8")
    if not text.strip():
        raise SdmpruneError(f"text '{spec}' is empty: give a file with text in it")
    return text
