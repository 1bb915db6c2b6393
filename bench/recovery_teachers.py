"""Time and memory of distillation recovery with each teacher: live (the dense model in the student's own weights,
adapters and masks off: `compress`'s default), cached top-k log-probabilities (`compress --recover-teacher cached`),
a second frozen copy (`finetune --kd`), and no teacher (cross-entropy only).

    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/recovery_teachers.py [--model qwen2.5-coder-0.5b]

Each case runs in a fresh process (its own peak memory) with one thread: the model loaded in fp32, pruned by 20% of
its parameters (structured Wanda, masks only, on 8 C4 windows), LoRA attached as `compress` does (r 8 on q, k, v, o,
gate, up), then the recovery stage alone on C4 windows of 256 tokens (batch 4 × 2, bf16 autocast, `compress`'s
settings; `--windows` windows: one epoch). `peak extra` is the peak resident memory of the stage (Linux VmHWM reset
just before it) minus the resident memory before it: the teacher (a second copy is loaded inside the stage),
activations, logits, LoRA and optimizer state. The cached teacher's cache pass (the dense model over the recovery
tokens, before pruning) is timed apart, with its size on disk. Results: bench/results/recovery_teachers[-MODEL].
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from perf_common import PeakMemory, machine, machine_line, run_worker, write_results  # noqa: E402

from sdmprune import load_model, prune  # noqa: E402
from sdmprune.checkpoint import Checkpoint  # noqa: E402
from sdmprune.config import RuntimeOptions  # noqa: E402
from sdmprune.data import load_calibration  # noqa: E402
from sdmprune.lora import attach_lora  # noqa: E402
from sdmprune.recipes.compress import CompressRun, live_teacher  # noqa: E402
from sdmprune.recovery.cached_teacher import CachedTeacher, cache_teacher  # noqa: E402
from sdmprune.recovery.data import text_windows  # noqa: E402
from sdmprune.recovery.finetune import model_teacher, train  # noqa: E402

CASES = ("live", "cached", "copy", "none")
DESCRIPTIONS = {"live": "live: same weights, adapters and masks off", "cached": "cached top-64 log-probabilities",
                "copy": "second frozen copy (finetune --kd)", "none": "no teacher (cross-entropy)"}
TOP_K, SEQ_LEN = 64, 256


def worker(case: str, model_name: str, windows: int) -> dict:
    torch.manual_seed(0)
    model, tokenizer = load_model(model_name, dtype="float32")
    calibration, _ = load_calibration("c4", tokenizer, n_samples=8, seq_len=SEQ_LEN, seed=0, model=model)
    recovery, _ = load_calibration("c4", tokenizer, n_samples=windows, seq_len=SEQ_LEN, seed=1, model=model)
    data = text_windows(recovery)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = CompressRun.of(output="unused").recovery  # compress's recovery settings
    record = {"case": case, "teacher": DESCRIPTIONS[case], "tokens": recovery.numel()}
    with tempfile.TemporaryDirectory() as tmp:
        if case == "cached":
            start = time.perf_counter()
            record["cache"] = cache_teacher(model, data, Path(tmp) / "teacher.safetensors", top_k=TOP_K,
                                            temperature=options.kd_temperature, bf16=True,
                                            batch_size=options.batch_size, pad_id=pad_id)
            record["cache"]["seconds"] = time.perf_counter() - start
        masks = prune(model, calibration=calibration, criterion="wanda-sp", ratio=0.2).masks
        peft_model, _ = attach_lora(model, options.lora)
        peft_model.train()
        memory = PeakMemory()
        before = memory.current_mib()
        memory.reset()
        start = time.perf_counter()
        if case == "copy":
            teacher = model_teacher(load_model(model_name, dtype="float32")[0].eval(), bf16=True)
        elif case == "cached":
            teacher = CachedTeacher(Path(tmp) / "teacher.safetensors", next(model.parameters()).device)
        else:
            teacher = live_teacher(peft_model, masks, bf16=True) if case == "live" else None
        trained = train(peft_model, teacher, data, pad_id, options, RuntimeOptions(bf16=True), Checkpoint(Path(tmp)),
                        {}, resume=False, progress=False)
        record.update(seconds=time.perf_counter() - start, rss_before_mib=before, peak_mib=memory.peak_mib(),
                      extra_mib=memory.peak_mib() - before, steps=trained["steps"],
                      first_loss=trained["log"][0]["loss"], final_loss=trained["log"][-1]["loss"])
    record["weights_mib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    record["threads"] = torch.get_num_threads()
    return record


def markdown(results: dict) -> str:
    lines = [f"# Recovery teachers: time and memory ({results['model']})", "", machine_line(results["machine"]), "",
             f"{results['model']} in fp32 ({results['records'][0]['weights_mib']:.0f} MiB of weights), 20% pruned "
             f"(structured Wanda, masks); recovery on {results['records'][0]['tokens']:,} C4 tokens (windows of "
             f"{SEQ_LEN}, batch 4 × 2, bf16 autocast, LoRA r 8 on q, k, v, o, gate, up), one thread. Peak extra: "
             "peak RSS of the recovery stage minus RSS before it (a second copy is loaded inside it). Seconds are "
             "noisy when the machine is shared (another benchmark used both cores during the committed run).", "",
             "| teacher | seconds | s / 1k tokens | peak extra (MiB) | loss first → last | teacher cost before |",
             "|---|---|---|---|---|---|"]
    for r in results["records"]:
        cache = r.get("cache")
        before = (f"cache pass {cache['seconds']:.0f} s, {cache['bytes'] / 2**20:.1f} MiB on disk "
                  f"({cache['bytes_per_token']} B/token)") if cache else ""
        lines.append(f"| {r['teacher']} | {r['seconds']:.0f} | {1000 * r['seconds'] / r['tokens']:.2f} | "
                     f"{r['extra_mib']:.0f} | {r['first_loss']:.3f} → {r['final_loss']:.3f} | {before} |")
    lines += ["", "Losses: KL to the teacher (cached: the top-64 KL with the tail lumped), cross-entropy for no "
              "teacher; not comparable across those kinds.", "",
              f"Command: `SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/recovery_teachers.py --model "
              f"{results['model']} --windows {results['windows']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=16, help="recovery windows of 256 tokens (one epoch)")
    parser.add_argument("--case", choices=CASES, help="run one case in this process and print its JSON")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(worker(args.case, args.model, args.windows)))
        return
    records = []
    for case in CASES:
        records.append(run_worker(Path(__file__), ["--case", case, "--model", args.model, "--windows",
                                                   str(args.windows)], env={"OMP_NUM_THREADS": "1"}))
        print(f"{case}: {records[-1]['seconds']:.0f} s, peak extra {records[-1]['extra_mib']:.0f} MiB", flush=True)
    results = {"machine": {**machine(), "torch_threads": records[0]["threads"]}, "model": args.model,
               "windows": args.windows, "records": records}
    suffix = "" if args.model == "smollm2-135m" else f"-{args.model}"
    write_results(f"recovery_teachers{suffix}", results, markdown(results))


if __name__ == "__main__":
    main()
