"""llama.cpp on sdmprune's GGUF exports of SmolLM2-135M: agreement with transformers, perplexity, speed.

    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/llamacpp.py

llama.cpp comes from the PyPI package llama-cpp-python (pinned below), built from source for this CPU only,
into its own virtual environment outside the repository (--llamacpp-venv, default
~/.cache/sdmprune/llamacpp-venv) the first time: 12-35 minutes on 2 cores. Its Python runs the measurements in
worker processes (this same file with --worker); this venv's Python prunes, exports and runs transformers.

Models (exports made once under --work-dir; structured Wanda, `wanda-sp`, on 32 C4 windows of 256 tokens):
dense; 20/30/40% uniform with the default width rounding (1) and with --width-multiple 64, 30% with 32; 30% with
`--allocation global` (per-layer widths, written as llama.cpp's `deci`) and its zero-padded twin (`llama`),
both at width multiple 32. Each is written as f16 and q8_0 by `sdmprune.export.export_gguf`.

(a) Agreement and quality: llama.cpp's next-token logits on FIDELITY_TOKENS held-out WikiText-2 tokens (one
sequence, right after the perplexity tokens) against transformers' fp32 logits of the same export (max |Δ|,
top-1 agreement; goal ≥ 98%), and llama.cpp's WikiText-2 perplexity on the first --ppl-tokens tokens
(non-overlapping windows of 512, exp of the mean next-token NLL, as `sdmprune eval`); these records are kept in
<work-dir>/quality.json and reused by a later run. Token ids come from the
transformers tokenizer; whether llama.cpp's own tokenizer gives the same ids is checked on the dense file.
(b) Speed at --threads threads: prefill of PREFILL tokens (one batch, logits of the last token only) and
decode of DECODE tokens one at a time after a 16-token prompt, tokens/s, median of --repeats rounds; each
round visits every file once (fresh process, one warm-up), so a change of machine load hits all alike. Both
processes run with OMP_WAIT_POLICY=passive: on a shared CPU, llama.cpp's spinning OpenMP threads lose 3-4× when
another process holds a core (measured here: dense f16 prefill 25-30 vs 94-98 tokens/s at load 5).
Speed-ups are against dense of the same type; the ideal is the ratio of matmul FLOPs (prefill: layer matrices
× PREFILL tokens + attention + the output matrix once) and of weight bytes (decode: every matrix, the output
one included, read once per token; all in the file's type). The padded twin's ideal is its unpadded model's.

Also: the tiny random models of every architecture and layout the exporter writes (llama, qwen2, qwen3,
per-layer widths and key/value heads as deci, llama3 rotary scaling, an MLP bias) run through llama.cpp
against transformers, f32. Results: results/llamacpp.{json,md,png}; the load average is recorded with every
timing (this CPU is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from copy import deepcopy
from pathlib import Path

import numpy as np

# Before any OpenMP runtime starts (torch's here, llama.cpp's in the workers, which inherit it): threads that wait
# sleep instead of spinning, see the docstring.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
WORKER = "--worker" in sys.argv  # run by the llama.cpp venv's Python, which has numpy and llama_cpp only
if not WORKER:
    import torch
    from gguf import GGUFReader
    from perf_common import RESULTS, attention_flops, footer, linear_weights, machine, pyplot, write_results

LLAMA_CPP_PYTHON = "0.3.36"  # vendors ggml-org/llama.cpp@0c1e57098 (its CHANGELOG)
CMAKE_ARGS = "-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF"
WINDOW = 512  # perplexity window
FIDELITY_TOKENS = 320
PREFILL, DECODE, DECODE_PROMPT = 512, 128, 16
TOP1_GOAL, SPEED_GOAL = 0.98, 0.9
GGUF_TYPES = ("f16", "q8_0")
# name -> (ratio, allocation, width multiple, padded); "dense" is the unpruned model
EXPORTS = {
    "p20": (0.2, "uniform", 1, False),
    "p30": (0.3, "uniform", 1, False),
    "p40": (0.4, "uniform", 1, False),
    "p20-m64": (0.2, "uniform", 64, False),
    "p30-m64": (0.3, "uniform", 64, False),
    "p40-m64": (0.4, "uniform", 64, False),
    "p30-m32": (0.3, "uniform", 32, False),
    "global30-m32": (0.3, "global", 32, False),
    "global30-m32-padded": (0.3, "global", 32, True),
}
IDEAL_OF = {"global30-m32-padded": "global30-m32"}  # padding multiplies zeros: its ideal is the unpadded model's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/llamacpp"))
    parser.add_argument("--llamacpp-venv", type=Path, default=Path.home() / ".cache" / "sdmprune" / "llamacpp-venv")
    parser.add_argument("--models", default=",".join(["dense", *EXPORTS]), help="comma-separated subset")
    parser.add_argument("--types", default=",".join(GGUF_TYPES), help="GGUF types, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="speed rounds")
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--data-dir", default=os.environ.get("SDMPRUNE_DATA_DIR"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # JSON request, run under the llama.cpp venv
    return parser.parse_args(argv)


# ---------------------------------------------------------------- worker (llama.cpp venv: numpy + llama_cpp)

def log_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def worker(request: dict) -> dict:
    """One GGUF file, one task: `quality` (logits of the fidelity ids, perplexity windows, optionally the
    tokenizer check), `logits` (the fidelity logits only) or `speed` (one prefill and one decode after a warm-up)."""
    import llama_cpp

    threads = request["threads"]
    common = {"model_path": request["gguf"], "n_threads": threads, "n_threads_batch": threads, "verbose": False}
    if request["task"] in ("quality", "logits"):
        llm = llama_cpp.Llama(n_ctx=WINDOW, n_batch=WINDOW, n_ubatch=WINDOW, logits_all=True, **common)
        fidelity = np.load(request["fidelity_ids"]).tolist()
        llm.reset()
        llm.eval(fidelity)
        np.save(request["logits_out"], np.asarray(llm.scores[: len(fidelity)], dtype=np.float32))
        if request["task"] == "logits":
            return {}
        nll = []
        for window in np.load(request["ppl_ids"]).tolist():
            llm.reset()
            llm.eval(window)
            logp = log_softmax(np.asarray(llm.scores[: len(window) - 1], dtype=np.float64))
            nll.append(float(-logp[np.arange(len(window) - 1), window[1:]].mean()))
        record = {"ppl": float(np.exp(np.mean(nll))), "window_nll": nll}
        if request.get("text"):
            ids = llm.tokenize(Path(request["text"]).read_text(encoding="utf-8").encode(), add_bos=False)
            expected = np.load(request["text_ids"]).tolist()
            same = [a == b for a, b in zip(ids, expected, strict=False)]
            record["tokenizer"] = {"llama_cpp_tokens": len(ids), "transformers_tokens": len(expected),
                                   "identical": ids == expected,
                                   "first_difference": same.index(False) if False in same else None}
        return record
    ids = np.load(request["speed_ids"]).tolist()
    llm = llama_cpp.Llama(n_ctx=PREFILL + DECODE, n_batch=PREFILL, n_ubatch=PREFILL, logits_all=False, **common)
    llm.reset()
    llm.eval(ids[:64])  # warm-up: page in the weights, allocate the graph
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids[:PREFILL])
    prefill = time.perf_counter() - start
    llm.reset()
    llm.eval(ids[:DECODE_PROMPT])
    start = time.perf_counter()
    for token in ids[DECODE_PROMPT:DECODE_PROMPT + DECODE]:
        llm.eval([token])
    decode = time.perf_counter() - start
    return {"prefill_s": prefill, "decode_s": decode, "load_average": os.getloadavg()[0]}


# ---------------------------------------------------------------- driver (this repository's venv)

def llamacpp_python(venv: Path) -> Path:
    """The llama.cpp venv's Python, building llama-cpp-python (CPU only) into it the first time."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"]
    if python.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"building llama-cpp-python {LLAMA_CPP_PYTHON} into {venv} (compiles llama.cpp: 12-35 min on 2 cores)",
          flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--no-cache-dir", f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
                   check=True, env={**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": "2"})
    return python


def run_llamacpp(python: Path, request: dict) -> dict:
    process = subprocess.run([str(python), __file__, "--worker", json.dumps(request)], capture_output=True, text=True)
    if process.returncode != 0:
        sys.exit(f"llama.cpp worker failed on {request['gguf']}:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def prune_and_export(model_spec: str, directory: Path, ratio: float, allocation: str, width_multiple: int,
                     padded: bool, calibration: tuple[torch.Tensor, dict]) -> None:
    """The one place that calls sdmprune's pruning API: wanda-sp masks, then an export of any layout."""
    from sdmprune import export_pruned, load_model, prune

    model, tokenizer = load_model(model_spec, dtype="float32", device="cpu")
    ids, summary = calibration
    band = {"width_band": None} if allocation == "global" else {}  # the recorded runs: unbounded (512..1536 wide)
    result = prune(model, criterion="wanda-sp", ratio=ratio, allocation=allocation, width_multiple=width_multiple,
                   calibration=ids, calibration_summary=summary, **band)
    export_pruned(model, tokenizer, result.masks, directory, padded=padded, overwrite=True,
                  report={**result.report, "source_model": model_spec})


def make_exports(args: argparse.Namespace, names: list[str]) -> dict[str, Path]:
    """Model directories by name (the dense one is the cached conversion of the packaged GGUF)."""
    from sdmprune import load_model
    from sdmprune.data import load_calibration
    from sdmprune.models.loading import convert_gguf
    from sdmprune.models.packaged import packaged_gguf

    directories = {"dense": convert_gguf(packaged_gguf(args.model))}
    calibration = None
    for name in names:
        if name == "dense":
            continue
        directory = args.work_dir / "exports" / name
        directories[name] = directory
        if (directory / "pruning.json").is_file():
            continue
        if calibration is None:
            _, tokenizer = load_model(args.model, dtype="float32", device="cpu")
            calibration = load_calibration("c4", tokenizer, n_samples=args.calib_samples, seq_len=256, seed=0,
                                           data_dir=args.data_dir)
        print(f"pruning {name}", flush=True)
        prune_and_export(args.model, directory, *EXPORTS[name], calibration)
    return directories


def make_ggufs(args: argparse.Namespace, directories: dict[str, Path], types: list[str]) -> dict[str, Path]:
    """GGUF files by `name/type`; the dense model takes its tokenizer from the packaged GGUF it came from."""
    from sdmprune.export import export_gguf
    from sdmprune.models.packaged import packaged_gguf

    files = {}
    for name, directory in directories.items():
        for dtype in types:
            path = args.work_dir / "gguf" / f"{name}-{dtype}.gguf"
            files[f"{name}/{dtype}"] = path
            if not path.is_file():
                print(f"writing {path.name}", flush=True)
                export_gguf(directory, path, dtype=dtype, verify=True,
                            tokenizer_from=packaged_gguf(args.model) if name == "dense" else None)
    return files


def describe(directory: Path) -> tuple[dict, torch.nn.Module]:
    """Shapes and the ideal-speed counts of one export (widths, stored parameters, prefill matmul FLOPs, matrix
    weights read per decoded token), and the model itself in fp32."""
    from sdmprune import load_model

    model, _ = load_model(str(directory), dtype="float32", device="cpu")
    output = model.get_output_embeddings().weight.numel()
    layers = linear_weights(model) - output  # every nn.Linear inside the decoder layers
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    return {"widths": widths, "params": sum(p.numel() for p in model.parameters()),
            "prefill_flops": 2.0 * layers * PREFILL + attention_flops(model, 1, PREFILL) + 2.0 * output,
            "decode_weights": layers + output}, model


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(input_ids=torch.from_numpy(ids)[None]).logits[0].float().numpy()


def file_weight_agreement(got: np.ndarray, model: torch.nn.Module, dtype: str, data: Path) -> dict:
    """Top-1 agreement and max |Δ| of llama.cpp's logits with transformers' on the file's own rounded weights."""
    expected = reference_logits(with_file_weights(model, dtype), np.load(data / "fidelity.npy"))
    return {"top1_file_weights": float((got.argmax(-1) == expected.argmax(-1)).mean()),
            "max_abs_diff_file_weights": float(np.abs(got - expected).max())}


def with_file_weights(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """A copy of `model` whose matrices are rounded as the GGUF file of `dtype` stores them (f16, or q8_0 where
    rows are whole 32-weight blocks and f16 elsewhere): transformers on exactly llama.cpp's weights."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    copy = deepcopy(model)
    with torch.no_grad():
        for param in copy.parameters():
            if param.dim() != 2:
                continue
            weights = param.numpy()
            if dtype == "q8_0" and weights.shape[1] % 32 == 0:
                rounded = dequantize(quantize(weights, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
            else:
                rounded = weights.astype(np.float16).astype(np.float32)
            param.copy_(torch.from_numpy(rounded))
    return copy


def tiny_architecture_checks(python: Path, work: Path, threads: int) -> list[dict]:
    """Every architecture and layout the exporter writes, on tiny random models: llama.cpp vs transformers (f32)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    import test_gguf as cases  # the test suite's tiny exports

    from sdmprune import export_pruned, load_model, prune
    from sdmprune.export import export_gguf

    root = work / "tiny"
    shutil.rmtree(root, ignore_errors=True)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}
    biased = cases.tiny("llama")
    masks = prune(biased, mlp_ratio=0.4, criterion="magnitude").masks
    masks.bias = [torch.randn(biased.config.hidden_size) * 0.5 for _ in masks.keep]
    models = {
        "llama uniform": cases.uniform_export("llama", root / "1"),
        "qwen2 uniform": cases.uniform_export("qwen2", root / "2"),
        "qwen3 uniform": cases.uniform_export("qwen3", root / "3"),
        "llama per-layer widths (deci)": cases.non_uniform_export("llama", root / "4"),
        "qwen2 per-layer widths (deci, q/k/v biases)": cases.non_uniform_export("qwen2", root / "5"),
        "llama per-layer widths + kv heads (deci)": cases.non_uniform_export("llama", root / "6", heads=True),
        "qwen2 per-layer widths + kv heads (deci)": cases.non_uniform_export("qwen2", root / "7", heads=True),
        "llama llama3 rotary scaling (rope_freqs)": cases.save(cases.tiny("llama", rope_parameters=scaling),
                                                               root / "8"),
        "qwen2 llama3 rotary scaling (deci)": cases.save(cases.tiny("qwen2", rope_parameters=scaling), root / "9"),
        "llama MLP bias (FLAP compensation)": export_pruned(biased, cases.bpe_tokenizer(), masks, root / "10",
                                                            report=cases.report([64, 64])),
    }
    ids = np.arange(3, 100, 3, dtype=np.int64)
    np.save(root / "ids.npy", ids)
    np.save(root / "windows.npy", ids[None, :])
    rows = []
    for name, directory in models.items():
        path = export_gguf(directory, dtype="f32", verify=True)
        model, _ = load_model(str(directory), dtype="float32", device="cpu")
        expected = reference_logits(model, ids)
        run_llamacpp(python, {"task": "quality", "gguf": str(path), "threads": threads, "fidelity_ids": str(
            root / "ids.npy"), "ppl_ids": str(root / "windows.npy"), "logits_out": str(root / "logits.npy")})
        got = np.load(root / "logits.npy")
        rows.append({"case": name, "architecture": GGUFReader(path).fields["general.architecture"].contents(),
                     "max_abs_diff": float(np.abs(got - expected).max()),
                     "top1": float((got.argmax(-1) == expected.argmax(-1)).mean())})
        print(f"tiny {name}: {rows[-1]}", flush=True)
    return rows


def summarise(records: dict, infos: dict, names: list[str], types: list[str]) -> dict:
    """Per type and model: agreement, perplexity, tokens/s, speed-ups over dense and their fraction of ideal."""
    summary = {}
    for dtype in types:
        dense = records[f"dense/{dtype}"]
        summary[dtype] = {}
        for name in names:
            row = records[f"{name}/{dtype}"]
            ideal_info = infos[IDEAL_OF.get(name, name)]
            cells = {}
            for phase, amount, count in (("prefill", PREFILL, "prefill_flops"), ("decode", DECODE, "decode_weights")):
                seconds = statistics.median(run[f"{phase}_s"] for run in row["speed"])
                dense_seconds = statistics.median(run[f"{phase}_s"] for run in dense["speed"])
                speedup = dense_seconds / seconds
                ideal = infos["dense"][count] / ideal_info[count]
                cells[phase] = {"tokens_per_s": amount / seconds, "speedup": speedup, "ideal": ideal,
                                "of_ideal": speedup / ideal}
            summary[dtype][name] = {**cells, "ppl": row["quality"]["ppl"], "top1": row["top1"],
                                    "top1_file_weights": row["top1_file_weights"],
                                    "max_abs_diff": row["max_abs_diff"], "gguf_mib": row["gguf_bytes"] / 2**20,
                                    "f16_matrices": row["f16_matrices"], "widths": infos[name]["widths"],
                                    "load_average": [run["load_average"] for run in row["speed"]]}
    return summary


def width_label(widths: list[int]) -> str:
    return str(widths[0]) if len(set(widths)) == 1 else f"{min(widths)}..{max(widths)} (mean {np.mean(widths):.0f})"


def goals(summary: dict) -> list[str]:
    """One line per type: which cells miss top-1 ≥ TOP1_GOAL, which uniform exports reach < SPEED_GOAL of the
    ideal speed-up, and whether each non-uniform export beats its padded twin."""
    lines = []
    for dtype, rows in summary.items():
        low_top1 = [f"{name} {row['top1']:.1%}" for name, row in rows.items() if row["top1"] < TOP1_GOAL]
        slow = [f"{name} {phase} {row[phase]['of_ideal']:.2f}" for name, row in rows.items()
                if name in EXPORTS and EXPORTS[name][1] == "uniform" for phase in ("prefill", "decode")
                if row[phase]["of_ideal"] < SPEED_GOAL]
        twins = [f"{unpadded} vs padded: prefill {rows[unpadded]['prefill']['tokens_per_s']:.0f} vs "
                 f"{rows[padded]['prefill']['tokens_per_s']:.0f}, decode {rows[unpadded]['decode']['tokens_per_s']:.0f}"
                 f" vs {rows[padded]['decode']['tokens_per_s']:.0f} tok/s"
                 for padded, unpadded in IDEAL_OF.items() if padded in rows and unpadded in rows]
        lines.append(f"- {dtype}: top-1 below {TOP1_GOAL:.0%}: {', '.join(low_top1) or 'none'}; uniform exports below "
                     f"{SPEED_GOAL} of ideal: {', '.join(slow) or 'none'}; {'; '.join(twins) or 'no padded twin'}.")
    return lines


def markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [
        "# llama.cpp on sdmprune's GGUF exports (SmolLM2-135M)",
        "",
        f"llama-cpp-python {settings['llama_cpp_python']} (llama.cpp {settings['llama_cpp']}), CPU build, "
        f"{settings['threads']} threads. Pruning: wanda-sp, {settings['calib_samples']} C4 windows × 256. "
        f"Top-1 / max |Δ|: llama.cpp against transformers (fp32) on the same export, {FIDELITY_TOKENS} held-out "
        f"WikiText-2 tokens (goal ≥ {TOP1_GOAL:.0%}); 'file weights': against transformers with the matrices "
        "rounded as the file stores them (f16 / q8_0), which separates the exporter from quantisation. PPL: "
        f"llama.cpp, WikiText-2 first {settings['ppl_tokens']} "
        f"tokens, windows of {WINDOW}. Prefill {PREFILL} tokens, decode {DECODE} tokens: tokens/s, speed-up over "
        f"dense of the same type / ideal (prefill: matmul FLOPs; decode: weight bytes) and their ratio (goal "
        f"≥ {SPEED_GOAL} for uniform exports); median of {settings['repeats']} rounds. f16 matrices: matrices "
        "written f16 in a q8_0 file because their rows are not whole 32-weight blocks.",
        "",
    ]
    if results.get("tokenizer"):
        check = results["tokenizer"]
        lines += [f"Tokenizer: llama.cpp's tokenisation of the first {check['characters']:,} characters of "
                  f"WikiText-2 test {'equals' if check['identical'] else 'differs from'} transformers' "
                  f"({check['llama_cpp_tokens']} vs {check['transformers_tokens']} tokens"
                  + (f", first difference at token {check['first_difference']}" if check["first_difference"]
                     is not None else "") + ").", ""]
    for dtype, rows in results["summary"].items():
        lines += [f"## {dtype}", "",
                  "| model | MLP width | GGUF MiB | f16 matrices | top-1 | max \\|Δ\\| | top-1, file weights | PPL | "
                  "prefill | decode | load avg |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
        for name, row in rows.items():
            phases = [f"{row[p]['tokens_per_s']:.0f} tok/s, {row[p]['speedup']:.2f}× / {row[p]['ideal']:.2f}× "
                      f"(**{row[p]['of_ideal']:.2f}**)" for p in ("prefill", "decode")]
            lines.append(f"| {name} | {width_label(row['widths'])} | {row['gguf_mib']:.0f} | {row['f16_matrices']} | "
                         f"{row['top1']:.1%} | {row['max_abs_diff']:.3f} | {row['top1_file_weights']:.1%} | "
                         f"{row['ppl']:.2f} | {phases[0]} | "
                         f"{phases[1]} | {', '.join(f'{x:.1f}' for x in row['load_average'])} |")
        lines.append("")
    lines += ["## Goals", "", *goals(results["summary"]), "",
              "## Tiny random models through llama.cpp (f32, 33 tokens)", "",
              "| case | GGUF architecture | max \\|Δ logit\\| | top-1 |", "|---|---|---:|---:|"]
    lines += [f"| {row['case']} | {row['architecture']} | {row['max_abs_diff']:.2e} | {row['top1']:.0%} |"
              for row in results["tiny"]]
    lines += [""] + footer(results)
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    types = list(results["summary"])
    fig, axes = plt.subplots(1, len(types), figsize=(7 * len(types), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], types, strict=True):
        rows = results["summary"][dtype]
        names = list(rows)
        for k, phase in enumerate(("prefill", "decode")):
            ax.bar([i + 0.4 * k for i in range(len(names))], [rows[n][phase]["speedup"] for n in names], 0.4,
                   label=f"{phase} speed-up")
            ax.scatter([i + 0.4 * k for i in range(len(names))], [rows[n][phase]["ideal"] for n in names],
                       marker="_", s=250, color="black", zorder=3, label="ideal" if k == 0 else None)
        ax.axhline(1, color="grey", linewidth=0.8)
        ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=35, ha="right")
        ax.set_ylabel("speed-up over dense (llama.cpp)")
        ax.set_title(f"{dtype}, {results['settings']['threads']} threads")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from sdmprune import load_model
    from sdmprune.data import load_text
    from sdmprune.evaluation.perplexity import tokenize_windows

    torch.set_num_threads(args.threads)
    names, types = args.models.split(","), args.types.split(",")
    python = llamacpp_python(args.llamacpp_venv)
    directories = make_exports(args, names)
    files = make_ggufs(args, directories, types)

    data = args.work_dir / "data"
    data.mkdir(parents=True, exist_ok=True)
    _, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    text = load_text("wikitext2", args.data_dir)
    windows = tokenize_windows(tokenizer, text, WINDOW, args.ppl_tokens + WINDOW).numpy()
    np.save(data / "ppl.npy", windows[:-1])
    np.save(data / "fidelity.npy", windows[-1, :FIDELITY_TOKENS])
    np.save(data / "speed.npy", windows[0])
    sample = text[:20000]
    (data / "text.txt").write_text(sample, encoding="utf-8")
    np.save(data / "text_ids.npy", np.array(tokenizer(sample)["input_ids"]))

    cache_path = args.work_dir / "quality.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    infos, records = {}, {}
    for name in names:
        infos[name], model = describe(directories[name])
        expected = reference_logits(model, np.load(data / "fidelity.npy"))
        for dtype in types:
            key = f"{name}/{dtype}"
            cached = cache.get(key, {})
            if cached.get("ppl_tokens") == args.ppl_tokens and cached.get("gguf_bytes") == files[key].stat().st_size:
                records[key] = {**cached, "speed": []}
                if "top1_file_weights" not in cached:  # a record from before this column
                    run_llamacpp(python, {"task": "logits", "gguf": str(files[key]), "threads": args.threads,
                                          "fidelity_ids": str(data / "fidelity.npy"),
                                          "logits_out": str(data / "logits.npy")})
                    records[key].update(file_weight_agreement(np.load(data / "logits.npy"), model, dtype, data))
                    cache[key] = {k: v for k, v in records[key].items() if k != "speed"}
                    cache_path.write_text(json.dumps(cache, indent=1))
                continue
            request = {"task": "quality", "gguf": str(files[key]), "threads": args.threads,
                       "fidelity_ids": str(data / "fidelity.npy"), "ppl_ids": str(data / "ppl.npy"),
                       "logits_out": str(data / "logits.npy")}
            if name == "dense":
                request.update(text=str(data / "text.txt"), text_ids=str(data / "text_ids.npy"))
            quality = run_llamacpp(python, request)
            got = np.load(data / "logits.npy")
            f16 = sum(1 for t in GGUFReader(files[key]).tensors if len(t.shape) == 2 and t.tensor_type.name == "F16")
            records[key] = {"quality": quality, "max_abs_diff": float(np.abs(got - expected).max()),
                            "top1": float((got.argmax(-1) == expected.argmax(-1)).mean()),
                            "gguf_bytes": files[key].stat().st_size, "f16_matrices": f16 if dtype != "f16" else 0,
                            "ppl_tokens": args.ppl_tokens, "speed": [],
                            **file_weight_agreement(got, model, dtype, data)}
            cache[key] = {k: v for k, v in records[key].items() if k != "speed"}
            cache_path.write_text(json.dumps(cache, indent=1))
            print(f"{key}: top-1 {records[key]['top1']:.1%}, max |Δ| {records[key]['max_abs_diff']:.3f}, "
                  f"PPL {quality['ppl']:.2f}", flush=True)
    for round_index in range(args.repeats):
        for key, path in files.items():
            run = run_llamacpp(python, {"task": "speed", "gguf": str(path), "threads": args.threads,
                                        "speed_ids": str(data / "speed.npy")})
            records[key]["speed"].append(run)
            print(f"round {round_index + 1} {key}: prefill {PREFILL / run['prefill_s']:.0f} tok/s, decode "
                  f"{DECODE / run['decode_s']:.0f} tok/s (load {run['load_average']:.1f})", flush=True)
    tiny = tiny_architecture_checks(python, args.work_dir, args.threads)
    dense_tokenizer = records.get(f"dense/{types[0]}", {}).get("quality", {}).get("tokenizer")
    results = {
        "machine": {**machine(), "llama_cpp_threads": args.threads},
        "settings": {"model": args.model, "repeats": args.repeats, "threads": args.threads,
                     "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                     "ppl_tokens": args.ppl_tokens, "calib_samples": args.calib_samples, "exports": EXPORTS,
                     "llama_cpp_python": LLAMA_CPP_PYTHON, "llama_cpp": "ggml-org/llama.cpp@0c1e57098"},
        "command": " ".join(["SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/llamacpp.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "infos": infos,
        "records": records,
        "tokenizer": {**dense_tokenizer, "characters": len(sample)} if dense_tokenizer else None,
        "summary": summarise(records, infos, names, types),
        "tiny": tiny,
    }
    write_results("llamacpp", results, markdown(results))
    plot(results, RESULTS / "llamacpp.png")


if __name__ == "__main__":
    main()
