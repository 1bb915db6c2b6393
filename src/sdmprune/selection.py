"""Score, mask and refit, choosing among candidate criteria (`--importance auto`) by held-out perplexity.

    chosen = prune_and_refit(model, PruneConfig(ratio=0.3, importance="auto"), calibration=(ids, summary),
                             refit=(refit_ids, refit_summary), reconstruction=ReconstructConfig(),
                             selection=(selection_ids, selection_summary))
    chosen.result.masks       # the kept candidate's masks (with its refit), attached to `model`
    chosen.report             # {"chosen", "candidates": {label: {"selection_nll", ...}}, "windows", ...}

Which selection is best after the refit depends on the model: the preset (activation-wanda) is the lower row on
SmolLM2, the paper's weight-space Taylor on Qwen2.5-Coder-0.5B (README, Reconstruction). With several candidates
(`Criterion.candidates`) each is scored and masked (its run state in `state_dir/candidate-LABEL`, so an
interrupted run resumes), refitted, and its mean token NLL measured on the selection windows; the lowest is kept
and the others' masks are dropped. The selection windows are SELECTION_WINDOWS windows of the calibration source
drawn with their own seed (seed + SELECTION_SEED), windows that neither the scoring nor the refit fits. With a
single candidate this is `prune` followed by `reconstruct`, and no selection windows are needed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .data import load_calibration
from .distributed import is_main
from .errors import SdmpruneError
from .evaluation.perplexity import perplexity
from .masks import NeuronMasks
from .pruning import PruneConfig, PruneResult, prune
from .reconstruct import ReconstructConfig, reconstruct

SELECTION_WINDOWS = 32  # × the calibration window length (256 tokens by default): 8,192 tokens, seconds a candidate
SELECTION_SEED = 2_000_003  # added to the seed: a stream neither the scoring windows nor the refit's further ones use

Windows = tuple[torch.Tensor, dict]  # (N, S) token ids and their summary, as `load_calibration` returns them


@dataclass
class Chosen:
    result: PruneResult  # the kept candidate's masks (refit included), attached, and its pruning report
    reconstruction: dict | None  # its refit's report, the refit windows' summary under "calibration" (None: no refit)
    report: dict | None  # the choice, the selection windows' summary under "calibration" (None: a single candidate)


def describe_choice(choice: dict) -> str:
    """One line on what the choice kept and why, from its report (`Chosen.report`, as in pruning.json)."""
    tried = ", ".join(f"{label} {record['selection_ppl']:.2f}" for label, record in choice["candidates"].items())
    return f"chose {choice['chosen']} by perplexity on {choice['windows']} further calibration windows ({tried})"


def selection_windows(spec: str, tokenizer, *, seq_len: int, seed: int, **options) -> Windows:
    """(SELECTION_WINDOWS, seq_len) windows of the calibration source `spec` for the choice, and their summary
    (`options`: `load_calibration`'s)."""
    return load_calibration(spec, tokenizer, n_samples=SELECTION_WINDOWS, seq_len=seq_len,
                            seed=seed + SELECTION_SEED, **options)


def reconstruct_on(model: nn.Module, masks: NeuronMasks, windows: Windows, config: ReconstructConfig | None,
                   **options) -> dict:
    """`reconstruct` on `windows` (`options`: its keywords); its report, with their summary under "calibration"."""
    ids, summary = windows
    return {**reconstruct(model, masks, ids, config, **options), "calibration": summary}


def candidate_dir(state_dir: str | Path | None, label: str) -> Path | None:
    """Where candidate `label` keeps its run state under `state_dir` (None: no state kept)."""
    return None if state_dir is None else Path(state_dir) / f"candidate-{label}"


def prune_and_refit(
    model: nn.Module,
    pruning: PruneConfig,
    *,
    calibration: Windows | None,
    refit: Windows | None = None,
    reconstruction: ReconstructConfig | None = None,
    selection: Windows | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    batch_size: int = 1,
    inspect: Callable[[str], dict] | None = None,
    chosen_before: str | None = None,
) -> Chosen:
    """`prune` on the `calibration` windows (None: a data-free criterion) then `reconstruct` on the `refit` windows
    (none without `reconstruction` or with `reconstruct="none"`), for each of the criterion's candidates, keeping
    the lowest NLL on the `selection` windows (needed with several candidates; measured `batch_size` windows at a
    time). Each is `(ids (N, S), summary)`; the summaries go into the reports. `inspect(label)`, when given, is
    called while each candidate's masks are on; what it returns goes into that candidate's record.
    `chosen_before`: the candidate an earlier run with the same settings kept (a resumed pipeline past this step):
    only that one is run again, from its saved state, and the report is None."""
    candidates = pruning.criterion.candidates()
    refits = reconstruction is not None and reconstruction.reconstruct != "none"
    if refits and refit is None:
        raise SdmpruneError("the reconstruction needs its calibration windows: pass `refit`")
    if chosen_before is not None:
        if chosen_before not in candidates or len(candidates) == 1:
            raise SdmpruneError(f"'{chosen_before}' is not one of the candidates {', '.join(candidates)}")
        return prune_and_refit(model, replace(pruning, criterion=candidates[chosen_before]), calibration=calibration,
                               refit=refit, reconstruction=reconstruction,
                               state_dir=candidate_dir(state_dir, chosen_before), resume=resume)
    if len(candidates) > 1 and selection is None:
        raise SdmpruneError(f"choosing among {', '.join(candidates)} needs selection windows: pass `selection`")

    ids, summary = calibration if calibration is not None else (None, None)

    def run(criterion, directory: str | Path | None) -> Chosen:
        result = prune(model, replace(pruning, criterion=criterion), calibration=ids, calibration_summary=summary,
                       state_dir=directory, resume=resume)
        refitted = reconstruct_on(model, result.masks, refit, reconstruction, micro_batch=pruning.micro_batch,
                                  bf16=pruning.runtime.bf16) if refits else None
        return Chosen(result, refitted, None)

    if len(candidates) == 1:
        return run(pruning.criterion, state_dir)
    runs: dict[str, Chosen] = {}
    records: dict[str, dict] = {}
    for label, criterion in candidates.items():
        start = time.perf_counter()
        runs[label] = run(criterion, candidate_dir(state_dir, label))
        measured = perplexity(model, None, selection[0], batch_size=batch_size, bf16=pruning.runtime.bf16,
                              progress=False)
        records[label] = {"selection_nll": round(measured["nll"], 5), "selection_ppl": round(measured["ppl"], 3),
                          "seconds": round(time.perf_counter() - start, 1), **(inspect(label) if inspect else {})}
        if is_main():
            print(f"candidate {label}: perplexity {measured['ppl']:.3f} on the selection windows", flush=True)
        runs[label].result.masks.remove()
    chosen = min(records, key=lambda label: records[label]["selection_nll"])
    kept = runs[chosen]
    kept.result.masks.attach()
    report = {"chosen": chosen, "candidates": records, "windows": int(selection[0].shape[0]),
              "tokens_per_window": int(selection[0].shape[1]), "calibration": selection[1]}
    return Chosen(kept.result, kept.reconstruction, report)
