"""Two processes (torchrun, Gloo on the CPU) give the single-process result: the same scores within fp32
summation-order noise and identical masks for every criterion tested, with and without FSDP; a sharded CLI
run killed mid-schedule resumes to the single-process export; `prune`'s default (--importance auto and the refit)
keeps the same candidate and refits it alike; LoRA recovery on two processes matches one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
from conftest import byte_tokenizer, sigkill_at_loss_script, tiny_model
from safetensors.torch import load_file
from test_finetune import EXAMPLES
from transformers import AutoModelForCausalLM

from sdmprune.checkpoint import STATE_JSON, STATE_TENSORS
from sdmprune.cli import main
from sdmprune.distributed import shard_windows

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


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)


def test_shares_cut_like_one_process_and_fillers_keep_fsdp_in_step():
    windows = torch.arange(10).view(5, 2)
    shares = [shard_windows(windows, 2, process=r, processes=2) for r in range(2)]
    assert [[b.start for b in share] for share in shares] == [[0], [2, 4]]  # micro-batches [0,1] | [2,3], [4]
    assert torch.equal(torch.cat([b.ids for share in shares for b in share]), windows)
    lockstep = [shard_windows(windows, 2, lockstep=True, process=r, processes=2) for r in range(2)]
    assert [[b.counts for b in share] for share in lockstep] == [[True, False], [True, True]]
    assert [b.start for b in shard_windows(windows, 2, process=0, processes=1)] == [0, 2, 4]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One torchrun launch of distributed_worker.py (every pruning and recovery case); its output directory and
    the recovery inputs (a tiny magnitude-pruned Llama, an Alpaca file)."""
    root = tmp_path_factory.mktemp("distributed")
    dense, pruned, data = root / "dense", root / "pruned", root / "alpaca.json"
    tiny_model("llama", max_position_embeddings=256).save_pretrained(dense)
    byte_tokenizer().save_pretrained(dense)
    assert main(["prune", "--model", str(dense), "--ratio", "0.2", "--criterion", "magnitude", "--ppl-data", "none",
                 "--reconstruct", "none", "--output", str(pruned)]) == 0
    data.write_text(json.dumps(EXAMPLES))
    process = torchrun("distributed_worker.py", str(root / "multi"), str(pruned), str(data))
    assert process.returncode == 0, process.stderr[-3000:]
    return root


@pytest.mark.parametrize("case", list(worker.CASES))
def test_two_processes_score_like_one(case, two_processes):
    single, multi = two_processes / "single", two_processes / "multi"
    worker.run_case(case, single, shard=False)
    one, two = load_file(single / case / STATE_TENSORS), load_file(multi / case / STATE_TENSORS)
    assert one.keys() == two.keys()
    for name in one:
        if name.startswith("keep."):
            assert torch.equal(one[name], two[name]), f"masks differ ({name})"
            assert 0 < int(one[name].sum()) < one[name].numel()
        elif name.startswith("scores."):  # pruned neurons are -inf in both
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-9, msg=name)
    if case == "flap":  # the compensation bias, from the merged activation means
        one, two = load_file(single / case / "bias.safetensors"), load_file(multi / case / "bias.safetensors")
        assert one.keys() == two.keys() and len(one) == 2
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7)


