"""Pruning in one process vs two (torchrun, Gloo on the CPU): wall time and communication per scoring step.

    .venv/bin/python bench/distributed.py      # about 1 min 30 s; bench/results/distributed.{json,md}

A small random Llama (4 layers, hidden 256, MLP width 1024, vocabulary 2048; 6.3M parameters) is pruned to
half its MLP width on 16 random windows of 128 tokens, one window per micro-batch, by each criterion below:
in one process, in two, and in two with FSDP, one thread each. `seconds` is the median over 3 repeats of the
`prune()` call alone (model built, processes started). Every collective is counted by wrapping
torch.distributed and its functional collectives: `bytes` is the size of the whole reduced / gathered /
broadcast tensor per call (a ring moves about 2(P-1)/P of that per process for an all-reduce, (P-1)/P for an
all-gather or a reduce-scatter).
"""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from perf_common import RESULTS, machine  # noqa: E402

from sdmprune import prune  # noqa: E402
from sdmprune.distributed import init_from_env, is_main, shard_model, shutdown, world_size  # noqa: E402

MODEL = dict(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
WINDOWS, SEQ = 16, 128
CASES = {
    "taylor": dict(criterion="taylor"),
    "sdmprune (activation-wanda)": dict(criterion="sdmprune"),
    "sdmprune (weight)": dict(criterion="sdmprune", importance="weight"),
    "wanda-sp": dict(criterion="wanda-sp"),
}
RUNS = (("1 process", 1), ("2 processes", 2))  # (label, processes), one thread each
REPEATS = 3  # `seconds` is the median
FSDP_CASES = ("taylor", "sdmprune (activation-wanda)", "wanda-sp")  # FSDP refuses --importance weight

traffic: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # op -> [calls, bytes]


def _count(module, name: str, argument: str, gathers: bool = False) -> None:
    """Wrap `module.name`: each call adds the bytes of its `argument` (times the world size if `gathers`, the
    argument being one process's part) to `traffic[name]`."""
    original = getattr(module, name)
    signature = inspect.signature(original)

    def counted(*args, **kwargs):
        tensor = signature.bind(*args, **kwargs).arguments[argument]
        entry = traffic[name if module is dist else f"functional {name}"]
        entry[0] += 1
        entry[1] += tensor.numel() * tensor.element_size() * (world_size() if gathers else 1)
        return original(*args, **kwargs)

    setattr(module, name, counted)


def count_collectives() -> None:
    for name in ("all_reduce", "broadcast"):  # sdmprune's own reductions and broadcasts
        _count(dist, name, "tensor")
    _count(dist, "all_gather", "tensor", gathers=True)
    for name in ("all_gather_single", "all_gather_into_tensor"):  # FSDP's parameter all-gathers
        _count(dist, name, "output_tensor")
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):  # FSDP's gradient reduce-scatters
        _count(dist, name, "input")
    _count(funcol, "all_reduce", "self")  # DTensor.full_tensor() of a partial sum,
    _count(funcol, "all_gather_single", "self", gathers=True)  # of a shard
    _count(funcol, "reduce_scatter_single", "self")


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **MODEL), dtype=torch.float32).eval()


