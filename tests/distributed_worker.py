"""Prune tiny Llamas in several settings and LoRA-recover a pruned one; run in one process by
tests/test_distributed.py, and under `torchrun --nproc-per-node 2 distributed_worker.py OUT PRUNED DATA` by it.

Each pruning case leaves, in OUT/<case>/, the run state of `prune` (final scores and masks, written by rank 0)
and `bias.safetensors` (the compensation bias, if any); cases with `fsdp` shard the model with FSDP2. Each
recovery case writes the `finetune` output OUT/<case>/ for the model directory PRUNED and the data file DATA.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch
from conftest import tiny_model
from safetensors.torch import save_file

from sdmprune import SdmpruneError, finetune, prune
from sdmprune.distributed import init_from_env, is_main, shard_model, shutdown
from sdmprune.masks import NeuronMasks
from sdmprune.reconstruct import ReconstructConfig, reconstruct

# 5 windows: an uneven share for 2 processes (3 + 2 micro-batches, FSDP runs a filler pass on one of them)
WINDOWS, SEQ = 5, 16
SETTINGS = dict(mlp_ratio=0.5, seed=1)
CASES = {
    "taylor": dict(criterion="taylor", steps=2),
    "sdmprune": dict(criterion="sdmprune", steps=2, cold_start=0.1),  # activation-wanda, masks-off teacher, cold start
    "sdmprune-weight-copy": dict(criterion="sdmprune", importance="weight", teacher="copy", cold_start=0.1),
    "flap": dict(criterion="flap", micro_batch=2),  # activation statistics merged across processes + bias
    "taylor-fsdp": dict(criterion="taylor", fsdp=True),
    "sdmprune-fsdp": dict(criterion="sdmprune", steps=2, cold_start=0.1, fsdp=True),
    "wanda-sp-fsdp": dict(criterion="wanda-sp", micro_batch=2, fsdp=True),
}
# 3 micro-batches per step over 2 processes (2 + 1 and a filler); no dropout, so one process gives the same
RECOVERY = dict(max_steps=4, batch_size=1, grad_accum=3, lr=5e-3, lora_dropout=0.0, max_len=256, merge=True,
                progress=False)
RECOVERY_CASES = {"lora-ddp": dict(fsdp=False), "lora-fsdp": dict(fsdp=True)}
# with dropout (each process's random stream matters) and a checkpoint every 2 steps, for the resume case
RESUMABLE = dict(RECOVERY, lora_dropout=0.1, save_every=2, fsdp=True)
RECONSTRUCT_MODES = ("one-shot", "sequential")  # reconstruct_case: Grams all-reduced per layer, 3 + 2 windows
REFUSED_UNDER_FSDP = {"weight": dict(criterion="sdmprune", importance="weight", cold_start=0.1),
                      "copy": dict(criterion="sdmprune", teacher="copy", cold_start=0.1)}


def calibration() -> torch.Tensor:
    return torch.randint(0, 256, (WINDOWS, SEQ), generator=torch.Generator().manual_seed(5))


def run_case(name: str, output: Path, *, shard: bool) -> None:
    settings = dict(CASES[name])
    fsdp = settings.pop("fsdp", False)
    model = tiny_model("llama")
    if fsdp and shard:
        shard_model(model)
    result = prune(model, calibration=calibration(), state_dir=output / name, **SETTINGS, **settings)
    biases = {f"bias.{i}": b.cpu() for i, b in enumerate(result.masks.bias) if b is not None}
    if biases and is_main():
        save_file(biases, output / name / "bias.safetensors")


def recover(name: str, output: Path, pruned: str, data: str, *, shard: bool) -> dict:
    return finetune(pruned, output / name, data=data, **RECOVERY, fsdp=RECOVERY_CASES[name]["fsdp"] and shard)


class Stop(Exception):
    pass


def recover_interrupted_and_resumed(output: Path, pruned: str, data: str) -> None:
    """RESUMABLE run straight through to OUT/straight, and stopped right after its step-2 checkpoint (on every
    process) then resumed to OUT/resumed."""
    finetune(pruned, output / "straight", data=data, **RESUMABLE)
    module = importlib.import_module("sdmprune.recovery.finetune")
    save = module.save_training_state

    def save_then_stop(*args):
        save(*args)
        raise Stop

    module.save_training_state = save_then_stop
    try:
        finetune(pruned, output / "resumed", data=data, **RESUMABLE)
    except Stop:
        pass
    finally:
        module.save_training_state = save
    finetune(pruned, output / "resumed", data=data, resume=True, **RESUMABLE)


def reconstruct_case(output: Path) -> None:
    """One-shot and sequential reconstruction, with intercept, of a tiny Llama with fixed masks (half of each layer
    kept); rank 0 writes, per mode, OUT/reconstruct/<mode>.safetensors: each layer's all-reduced Gram of the kept
    neurons (`gram.<l>`, captured where the refit is solved) and the refit (`weight.<l>`, `bias.<l>`)."""
    module = importlib.import_module("sdmprune.reconstruct")
    solve = module.refit
    for mode in RECONSTRUCT_MODES:
        model = tiny_model("llama")
        generator = torch.Generator().manual_seed(3)
        masks = NeuronMasks(model, [torch.randperm(64, generator=generator) < 32 for _ in range(2)])
        tensors = {}

        def recording(stats, *args, tensors=tensors):
            tensors[f"gram.{len(tensors)}"] = stats.gram.clone()
            return solve(stats, *args)

        module.refit = recording
        try:
            reconstruct(model, masks, calibration(), ReconstructConfig(mode, 1e-3, intercept=True))
        finally:
            module.refit = solve
        tensors.update({f"weight.{i}": w for i, w in enumerate(masks.weight)})
        tensors.update({f"bias.{i}": b for i, b in enumerate(masks.bias) if b is not None})  # None: layer kept as is
        if is_main():
            (output / "reconstruct").mkdir(parents=True, exist_ok=True)
            save_file(tensors, output / "reconstruct" / f"{mode}.safetensors")


def refusals() -> dict[str, str]:
    """The SdmpruneError of each setting refused under FSDP."""
    messages = {}
    for name, settings in REFUSED_UNDER_FSDP.items():
        model = shard_model(tiny_model("llama"))
        try:
            prune(model, calibration=calibration(), **SETTINGS, **settings)
            messages[name] = "accepted"
        except SdmpruneError as error:
            messages[name] = str(error)
    return messages


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, pruned, data = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    init_from_env()
    for case in CASES:
        run_case(case, out, shard=True)
    for case in RECOVERY_CASES:
        recover(case, out, pruned, data, shard=True)
    recover_interrupted_and_resumed(out, pruned, data)
    reconstruct_case(out)
    messages = refusals()
    if is_main():
        (out / "refusals.json").write_text(json.dumps(messages))
    shutdown()
