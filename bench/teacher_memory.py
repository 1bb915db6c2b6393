"""Memory of the teachers: one model in memory (masks off, progressive, NutePrune's numerous teachers) vs a
second frozen copy (the official SDMPrune code's), measured as peak resident memory of the pruning call.

    .venv/bin/python bench/teacher_memory.py      # about 1 min; bench/results/teacher_memory.{json,md}

A random Llama (8 layers, hidden 512, MLP width 1536, 8 query / 2 key-value heads, vocabulary 8192; 32.5M
parameters, 124 MiB in fp32) is pruned by 20% of its parameters on 8 random windows of 128 tokens, each case
in a fresh process: `peak extra` is the peak resident memory (Linux VmHWM, reset after the model is built)
minus the resident memory just before `prune()` / `nuteprune()`. NutePrune also reports the exact size of
its state beyond the weights (gates, LoRA, optimizer moments, λ, snapshots).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from perf_common import PeakMemory, machine, machine_line, run_worker, write_results  # noqa: E402

from sdmprune import prune  # noqa: E402
from sdmprune.nuteprune import nuteprune  # noqa: E402

MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
WINDOWS, SEQ = 8, 128
SCORING = dict(criterion="sdmprune", importance="weight", ratio=0.2, steps=3, cold_start=0.05)
CASES = {
    "sdmprune, teacher masks-off": dict(SCORING, teacher="masks-off"),
    "sdmprune, teacher progressive": dict(SCORING, teacher="progressive"),
    "sdmprune, teacher copy": dict(SCORING, teacher="copy"),
    "nuteprune (30 steps)": dict(method="nuteprune", ratio=0.2, train_steps=30),
}


def worker(case: str) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **MODEL), dtype=torch.float32).eval()
    calibration = torch.randint(0, MODEL["vocab_size"], (WINDOWS, SEQ), generator=torch.Generator().manual_seed(1))
    settings = dict(CASES[case])
    memory = PeakMemory()
    before = memory.current_mib()
    memory.reset()
    start = time.perf_counter()
    if settings.pop("method", None) == "nuteprune":
        result = nuteprune(model, calibration=calibration, progress=False, **settings)
        state = result.report["memory_bytes"]
    else:
        result, state = prune(model, calibration=calibration, **settings), None
    seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"case": case, "weights_mib": weights, "rss_before_mib": before, "peak_mib": memory.peak_mib(),
            "extra_mib": memory.peak_mib() - before, "seconds": seconds, "nuteprune_state_bytes": state}


def markdown(results: dict) -> str:
    lines = ["# Teacher memory: one model vs a second copy", "", machine_line(results["machine"]), "",
             f"Random Llama, {results['params']:,} parameters ({results['records'][0]['weights_mib']:.0f} MiB fp32); "
             f"{WINDOWS} windows × {SEQ} tokens; ratio 0.2. `peak extra` = peak RSS during the pruning call minus RSS "
             "before it (activations, gradients, teacher, state).", "",
             "| case | peak extra (MiB) | seconds | state beyond the weights (exact) |", "|---|---|---|---|"]
    for r in results["records"]:
        state = r["nuteprune_state_bytes"]
        exact = "" if state is None else (
            f"{state['state_total'] / 2**20:.2f} MiB: LoRA {state['lora'] / 2**20:.2f}, optimizer "
            f"{state['optimizer'] / 2**20:.2f}, gates {state['gates'] / 2**20:.2f}, snapshots "
            f"{state['snapshots'] / 2**20:.2f}")
        lines.append(f"| {r['case']} | {r['extra_mib']:.0f} | {r['seconds']:.1f} | {exact} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=list(CASES), help="run one case in this process and print its JSON")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(worker(args.case)))
        return
    records = [run_worker(Path(__file__), ["--case", case], env={"OMP_NUM_THREADS": "1"}) for case in CASES]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **MODEL))
    params = sum(p.numel() for p in model.parameters())
    results = {"machine": machine(), "params": params, "records": records}
    write_results("teacher_memory", results, markdown(results))


if __name__ == "__main__":
    main()
