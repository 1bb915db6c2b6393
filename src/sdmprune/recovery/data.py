"""Instruction data for LoRA recovery: Alpaca-format loading, the prompt templates, tokenisation with the
prompt masked from the loss, and padded batches.

An example is `{"instruction", "input", "output"}` (LaMini's `response` is read as `output`). Its prompt is
the Alpaca template (the no-input one when `input` is empty); the model learns `output` + EOS only: prompt
positions carry the label -100, which cross-entropy ignores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SdmpruneError

IGNORE_INDEX = -100  # label of positions left out of the loss
HUB_DATASETS = {"lamini": "MBZUAI/LaMini-instruction", "alpaca-cleaned": "yahma/alpaca-cleaned"}

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_prompt(example: dict) -> str:
    """The Alpaca prompt of an example (everything before the response)."""
    template = PROMPT_WITH_INPUT if example.get("input", "").strip() else PROMPT_NO_INPUT
    return template.format(instruction=example["instruction"], input=example.get("input", ""))


def _normalise(row: dict, where: str) -> dict:
    output = row.get("output", row.get("response"))
    if not isinstance(row.get("instruction"), str) or not isinstance(output, str):
        raise SdmpruneError(f"{where} is not an instruction example: it needs string fields 'instruction' and "
                            "'output' (or 'response'), and optionally 'input' (Alpaca format)")
    return {"instruction": row["instruction"], "input": row.get("input") or "", "output": output}


def _read_file(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise SdmpruneError(f"{path} is not valid JSON{' lines' if path.suffix == '.jsonl' else ''} "
                            f"({error.msg}, line {error.lineno}): fix the file") from error
    if not isinstance(rows, list):
        raise SdmpruneError(f"{path} must hold a JSON list of examples (or one example per line as .jsonl)")
    return rows


def _read_hub(name: str, max_samples: int) -> list[dict]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split="train")
    except Exception as error:  # offline, unknown name, or no train split: one message for all
        raise SdmpruneError(
            f"could not load instruction dataset '{name}' from the Hugging Face hub ({type(error).__name__}); "
            "offline, pass a local Alpaca JSON/JSONL file, e.g. ../shared/data/instruct/alpaca_data_1k.json"
        ) from error
    return dataset.select(range(min(max_samples, len(dataset)))).to_list() if max_samples > 0 else dataset.to_list()


def load_instructions(spec: str, max_samples: int = 0) -> list[dict]:
    """Examples from a local `.json` (a list) or `.jsonl` file, a hub dataset id, or an alias
    (`lamini`, `alpaca-cleaned`); the first `max_samples` only when positive."""
    path = Path(spec).expanduser()
    if path.is_file():
        rows, where = _read_file(path), str(path)
    elif path.suffix in (".json", ".jsonl") or spec.startswith(("/", ".", "~")):
        raise SdmpruneError(f"instruction file '{spec}' does not exist: pass an existing .json/.jsonl file or a "
                            f"hub dataset ({', '.join(f'{k} = {v}' for k, v in HUB_DATASETS.items())})")
    else:
        name = HUB_DATASETS.get(spec, spec)
        rows, where = _read_hub(name, max_samples), name
    if max_samples > 0:
        rows = rows[:max_samples]
    if not rows:
        raise SdmpruneError(f"'{spec}' holds no examples: give a file with at least one")
    return [_normalise(row, f"example {i} of {where}") for i, row in enumerate(rows)]


def tokenize_example(tokenizer, example: dict, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example, both of length <= `max_len`.

    The prompt (with the tokenizer's BOS, if it adds one) and the response are tokenised separately, so
    the mask boundary is exact; EOS is appended to the response; prompt labels are IGNORE_INDEX.
    """
    if tokenizer.eos_token_id is None:
        raise SdmpruneError("the tokenizer has no EOS token, which recovery appends to every response: use a "
                            "model whose tokenizer defines one")
    prompt = tokenizer(format_prompt(example))["input_ids"]
    response = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt + response)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_len]
    return input_ids, labels


@dataclass
class TokenizedData:
    """Tokenised examples; `dropped` counts those whose prompt alone filled `max_len` (nothing to learn)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    dropped: int

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_dataset(tokenizer, examples: list[dict], max_len: int) -> TokenizedData:
    if max_len < 2:
        raise SdmpruneError(f"--max-len must be at least 2, got {max_len}")
    kept_ids, kept_labels, dropped = [], [], 0
    for example in examples:
        input_ids, labels = tokenize_example(tokenizer, example, max_len)
        if all(label == IGNORE_INDEX for label in labels[1:]):  # position 0 is never predicted
            dropped += 1
            continue
        kept_ids.append(input_ids)
        kept_labels.append(labels)
    if not kept_ids:
        raise SdmpruneError(f"every prompt is at least --max-len {max_len} tokens long, so no response token is "
                            "left to learn: raise --max-len")
    return TokenizedData(kept_ids, kept_labels, dropped)


def text_windows(windows: torch.Tensor) -> TokenizedData:
    """Token windows (N, S) as examples whose every next token is a target (plain text: no prompt to mask)."""
    rows = windows.tolist()
    return TokenizedData(rows, [list(row) for row in rows], 0)


def collate(data: TokenizedData, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids, attention_mask and labels, each (B, S) with S the longest example, and
    example (B,), the examples' indices in `data`."""
    length = max(len(data.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), length), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), length), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(data.input_ids[i])
        input_ids[row, :n] = torch.tensor(data.input_ids[i])
        labels[row, :n] = torch.tensor(data.labels[i])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "example": torch.tensor(indices, dtype=torch.long)}
