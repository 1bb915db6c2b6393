"""Resumable runs: the output directory check, and the run state every recipe saves and resumes from.

A run state is two files in the output directory: `run_state.safetensors` (tensors: masks, LoRA weights,
optimizer moments, RNG states...) and `run_state.json` (the settings the run must be resumed with, and its
progress), each written atomically, the JSON last: its presence marks a complete state. The final output
replaces the directory, so an interrupted run is one whose state exists and whose final record does not.
No pickles: optimizer state is flattened into tensors + JSON.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .distributed import barrier, gathered, is_main
from .errors import SdmpruneError
from .io import atomic_file, check_output_dir

STATE_JSON, STATE_TENSORS = "run_state.json", "run_state.safetensors"


def interrupted(output: Path, finished: str) -> bool:
    """Whether `output` holds a run state (in it, or in a subdirectory of it: one per candidate of `--importance
    auto`) without the run's final record `finished` (e.g. pruning.json)."""
    has_state = (output / STATE_JSON).is_file() or any(output.glob(f"*/{STATE_JSON}"))
    return has_state and not (output / finished).is_file()


def prepare_output(output: str | Path, *, overwrite: bool, resume: bool, finished: str) -> bool:
    """Check --output / --overwrite / --resume before any work; True if an interrupted run is resumed."""
    output = Path(output)
    if resume:
        if not interrupted(output, finished):
            raise SdmpruneError(f"nothing to resume: {output} holds no interrupted run")
        return True
    if interrupted(output, finished) and not overwrite:
        raise SdmpruneError(f"{output} holds an interrupted run: pass --resume to continue it or --overwrite to "
                            "start over")
    check_output_dir(output, overwrite)
    return False


def clear_for_new_run(output: str | Path, resume: bool) -> None:
    """Remove what --overwrite replaces (the run state goes into the output directory); every process waits."""
    if not resume and Path(output).exists() and is_main():
        shutil.rmtree(output)
    barrier()


class Checkpoint:
    """The run state in `directory` (nothing is saved when it is None)."""

    def __init__(self, directory: str | Path | None):
        self.directory = Path(directory) if directory is not None else None

    def exists(self) -> bool:
        return self.directory is not None and (self.directory / STATE_JSON).is_file()

    def save(self, settings: dict, progress: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Rank 0 writes; with several processes every one waits until it has (each may read it later)."""
        if self.directory is None:
            return
        if is_main():
            self.directory.mkdir(parents=True, exist_ok=True)
            with atomic_file(self.directory / STATE_TENSORS) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
            with atomic_file(self.directory / STATE_JSON) as tmp:  # written last: it marks the state complete
                tmp.write_text(json.dumps({"settings": settings, "progress": progress}, indent=1))
        barrier()

    def load(self, settings: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """(progress, tensors) of the saved state; fails if it was saved with other `settings`."""
        record = json.loads((self.directory / STATE_JSON).read_text())
        if record["settings"] != settings:
            saved = record["settings"]
            changed = sorted(k for k in set(settings) | set(saved) if saved.get(k) != settings.get(k))
            raise SdmpruneError(f"cannot resume {self.directory}: the settings differ from the interrupted run's "
                                f"({', '.join(changed)}); use the same command, or --overwrite to start over")
        return record["progress"], load_file(self.directory / STATE_TENSORS)


def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and every CUDA device) as tensors."""
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of `rng_tensors`."""
    torch.set_rng_state(tensors["rng.cpu"].clone())
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of `tensors` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors tensors (`<param index>.<key>`) plus JSON (param groups, non-tensors).

    State sharded by FSDP is gathered whole (a collective: then call it on every process)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = gathered(value).detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of `flatten_optimizer`: a state dict for `optimizer.load_state_dict`."""
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{**group, "betas": tuple(group["betas"])} if "betas" in group else group
              for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
