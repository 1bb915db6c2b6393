"""Several processes (torchrun / accelerate launch): the process group, sharded calibration, reductions, FSDP2.

Everything here is the identity in a single process, so the rest of the package calls it unconditionally:

- `init_from_env()` joins the group that `torchrun` or `accelerate launch` describe in the environment
  (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL with one GPU per LOCAL_RANK, else Gloo.
- `shard_windows` gives each process a contiguous share of the calibration micro-batches, cut exactly as a
  single process cuts them (SDMPrune's weight importance takes |.| per micro-batch).
- `all_reduce_sum` adds partial sums over processes; `broadcast_from_main` / `broadcast_masks` make rank 0's
  decision everyone's; `stack_from_all` collects one tensor per process (RNG states).
- `shard_model` applies FSDP2 (`fully_shard`) per decoder layer and to the root, with gradients summed (not
  averaged) over processes; `gathered` and `unshard_for_export` bring sharded tensors back whole,
  `shaped_like` shards a whole one; `inference_context` is the no-gradient mode FSDP tolerates.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import SdmpruneError
from .models.architectures import get_architecture

BUCKET_ELEMENTS = 1 << 27  # largest flattened buffer per all-reduce (512 MiB in fp32)
T = TypeVar("T")


# ----------------------------------------------------------------------------- the process group


def init_from_env() -> bool:
    """Join the process group described by the launcher's environment; False if there is none to join or it
    is already initialised (by the caller, who then also destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise SdmpruneError("this PyTorch build has no torch.distributed: run a single process")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # so device "cuda" is this process's GPU
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """True on the process that writes outputs, prints and shows progress bars (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective buffers live: the current GPU under NCCL, the CPU under Gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- data and reductions


def shard(
    items: Sequence[T], *, lockstep: bool = False, process: int | None = None, processes: int | None = None,
) -> list[tuple[int, T, bool]]:
    """This process's contiguous share of `items` as (index, item, counts) triples.

    Process r of P takes items [r·n/P, (r+1)·n/P). With `lockstep` (FSDP's forward and backward are
    collectives; DDP needs one synchronising backward from everyone) every process gets ceil(n/P) entries,
    the missing ones fillers `(0, items[0], False)` whose results must be discarded. `process` / `processes`
    default to this process's rank and the world size.
    """
    process = rank() if process is None else process
    world = world_size() if processes is None else processes
    first, last = process * len(items) // world, (process + 1) * len(items) // world
    share = [(i, items[i], True) for i in range(first, last)]
    if lockstep:
        share += [(0, items[0], False)] * (-(-len(items) // world) - len(share))
    return share


class MicroBatch(NamedTuple):
    start: int  # index of its first window among all windows
    ids: torch.Tensor  # (b, S) token ids
    counts: bool  # False: a filler pass that only keeps FSDP's collectives in step; discard its results


def shard_windows(windows: torch.Tensor, micro_batch: int, *, lockstep: bool = False, **where) -> list[MicroBatch]:
    """This process's `shard` of `windows` (N, S) cut into micro-batches of `micro_batch` windows, the cut of a
    single process (lockstep: for an FSDP model); `where`: `process` / `processes` as for `shard`."""
    return [MicroBatch(i * micro_batch, batch, counts)
            for i, batch, counts in shard(windows.split(micro_batch), lockstep=lockstep, **where)]


def _buckets(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive runs of one dtype holding at most BUCKET_ELEMENTS elements (a longer tensor goes alone)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for tensor in tensors:
        if not buckets or buckets[-1][0].dtype != tensor.dtype or size + tensor.numel() > BUCKET_ELEMENTS:
            buckets.append([])
            size = 0
        buckets[-1].append(tensor)
        size += tensor.numel()
    return buckets


@torch.no_grad()
def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor, in place, by its sum over processes: one flattened all-reduce per bucket."""
    if world_size() == 1 or not tensors:
        return
    device = _comm_device()
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1).to(device) for t in bucket])
        dist.all_reduce(flat)
        for tensor, part in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
            tensor.copy_(part.view_as(tensor))


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` on every process (same dtype everywhere; shapes may differ, rank 0's wins)."""
    if world_size() == 1:
        return tensor
    device = _comm_device()
    shape = torch.tensor(tensor.shape if is_main() else [0] * tensor.dim(), dtype=torch.long, device=device)
    dist.broadcast(shape, src=0)
    if is_main():
        buffer = tensor.to(device).contiguous()
    else:
        buffer = torch.empty(shape.tolist(), dtype=tensor.dtype, device=device)
    dist.broadcast(buffer, src=0)
    return buffer.to(tensor.device)


def stack_from_all(tensor: torch.Tensor) -> torch.Tensor:
    """(P, *shape): every process's `tensor` (same shape and dtype everywhere) in rank order."""
    if world_size() == 1:
        return tensor[None]
    device = _comm_device()
    parts = [torch.empty_like(tensor, device=device) for _ in range(world_size())]
    dist.all_gather(parts, tensor.to(device))
    return torch.stack(parts).to(tensor.device)


def broadcast_masks(keep: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Rank 0's boolean keep-masks on every process, in one broadcast (as uint8: Gloo has no bool)."""
    if world_size() == 1:
        return list(keep)
    flat = broadcast_from_main(torch.cat([k.reshape(-1) for k in keep]).to(torch.uint8))
    return [part.view_as(k).to(device=k.device, dtype=torch.bool)
            for k, part in zip(keep, flat.split([k.numel() for k in keep]), strict=True)]


# ----------------------------------------------------------------------------- FSDP2


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was sharded by FSDP2's `fully_shard`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no FSDP2, nothing can be sharded
        return False
    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, layers: Sequence[nn.Module] | None = None) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer (default: the architecture's), then the root, over all processes.

    Parameters move to this process's device (its GPU, else the CPU) as 1/P shards. Gradients are reduce-
    scattered as SUMS over processes: Taylor scores and the recovery loss are normalised by global counts.
    """
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError as error:
        raise SdmpruneError("--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6): upgrade "
                            "torch or run without --fsdp") from error
    if world_size() == 1:
        raise SdmpruneError("--fsdp shards the model over several processes: launch with `torchrun "
                            "--nproc-per-node N -m sdmprune.cli ...` or `accelerate launch`, or drop --fsdp")
    for layer in get_architecture(model).decoder_layers(model) if layers is None else layers:
        fully_shard(layer)
    fully_shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (Gloo has no PREMUL_SUM)
    return model


def inference_context(model: nn.Module):
    """`torch.inference_mode()`, or `torch.no_grad()` for an FSDP model: FSDP refills the same unsharded-parameter
    buffers on every pass, and buffers first allocated under inference mode could not serve autograd later."""
    return torch.no_grad() if is_sharded(model) else torch.inference_mode()


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a tensor FSDP sharded (an all-gather: call it on every process), else `tensor` itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shaped_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` on `param`'s device, sharded as `param` when FSDP sharded it (call it on every process then)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    return full.to(param.device)