def test_two_processes_reconstruct_like_one(two_processes):
    """The per-layer Grams are the single-process ones up to fp64 summation order; so are the refits."""
    single, multi = two_processes / "single", two_processes / "multi"
    worker.reconstruct_case(single)
    for mode in worker.RECONSTRUCT_MODES:
        one, two = (load_file(d / "reconstruct" / f"{mode}.safetensors") for d in (single, multi))
        assert one.keys() == two.keys() and {f"weight.{i}" for i in range(2)} <= one.keys()  # a Gram per solve
        for name in one:
            tolerance = dict(rtol=1e-12, atol=0.0) if name.startswith("gram.") else dict(rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(two[name], one[name], **tolerance, msg=f"{mode}: {name}")


def test_fsdp_refuses_what_it_cannot_do_exactly(two_processes):
    refusals = json.loads((two_processes / "multi" / "refusals.json").read_text())
    assert "drop --fsdp" in refusals["weight"] and "activation-wanda" in refusals["weight"]
    assert "--teacher masks-off" in refusals["copy"]


@pytest.mark.parametrize("case", list(worker.RECOVERY_CASES))
def test_two_process_lora_recovery_matches_one_and_its_merged_export_reloads(case, two_processes):
    single, multi = two_processes / "single", two_processes / "multi"
    record = worker.recover(case, single, str(two_processes / "pruned"), str(two_processes / "alpaca.json"),
                            shard=False)
    assert record["steps"] == 4
    one, two = (json.loads((d / case / "loss.json").read_text()) for d in (single, multi))
    assert [e["tokens"] for e in two] == [e["tokens"] for e in one]
    assert [e["loss"] for e in two] == pytest.approx([e["loss"] for e in one], rel=1e-6)
    adapter_one, adapter_two = (load_file(d / case / "adapter_model.safetensors") for d in (single, multi))
    assert adapter_one.keys() == adapter_two.keys()
    for name in adapter_one:
        torch.testing.assert_close(adapter_two[name], adapter_one[name], rtol=1e-4, atol=1e-6)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [AutoModelForCausalLM.from_pretrained(d / case / "merged")(input_ids=ids).logits
                  for d in (single, multi)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)


def test_interrupted_sharded_recovery_resumes_to_the_uninterrupted_result(two_processes):
    straight, resumed = two_processes / "multi" / "straight", two_processes / "multi" / "resumed"
    assert [e["loss"] for e in json.loads((resumed / "loss.json").read_text())] == \
        [e["loss"] for e in json.loads((straight / "loss.json").read_text())]
    one, two = (load_file(d / "adapter_model.safetensors") for d in (straight, resumed))
    assert one.keys() == two.keys()
    for name in one:  # exact: the same optimizer state, re-sharded, and each process's own random stream
        assert torch.equal(one[name], two[name]), name


# Rank 1 dies at the first loss of the last step: the cold start and the first distillation step (3 passes each
# per process: 5 windows over 2 processes, in lockstep under FSDP) are saved, the second is not.
KILL_SCRIPT = sigkill_at_loss_script('calls == 7 and os.environ["RANK"] == "1"')


def prune_args(model: Path, calib: Path, output: Path) -> list[str]:
    return ["prune", "--model", str(model), "--criterion", "sdmprune", "--importance", "activation-wanda",
            "--mlp-ratio", "0.5", "--steps", "2", "--cold-start", "0.1", "--calib", str(calib), "--calib-samples", "5",
            "--calib-seq-len", "32", "--ppl-data", str(calib), "--seq-len", "32", "--reconstruct", "none",
            "--output", str(output)]


def test_fsdp_cli_run_killed_and_resumed_exports_the_single_process_model(saved_model, text_file, tmp_path):
    reference, sharded = tmp_path / "single", tmp_path / "fsdp"
    assert main(prune_args(saved_model, text_file, reference)) == 0
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)

    process = torchrun(str(script), *prune_args(saved_model, text_file, sharded), "--fsdp")
    assert process.returncode != 0
    state = json.loads((sharded / STATE_JSON).read_text())
    assert state["progress"]["steps_done"] == 2 and not (sharded / "pruning.json").exists()

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


def test_prune_default_auto_in_two_processes_keeps_and_refits_what_one_process_does(saved_model, text_file,
                                                                                   tmp_path):
    args = ["prune", "--model", str(saved_model), "--mlp-ratio", "0.5", "--cold-start", "0.1", "--calib",
            str(text_file), "--calib-samples", "5", "--calib-seq-len", "32", "--ppl-data", "none"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main([*args, "--output", str(single)]) == 0
    process = torchrun("-m", "sdmprune.cli", *args, "--output", str(multi))
    assert process.returncode == 0, process.stderr[-3000:]
    one, two = (json.loads((d / "pruning.json").read_text()) for d in (single, multi))
    assert one["selection"]["chosen"] == two["selection"]["chosen"] and len(one["selection"]["candidates"]) == 2
    for label, record in one["selection"]["candidates"].items():
        assert two["selection"]["candidates"][label]["selection_nll"] == pytest.approx(record["selection_nll"],
                                                                                       rel=1e-4)
    assert two["kept_indices"] == one["kept_indices"] and "reconstruction" in two
    weights_one, weights_two = (load_file(d / "model.safetensors") for d in (single, multi))
    for name in weights_one:  # the refit solves on Gram matrices summed over the processes
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=1e-6, msg=name)
