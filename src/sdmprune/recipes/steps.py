"""Setup steps shared by the recipes: load the model, read the evaluation text and the calibration windows,
measure perplexity. Each checks its inputs and fails with one line before any expensive work."""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

from ..data import extend_calibration, load_calibration, load_text
from ..data.text import data_dir as local_data_dir
from ..data.text import hub_reachable
from ..distributed import is_main
from ..evaluation.perplexity import perplexity, tokenize_windows
from ..models import load_model
from ..reconstruct import ReconstructConfig
from ..selection import selection_windows as draw_selection_windows
from .options import CalibrationOptions, DataOptions, ModelOptions, PerplexityOptions


def say(message: str) -> None:
    """A line for the user (rank 0 only)."""
    if is_main():
        print(message, file=sys.stderr)


def load(options: ModelOptions, *, device: str | None = None) -> tuple[nn.Module, object]:
    """`(model, tokenizer)`, timed; `device` overrides the option (FSDP loads on the CPU first)."""
    start = time.perf_counter()
    model, tokenizer = load_model(options.model, dtype=options.dtype, device=device or options.device,
                                  trust_remote_code=options.trust_remote_code)
    say(f"loaded {options.model} in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def perplexity_windows(options: PerplexityOptions, data: DataOptions, model: nn.Module, tokenizer
                       ) -> torch.Tensor | None:
    """(n, seq_len) evaluation windows, or None for `none` (and for `auto` when WikiText-2 cannot be read)."""
    if options.ppl_data == "none":
        return None
    name = "wikitext2" if options.ppl_data == "auto" else options.ppl_data
    if options.ppl_data == "auto" and local_data_dir(data.data_dir) is None and not hub_reachable():
        say("note: perplexity skipped: no local WikiText-2 (--data-dir / $SDMPRUNE_DATA_DIR) and the hub is out of "
            "reach; pass --ppl-data FILE or --data-dir to measure it")
        return None
    text = load_text(name, data.data_dir)
    return tokenize_windows(tokenizer, text, options.seq_len, options.max_tokens or None, model)


def measure(model: nn.Module, tokenizer, windows: torch.Tensor, options: PerplexityOptions, bf16: bool) -> dict:
    result = perplexity(model, tokenizer, windows, batch_size=options.eval_batch_size, bf16=bf16)
    return {"data": "wikitext2" if options.ppl_data == "auto" else options.ppl_data, **result}


def _source(options: CalibrationOptions, data: DataOptions, model: nn.Module) -> dict:
    """`load_calibration`'s keyword options for --calib."""
    return {"model": model, "data_dir": data.data_dir, "temperature": options.calib_temperature,
            "top_p": options.calib_top_p}


def calibration_windows(options: CalibrationOptions, data: DataOptions, model: nn.Module, tokenizer, seed: int
                        ) -> tuple[torch.Tensor, dict]:
    """`(windows (N, S), summary)` from --calib and its options."""
    return load_calibration(options.calib, tokenizer, n_samples=options.calib_samples, seq_len=options.calib_seq_len,
                            seed=seed, **_source(options, data, model))


def refit_windows(reconstruction: ReconstructConfig, options: CalibrationOptions, data: DataOptions,
                  model: nn.Module, tokenizer, seed: int, calibration: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """`(windows (--refit-samples, S), summary)` for the reconstruction: the first of the `calibration` windows
    (N, S), then more of --calib where --refit-samples asks for more (`extend_calibration`)."""
    wanted = reconstruction.refit_samples or calibration.shape[0]
    return extend_calibration(calibration, wanted, options.calib, tokenizer, seed=seed,
                              **_source(options, data, model))


def selection_windows(options: CalibrationOptions, data: DataOptions, model: nn.Module, tokenizer, seed: int
                      ) -> tuple[torch.Tensor, dict]:
    """`(windows, summary)` on which `--importance auto` compares its candidates (`sdmprune.selection`): windows of
    --calib that neither the scoring nor the refit sees."""
    return draw_selection_windows(options.calib, tokenizer, seq_len=options.calib_seq_len, seed=seed,
                                  **_source(options, data, model))


def perplexity_change(evaluation: dict) -> str:
    if not evaluation:
        return "perplexity: not measured"
    before, after = evaluation["before"], evaluation["after"]
    return (f"perplexity ({before['data']}, {before['tokens']} tokens, windows of {before['seq_len']}): "
            f"{before['ppl']:.2f} -> {after['ppl']:.2f}")
