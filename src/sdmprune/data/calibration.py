"""Calibration windows: random token windows of real documents, or text sampled from the model itself.

Sources (`spec`):
- a `.jsonl` file: one document per line (`text` field);
- any other file (`.txt`, `.raw`, ...): the whole file is one document;
- a directory: the text and source-code files directly inside it (`DIRECTORY_SUFFIXES`: `.txt`, `.jsonl`,
  `.md`, `.py`, `.c`, ...), in sorted order, read as above (each file but a `.jsonl` one is one document);
  e.g. a package's sources to calibrate a code model on code;
- `c4` / `wikitext2`: the calibration split of a named dataset (see `text.CALIBRATION_DATASETS`);
  c4 documents are separate, wikitext2 is one document;
- `self`: data-free, sequences sampled from `model`.

Documents are tokenised without special tokens, so every window is a plain slice of text (no BOS
in the middle of one). Windows come from documents of at least `seq_len` tokens: each draws a
document uniformly, then a start uniformly, from a local generator seeded with `seed`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import inference_context, is_main
from ..errors import SdmpruneError
from ..runtime import cache_keyword, context_length
from .text import CALIBRATION_DATASETS, dataset_documents, read_jsonl

SELF_SOURCE = "self"
# added to the seed for windows beyond a first draw (`extend_calibration`): a stream no small seed's first draw uses
MORE_WINDOWS_SEED = 1_000_003
SELF_BATCH = 16  # sequences generated together; fixed, so the random stream (and the ids) depend on `seed` only
DIRECTORY_SUFFIXES = frozenset((  # what a directory source reads: text, then source code
    ".txt", ".jsonl", ".md", ".rst",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".java", ".kt", ".scala", ".go", ".rs", ".js", ".ts",
    ".tsx", ".rb", ".php", ".cs", ".swift", ".lua", ".sh", ".sql", ".r", ".jl",
))


def _file_documents(path: Path) -> list[str]:
    try:
        return read_jsonl(path) if path.suffix == ".jsonl" else [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as error:
        raise SdmpruneError(f"calibration file {path} is not UTF-8 text (byte {error.start}): give .txt/.jsonl "
                            "files of text") from error


def load_documents(spec: str, data_directory: str | Path | None = None) -> list[str]:
    """The non-blank documents of a file, a directory or a dataset name (see the module docstring)."""
    if spec in CALIBRATION_DATASETS:
        documents = dataset_documents(spec, CALIBRATION_DATASETS[spec], data_directory)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(file for file in path.iterdir()
                           if file.is_file() and file.suffix.lower() in DIRECTORY_SUFFIXES)
            documents = [document for file in files for document in _file_documents(file)]
        elif path.is_file():
            documents = _file_documents(path)
        elif path.suffix or len(path.parts) > 1:
            raise SdmpruneError(f"calibration file '{spec}' not found: check the path")
        else:
            names = ", ".join([SELF_SOURCE, *CALIBRATION_DATASETS])
            raise SdmpruneError(f"unknown calibration data '{spec}': use one of {names}, a .txt/.jsonl file "
                                "or a directory of text or source files")
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise SdmpruneError(f"calibration data '{spec}' has no text: give .txt/.jsonl (or, in a directory, "
                            "source) files with text in them")
    return documents


def sample_windows(documents: list[list[int]], n_samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, int]:
    """(n_samples, seq_len) windows of the token lists with at least `seq_len` tokens, and how many those are."""
    eligible = [tokens for tokens in documents if len(tokens) >= seq_len]
    if not eligible:
        longest = max(len(tokens) for tokens in documents)
        raise SdmpruneError(
            f"no calibration document has {seq_len} tokens: found {len(documents)} documents, the longest has "
            f"{longest} tokens; use a shorter sequence length or longer documents"
        )
    lengths = torch.tensor([len(tokens) for tokens in eligible])
    offsets = lengths.cumsum(0) - lengths
    flat = torch.tensor([token for tokens in eligible for token in tokens], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    doc = torch.randint(len(eligible), (n_samples,), generator=generator)
    # floor(U * count) with U in [0, 1) is uniform over the count = len - seq_len + 1 valid starts
    start = (torch.rand(n_samples, generator=generator, dtype=torch.float64) * (lengths[doc] - seq_len + 1)).long()
    index = (offsets[doc] + start)[:, None] + torch.arange(seq_len)
    return flat[index], len(eligible)


def _sample_top_p(logits: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """(B,) ids drawn from (B, V) logits, restricted to the smallest set of tokens holding `top_p` of the mass."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)  # the mass before them already suffices
    choice = torch.multinomial(probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


def sample_from_model(
    model: nn.Module, tokenizer, n_samples: int, seq_len: int, seed: int, temperature: float, top_p: float
) -> torch.Tensor:
    """(n_samples, seq_len) ids: BOS (or EOS) then `seq_len - 1` tokens sampled with a KV cache.

    EOS and ids past the tokenizer's vocabulary (padded embedding rows) are never sampled, so every
    sequence is full-length text. Deterministic for a seed, batch size and device.
    """
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start_id is None:
        raise SdmpruneError("the tokenizer has neither a BOS nor an EOS token to start sampling from: "
                            "calibrate on text instead of 'self'")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    banned = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
    banned[len(tokenizer):] = True
    if tokenizer.eos_token_id is not None:
        banned[tokenizer.eos_token_id] = True
    samples = torch.empty(n_samples, seq_len, dtype=torch.long)
    keyword = cache_keyword(model)
    with inference_context(model), tqdm(total=n_samples * (seq_len - 1), desc="calibration (self)", unit="tok",
                                        leave=False, disable=not is_main()) as bar:
        for first in range(0, n_samples, SELF_BATCH):
            ids = torch.full((min(SELF_BATCH, n_samples - first), seq_len), start_id, dtype=torch.long, device=device)
            cache = None
            for position in range(1, seq_len):
                output = model(input_ids=ids[:, position - 1 : position], use_cache=True, **{keyword: cache})
                cache = output[keyword]
                logits = output.logits[:, -1].float().to(device) / temperature
                ids[:, position] = _sample_top_p(logits.masked_fill(banned, float("-inf")), top_p, generator)
                bar.update(ids.shape[0])
            samples[first : first + ids.shape[0]] = ids.cpu()
    return samples


def load_calibration(
    spec: str,
    tokenizer,
    *,
    n_samples: int = 128,
    seq_len: int = 256,
    seed: int = 0,
    model: nn.Module | None = None,
    data_dir: str | Path | None = None,
    temperature: float = 1.0,
    top_p: float = 0.95,
) -> tuple[torch.Tensor, dict]:
    """(n_samples, seq_len) int64 token ids + a summary dict for the report.

    The summary is {"source", "samples", "seq_len", "tokens", "seed", "documents" (eligible documents;
    for `self` the generated sequences)}, plus "temperature" and "top_p" for `self`.
    """
    if n_samples < 1 or seq_len < 1:
        raise SdmpruneError(f"calibration needs at least 1 sample of at least 1 token, got {n_samples} samples "
                            f"of {seq_len} tokens: raise them")
    limit = context_length(model) if model is not None else None
    if limit is not None and seq_len > limit:
        raise SdmpruneError(f"calibration sequence length {seq_len} is longer than the model's context "
                            f"({limit} tokens): lower it")
    summary = {"source": spec, "samples": n_samples, "seq_len": seq_len, "tokens": n_samples * seq_len, "seed": seed}
    if spec == SELF_SOURCE:
        if model is None:
            raise SdmpruneError("calibration 'self' samples text from the model, but no model was given: pass one")
        if temperature <= 0 or not 0 < top_p <= 1:
            raise SdmpruneError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        ids = sample_from_model(model, tokenizer, n_samples, seq_len, seed, temperature, top_p)
        return ids, {**summary, "documents": n_samples, "temperature": temperature, "top_p": top_p}
    documents = load_documents(spec, data_dir)
    tokens = tokenizer(documents, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    ids, eligible = sample_windows(tokens, n_samples, seq_len, seed)
    return ids, {**summary, "documents": eligible}


def extend_calibration(windows: torch.Tensor, n_samples: int, spec: str, tokenizer, *, seed: int,
                       **options) -> tuple[torch.Tensor, dict]:
    """(n_samples, S) windows and a summary: the first `n_samples` of `windows` (N, S) (drawn from `spec` with
    `seed`), then, where `n_samples` > N, n_samples − N more windows of `spec` drawn with seed + MORE_WINDOWS_SEED
    (other windows of the same source; `options` as `load_calibration`'s).

    The summary is {"windows", "from_first_draw", "more_seed" (None where no more were drawn)}.
    """
    first = min(n_samples, windows.shape[0])
    summary = {"windows": n_samples, "from_first_draw": first, "more_seed": None}
    if n_samples <= windows.shape[0]:
        return windows[:n_samples], summary
    more, _ = load_calibration(spec, tokenizer, n_samples=n_samples - first, seq_len=windows.shape[1],
                               seed=seed + MORE_WINDOWS_SEED, **options)
    return torch.cat([windows, more]), {**summary, "more_seed": seed + MORE_WINDOWS_SEED}
