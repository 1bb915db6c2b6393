"""Where and how tensors run: device and dtype choice, bf16 autocast, the model's context length, and the
library versions recorded beside every result. Imported by everything below the models."""

from __future__ import annotations

import functools
import inspect
import platform
import warnings
from contextlib import nullcontext

import torch
from torch import nn

from ._version import __version__
from .errors import SdmpruneError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on CPU."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise SdmpruneError(f"unknown dtype '{dtype}': choose auto, {', '.join(DTYPES)}")
    if DTYPES[dtype] is torch.bfloat16 and not native_bf16(device.type):
        warnings.warn(f"--dtype bfloat16 on a {device.type} without native bf16 matrix products: every matmul runs "
                      "in PyTorch's scalar fallback, ~100x slower than float32; use --dtype float32 here",
                      stacklevel=2)
    return DTYPES[dtype]


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether this machine multiplies bf16 matrices on `device_type` ("cpu", "cuda") in hardware-backed kernels.

    On a CPU, PyTorch runs bf16 matmuls through oneDNN only where the CPU has AVX-512 (BW/VL/DQ), AMX or Arm's
    bf16 instructions; elsewhere (e.g. an AVX2-only x86 CPU) it falls back to a scalar loop: 0.7 GFLOP/s
    against 72 for fp32 on one thread of an AVX2 AMD EPYC. On CUDA: `torch.cuda.is_bf16_supported()`.
    """
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True


def use_bf16(device: torch.device, bf16: bool) -> bool:
    """Whether bf16 autocast runs on `device` when `bf16` is asked: only where the device has native bf16
    matmuls (`native_bf16`); elsewhere the passes run in fp32, with one warning, since autocast would make
    them ~100x slower, not faster."""
    if bf16 and not native_bf16(device.type):
        _warn_bf16_unavailable(device.type)
        return False
    return bf16


@functools.cache  # once per process and device type
def _warn_bf16_unavailable(device_type: str) -> None:
    warnings.warn(f"bf16 autocast asked, but this {device_type} has no native bf16 matrix products (PyTorch would "
                  "emulate them ~100x slower than fp32): running in fp32", stacklevel=4)


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on `device` when asked and native there (`use_bf16`), else nothing."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16(device, bf16) else nullcontext()


def cache_keyword(model: nn.Module) -> str:
    """The forward argument (and output field) that carries a model's key/value cache: `cache` since
    transformers 5.2x, `past_key_values` before (still accepted, deprecated)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel forwards **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions support (tokens), when its config says."""
    return getattr(model.config, "max_position_embeddings", None)


def library_versions() -> dict[str, str]:
    """The versions a result was made with, and whether its bf16 autocast, when asked, really ran (`use_bf16`)."""
    import transformers

    return {
        "sdmprune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "bf16_autocast": "native" if native_bf16(resolve_device().type) else "unavailable (runs in fp32)",
    }


class PeakMemory:
    """Memory in MiB: CUDA's allocations on `device`, else this process's resident memory (Linux /proc; `reset()`
    sets the high-water mark VmHWM back to the current RSS through /proc/self/clear_refs); None where neither can
    be read (another OS)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
        except OSError:
            pass

    def peak_mib(self) -> float | None:
        """The peak since `reset()`."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self._status("VmHWM")

    def current_mib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**20
        return self._status("VmRSS")

    @staticmethod
    def _status(name: str) -> float | None:
        try:
            with open("/proc/self/status") as status:
                line = next(line for line in status if line.startswith(f"{name}:"))
        except (OSError, StopIteration):
            return None
        return int(line.split()[1]) / 1024