def worker(output: Path) -> None:
    """Every case in this process (and its peers, under torchrun); rank 0 writes `output` (JSON)."""
    init_from_env()
    count_collectives()
    calibration = torch.randint(0, MODEL["vocab_size"], (WINDOWS, SEQ), generator=torch.Generator().manual_seed(0))
    runs = {}
    for fsdp in (False, True) if world_size() > 1 else (False,):
        for name, settings in CASES.items():
            if fsdp and name not in FSDP_CASES:
                continue
            seconds = []
            for _ in range(REPEATS):  # collectives are counted over the last repeat
                pruned = shard_model(model()) if fsdp else model()
                if world_size() > 1:
                    dist.barrier()
                traffic.clear()
                start = time.perf_counter()
                result = prune(pruned, mlp_ratio=0.5, calibration=calibration, **settings)
                seconds.append(time.perf_counter() - start)
            runs[f"{name}{' fsdp' if fsdp else ''}"] = {
                "seconds": round(sorted(seconds)[REPEATS // 2], 2), "seconds_all": [round(t, 2) for t in seconds],
                "scoring_steps": len(result.report["steps"]),
                "collectives": {op: {"calls": calls, "bytes": size} for op, (calls, size) in sorted(traffic.items())},
            }
    if is_main():
        output.write_text(json.dumps({"processes": world_size(), "threads": torch.get_num_threads(), "runs": runs},
                                     indent=1))
    shutdown()


def launch(processes: int, output: Path) -> float:
    """Run `worker` in `processes` processes (torchrun for more than one), one thread each; returns the wall
    seconds."""
    script = [str(Path(__file__).resolve()), "--worker", str(output)]
    if processes > 1:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--master-addr", "127.0.0.1", "--master-port", str(port), *script]
    else:
        command = [sys.executable, *script]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def layer_params() -> int:
    """Parameters of one decoder layer: attention, MLP, two norms."""
    hidden, width = MODEL["hidden_size"], MODEL["intermediate_size"]
    kv = hidden * MODEL["num_key_value_heads"] // MODEL["num_attention_heads"]
    return 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * width + 2 * hidden


def root_params() -> int:
    """Parameters outside the decoder layers: embeddings, final norm, head."""
    return 2 * MODEL["vocab_size"] * MODEL["hidden_size"] + MODEL["hidden_size"]


def formulas() -> dict[str, str]:
    """Bytes per scoring step that sdmprune itself all-reduces or broadcasts (no FSDP), for L layers of MLP
    width I and hidden size H (fp32 gradients and scores), and what FSDP adds per micro-batch."""
    layers, width, hidden = MODEL["num_hidden_layers"], MODEL["intermediate_size"], MODEL["hidden_size"]
    return {
        "taylor": f"4·3·L·I·H (MLP weight gradients) = {4 * 3 * layers * width * hidden:,}",
        "sdmprune (weight)": f"4·L·I (scores) = {4 * layers * width:,}",
        "sdmprune (activation-wanda), activation, fisher": f"4·3·L·I (three sums) = {4 * 3 * layers * width:,}",
        "wanda-sp, flap (and bias compensation)": f"8·(1 + 3·L·I) (float64 count, n·mean, Σx², then M2) = "
                                                  f"{8 * (1 + 3 * layers * width):,}",
        "every step": f"L·I (uint8 masks, broadcast) = {layers * width:,}",
        "once per run": f"8·N·S (calibration token ids, broadcast) = {8 * WINDOWS * SEQ:,}",
        "FSDP, per micro-batch pass of each process (ceil(N / micro-batch / P) passes)":
            f"all-gather of the decoder layers' parameters for the forward and again for the backward, plus the "
            f"root's (embeddings, norm, head) once: 4·(2·Θ_layers + Θ_root) = "
            f"{4 * (2 * layer_params() * layers + root_params()):,} (one more forward with the masks-off teacher; "
            f"forward-only statistics passes 4·(Θ_layers + Θ_root)); taylor adds a reduce-scatter of the MLP "
            f"weight gradients, 4·3·L·I·H",
    }


def write_markdown(record: dict, path: Path) -> None:
    one, two = (record[label]["runs"] for label, _ in RUNS)
    lines = [
        "# Pruning on one process vs two (torchrun, Gloo, this CPU)", "",
        f"Machine: {record['machine']['cpu']}, {record['machine']['logical_cores']} logical cores, shared with "
        "other jobs; OMP_NUM_THREADS=1 per process. Model: random Llama, "
        f"{MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, MLP width "
        f"{MODEL['intermediate_size']}; {WINDOWS} windows × {SEQ} tokens; `--mlp-ratio 0.5`.", "",
        "| criterion | scoring steps | 1 process (s) | 2 processes (s) | 2 processes, FSDP (s) | "
        "bytes per step, 2 processes | bytes per step, FSDP |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in CASES:
        steps = one[name]["scoring_steps"]
        fsdp = two.get(f"{name} fsdp")
        per_step = sum(c["bytes"] for c in two[name]["collectives"].values()) / steps
        fsdp_step = f"{sum(c['bytes'] for c in fsdp['collectives'].values()) / steps:,.0f}" if fsdp else "refused"
        times = [one[name]["seconds"], two[name]["seconds"], fsdp["seconds"] if fsdp else "refused"]
        lines.append(f"| {name} | {steps} | {' | '.join(map(str, times))} | {per_step:,.0f} | {fsdp_step} |")
    walls = ", ".join(f"{label} {record[label]['wall_seconds']:.1f} s" for label, _ in RUNS)
    lines += ["", f"Whole commands (process start-up, imports, model construction, every case): {walls}. "
              f"`seconds`: median of {REPEATS} runs on a machine shared with other jobs.",
              "", "Bytes per scoring step that sdmprune all-reduces or broadcasts itself (no FSDP):", ""]
    lines += [f"- {name}: {text}" for name, text in record["formulas"].items()]
    lines += ["", "Per collective (2 processes), calls and bytes over the whole run:", ""]
    for name, run in two.items():
        ops = ", ".join(f"{op} {c['calls']}× {c['bytes']:,} B" for op, c in run["collectives"].items())
        lines.append(f"- {name}: {ops}")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(Path(sys.argv[2]))
        return
    RESULTS.mkdir(exist_ok=True)
    record = {"machine": machine(), "model": MODEL, "windows": WINDOWS, "seq_len": SEQ, "formulas": formulas()}
    for label, processes in RUNS:
        part = RESULTS / f".distributed-{processes}.json"
        wall = launch(processes, part)
        record[label] = {**json.loads(part.read_text()), "wall_seconds": round(wall, 1)}
        part.unlink()
    (RESULTS / "distributed.json").write_text(json.dumps(record, indent=1))
    write_markdown(record, RESULTS / "distributed.md")
    print((RESULTS / "distributed.md").read_text())


if __name__ == "__main__":
    main()
