"""Text from a local file or a named dataset, for evaluation and calibration.

A name (`wikitext2`, `c4`) is read from a local data directory when one is given (`data_dir` or
`$SDMPRUNE_DATA_DIR`, laid out as `../shared/data`), else loaded from the Hugging Face hub with
the `datasets` package. Evaluation (`TEXT_DATASETS`) and calibration (`CALIBRATION_DATASETS`) use
different splits of the same datasets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from ..errors import SdmpruneError


def _join_rows(rows: list[str]) -> str:
    """The perplexity anchors' convention: dataset rows joined with a blank line."""
    return "\n\n".join(rows)


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")


def read_jsonl(path: Path) -> list[str]:
    """The `text` field of every non-blank line of a JSONL file."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SdmpruneError(f"line {number} of {path} is not a JSON object with a 'text' field: fix the "
                                "file or convert it to plain text") from error
    return rows


def _hub_wikitext2(split: str) -> list[str]:
    from datasets import load_dataset

    return load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]


def _hub_c4_validation() -> list[str]:
    from datasets import load_dataset

    shard = "en/c4-validation.00000-of-00008.json.gz"
    return load_dataset("allenai/c4", data_files={"validation": shard}, split="validation")["text"][:1100]


def _hub_c4_train() -> list[str]:
    """The first 1000 documents of the train shard SparseGPT and Wanda calibrate on: the same
    documents as the local file, so online and offline runs agree. Streamed, to skip the rest."""
    from datasets import load_dataset

    shard = "en/c4-train.00000-of-01024.json.gz"
    rows = load_dataset("allenai/c4", data_files={"train": shard}, split="train", streaming=True)
    return [row["text"] for row in islice(rows, 1000)]


@dataclass(frozen=True)
class TextDataset:
    local_file: str  # relative to the data directory
    read_local: Callable[[Path], list[str]]  # rows of the local file
    load_hub_rows: Callable[[], list[str]]
    one_document: bool = True  # rows are lines of one text (wikitext) rather than separate documents (c4)


TEXT_DATASETS = {
    "wikitext2": TextDataset("wikitext2_raw/wiki.test.raw", _read_lines, lambda: _hub_wikitext2("test")),
    # No C4 validation shard is available offline: the local one is a sample held apart from calibration.
    "c4": TextDataset("c4/c4_en_sample300_llamafactory.jsonl", read_jsonl, _hub_c4_validation, one_document=False),
}

CALIBRATION_DATASETS = {
    # Only the test split is available offline; the hub gives the train split.
    "wikitext2": TextDataset("wikitext2_raw/wiki.test.raw", _read_lines, lambda: _hub_wikitext2("train")),
    "c4": TextDataset("c4/c4_en_train00000_first1000.jsonl", read_jsonl, _hub_c4_train, one_document=False),
}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all (offline mode or no network: False, within `timeout` s)."""
    import socket

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def data_dir(explicit: str | Path | None = None) -> Path | None:
    value = explicit or os.environ.get("SDMPRUNE_DATA_DIR")
    return Path(value).expanduser() if value else None


def dataset_documents(name: str, dataset: TextDataset, data_directory: str | Path | None = None) -> list[str]:
    """The documents of a named dataset: its rows, or all rows joined into one text if `one_document`."""
    directory = data_dir(data_directory)
    if directory is not None:
        path = directory / dataset.local_file
        if not path.is_file():
            raise SdmpruneError(f"{path} not found: the data directory must contain {dataset.local_file}")
        rows = dataset.read_local(path)
    else:
        try:
            rows = list(dataset.load_hub_rows())
        except ImportError as error:
            raise SdmpruneError(f"loading '{name}' from the hub needs `pip install datasets`; or set "
                                "SDMPRUNE_DATA_DIR to a local data directory") from error
        except Exception as error:
            raise SdmpruneError(f"could not load '{name}' from the hub ({type(error).__name__}); set "
                                "SDMPRUNE_DATA_DIR to a local data directory or pass a text file") from error
    return [_join_rows(rows)] if dataset.one_document else rows


def load_text(spec: str, data_directory: str | Path | None = None) -> str:
    """Text of a `.txt`/`.raw` file, a `.jsonl` file (`text` field), or a dataset name."""
    if spec in TEXT_DATASETS:
        text = _join_rows(dataset_documents(spec, TEXT_DATASETS[spec], data_directory))
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise SdmpruneError(f"text '{spec}' is neither a file nor a dataset name ({', '.join(TEXT_DATASETS)})")
        text = _join_rows(read_jsonl(path)) if path.suffix == ".jsonl" else path.read_text(encoding="utf-8")
    if not text.strip():
        raise SdmpruneError(f"text '{spec}' is empty: give a file with text in it")
    return text
