"""What the performance benchmarks share: the machine record, the matmul ceiling, peak memory, FLOP counts,
isolated worker processes and result files.

Every figure is written next to `machine()`, so a number always says where it was taken.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from sdmprune import runtime

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """CPU model, cores, torch version and threads: recorded beside every result."""
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = found.group(1).strip() if found else cpu
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best achieved FLOP/s of a square (size × size) @ (size × size) matmul in `dtype`."""
    a = torch.randn(size, size, device=device()).to(dtype)
    b = torch.randn(size, size, device=device()).to(dtype)
    a @ b  # warm-up
    best = math.inf
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        a @ b
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class PeakMemory(runtime.PeakMemory):
    """Peak and current resident memory of this process in MiB (Linux), whatever device the model is on: `reset()`
    sets the high-water mark back to the current RSS, so one process can measure the peak of each phase."""

    def __init__(self):
        super().__init__(torch.device("cpu"))


def linear_weights(model: nn.Module) -> int:
    """Weights of every nn.Linear (the lm_head included, tied or not): the matmul work per token / 2."""
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, nn.Linear))


def attention_flops(model: nn.Module, batch: int, new_tokens: int, past: int = 0) -> float:
    """Causal attention score and value products: 2 matmuls × 2 FLOPs × head_dim × heads per visible pair."""
    query_dims = sum(layer.self_attn.q_proj.out_features for layer in model.model.layers)  # Σ_l heads_l·head_dim
    pairs = new_tokens * past + new_tokens * (new_tokens + 1) / 2  # visible (query, key) pairs per sequence
    return 4.0 * query_dims * pairs * batch


def forward_flops(model: nn.Module, batch: int, new_tokens: int, past: int = 0) -> float:
    """FLOPs of one forward over `batch` sequences of `new_tokens` tokens after `past` cached ones."""
    return 2.0 * linear_weights(model) * batch * new_tokens + attention_flops(model, batch, new_tokens, past)


def run_worker(script: Path, argv: list[str], env: dict | None = None) -> dict:
    """Run `python script argv...` in a fresh process (its own peak memory) and parse the JSON it prints last."""
    process = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                             env={**os.environ, **(env or {})})
    if process.returncode != 0:
        sys.exit(f"worker failed: {script.name} {' '.join(argv)}\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def log_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log y against log x: 1 means linear growth."""
    lx, ly = torch.tensor(x, dtype=torch.float64).log(), torch.tensor(y, dtype=torch.float64).log()
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


def write_results(name: str, results: dict, markdown: str, directory: Path = RESULTS) -> None:
    """<directory>/<name>.json and .md (bench/results by default), each written to a temporary name first."""
    directory.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(results, indent=1)), (".md", markdown)):
        path = directory / f"{name}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(f"wrote {directory / name}.json and .md")


def machine_line(record: dict) -> str:
    return (f"Machine: {record['cpu']}, {record['logical_cores']} logical cores, torch {record['torch']}, "
            f"{record['torch_threads']} threads" + (f", {record['cuda']}" if record.get("cuda") else ""))


def footer(results: dict) -> list[str]:
    """The last markdown lines of every results file: the machine, and the command that made it."""
    return [machine_line(results["machine"]), "", "```bash", results["command"], "```", ""]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
