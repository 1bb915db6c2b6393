"""Option groups of the recipes: where the model, the data and the outputs come from and go to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..data import TEXT_DATASETS
from ..errors import SdmpruneError
from ..evaluation.tasks import ALL_TASKS
from ..export import GGUF_TYPES, export_gguf
from ..models import DEFAULT_MODEL
from ..options import FromOptions, described

GGUF_WIDTH_MULTIPLE = 32  # llama.cpp's f16 kernels and its 32-weight quantisation blocks (bench/results/llamacpp.md)


@dataclass
class ModelOptions:
    """model"""

    model: str = field(default=DEFAULT_MODEL, metadata=described(
        f"hub id, local HF directory, .gguf file, or a packaged model alias ('{DEFAULT_MODEL}' is bundled)"))
    dtype: str = field(default="auto", metadata=described(
        "weights dtype; auto = bf16 on a GPU, fp32 on CPU", choices=["auto", "float32", "bfloat16", "float16"]))
    device: str = field(default="auto", metadata=described("auto (CUDA when present), cpu, cuda, cuda:1, ..."))
    trust_remote_code: bool = field(default=False, metadata=described(
        "allow custom model code from the hub (off by default)"))


@dataclass
class DataOptions:
    """data"""

    data_dir: str | None = field(default=None, metadata=described(
        "local directory holding the named datasets (c4, wikitext2, the zero-shot tasks); default: "
        "$SDMPRUNE_DATA_DIR; unset = Hugging Face hub"))


@dataclass
class CalibrationOptions:
    """calibration (the windows criteria score on, or NutePrune trains on)"""

    calib: str = field(default="c4", metadata=described(
        "a .txt/.jsonl file, a directory of text or source-code files (e.g. a package's sources, for a code model), "
        "a dataset name (c4, wikitext2), or 'self' (text sampled from the model itself)"))
    calib_samples: int = field(default=64, metadata=described("number of calibration windows"))
    calib_seq_len: int = field(default=256, metadata=described("tokens per calibration window"))
    calib_temperature: float = field(default=1.0, metadata=described("--calib self: sampling temperature"))
    calib_top_p: float = field(default=0.95, metadata=described("--calib self: nucleus sampling top-p"))

    def validate(self) -> None:
        if self.calib_samples < 1 or self.calib_seq_len < 2:
            raise SdmpruneError(f"calibration needs at least 1 window of at least 2 tokens, got {self.calib_samples} "
                                f"windows of {self.calib_seq_len}: raise --calib-samples / --calib-seq-len")
        if self.calib_temperature <= 0 or not 0 < self.calib_top_p <= 1:
            raise SdmpruneError(f"--calib-temperature must be > 0 and --calib-top-p in (0, 1], got "
                                f"{self.calib_temperature} and {self.calib_top_p}")


@dataclass
class PerplexityOptions:
    """perplexity"""

    ppl_data: str = field(default="auto", metadata=described(
        f"perplexity text: a .txt/.raw/.jsonl file or a dataset name ({', '.join(TEXT_DATASETS)}); 'none' skips "
        "it; 'auto' = wikitext2 where it can be read (--data-dir or the hub), else skipped with a note; compress takes "
        "a comma-separated list (e.g. wikitext2,c4), each measured after every stage"))
    seq_len: int = field(default=512, metadata=described("perplexity window length in tokens"))
    max_tokens: int = field(default=16384, metadata=described("use only the first N tokens of the text (0 = all)"))
    eval_batch_size: int = field(default=1, metadata=described(
        "perplexity windows (or distinct zero-shot contexts, each with all its answers) per forward pass"))

    def validate(self) -> None:
        if self.seq_len < 2:
            raise SdmpruneError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.max_tokens < 0 or self.eval_batch_size < 1:
            raise SdmpruneError(f"--max-tokens must be 0 or more and --eval-batch-size at least 1, got "
                                f"{self.max_tokens} and {self.eval_batch_size}")


@dataclass
class TaskOptions:
    """zero-shot tasks"""

    tasks: str | None = field(default=None, metadata=described(
        f"comma-separated zero-shot tasks; with --data-dir / $SDMPRUNE_DATA_DIR the shipped local ones "
        f"({', '.join(ALL_TASKS)}; 'sdmprune' = the paper's 10, 'all' = all 12), else any task the harness knows "
        "(online)"))
    limit: int | None = field(default=None, metadata=described("evaluate only the first N items of each task"))

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise SdmpruneError(f"--limit must be at least 1, got {self.limit}")


@dataclass
class OutputOptions:
    """output"""

    output: str = field(metadata=described("directory to write to (must not exist, unless --overwrite/--resume)"))
    overwrite: bool = field(default=False, metadata=described("replace an existing output directory"))
    resume: bool = field(default=False, metadata=described(
        "continue an interrupted run from the state saved in --output (same settings)"))


@dataclass
class ParallelOptions:
    """several processes (torchrun / accelerate launch)"""

    fsdp: bool = field(default=False, metadata=described(
        "shard the model over the processes with FSDP2 (for models that do not fit on one device) instead of "
        "replicating it; every process must pass it"))


@dataclass
class GgufOptions:
    """GGUF for llama.cpp"""

    gguf: str | None = field(default=None, metadata=described(
        "also write the export as one GGUF file of this type for llama.cpp (uniform: the model's own "
        "architecture; per-layer widths or head counts: deci); without --width-multiple, widths are then rounded "
        "to multiples of 32, which llama.cpp needs to run the pruned model faster (bench/results/llamacpp.md)",
        choices=list(GGUF_TYPES)))
    verify: bool = field(default=False, metadata=described(
        "read the GGUF file back and check every tensor and metadata value against the export"))
    tokenizer_from: str | None = field(default=None, metadata=described(
        "a GGUF file to copy the tokenizer from (default: the source model's GGUF when it came from one, else "
        "converted from the Hugging Face tokenizer)"))

    def write(self, directory: str | Path, path: str | Path | None = None) -> Path | None:
        """The GGUF file of export `directory` (None when no type was asked for)."""
        if self.gguf is None:
            return None
        return export_gguf(directory, path, dtype=self.gguf, verify=self.verify, tokenizer_from=self.tokenizer_from)


@dataclass
class ExportOptions:
    """export"""

    padded: bool = field(default=False, metadata=described(
        "if widths or head counts differ per layer, zero-pad every layer to the widest so plain transformers "
        "loads it"))
    gguf: GgufOptions = field(default_factory=GgufOptions)

    def width_multiple(self, asked: int | None) -> int:
        """The width rounding: the one asked for, else 32 for llama.cpp (--gguf), else 1."""
        if asked is not None:
            return asked
        return GGUF_WIDTH_MULTIPLE if self.gguf.gguf is not None else 1


@dataclass
class PruningRunOptions(FromOptions):
    """What the run of every pruning method has: the model, its data, the evaluation and the export."""

    output: OutputOptions
    model: ModelOptions = field(default_factory=ModelOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    evaluation: PerplexityOptions = field(default_factory=PerplexityOptions)
    data: DataOptions = field(default_factory=DataOptions)
    export: ExportOptions = field(default_factory=ExportOptions)
