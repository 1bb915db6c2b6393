"""Recipe `eval`: perplexity and zero-shot tasks of a model, an export or a LoRA adapter directory.

    from sdmprune.recipes import evaluate
    result = evaluate.run(evaluate.EvaluateRun.of(model="runs/p20", tasks="sdmprune", limit=200, output="runs/e"))

Steps: check the task names and the output → load → perplexity (shared out over processes) → tasks
through lm-evaluation-harness (rank 0) → results.json/.md (tasks) or a JSON file (perplexity only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RuntimeOptions
from ..distributed import is_main
from ..errors import SdmpruneError
from ..evaluation.tasks import evaluate_tasks, parse_task_names, resolve_tasks, write_results
from ..options import FromOptions, described, validate
from ..recovery import is_adapter_dir, load_adapter
from .options import DataOptions, ModelOptions, PerplexityOptions, TaskOptions
from .steps import load, measure, perplexity_windows


@dataclass
class ResultsOptions:
    """results"""

    output: str | None = field(default=None, metadata=described(
        "perplexity only: results JSON path (default: eval-<data>.json inside a local model directory); with "
        "--tasks: directory for results.json and results.md (default: eval-tasks/ inside a local model directory)"))


@dataclass
class EvaluateRun(FromOptions):
    """Perplexity over non-overlapping windows and zero-shot tasks of a model or LoRA adapter directory."""

    model: ModelOptions = field(default_factory=ModelOptions)
    tasks: TaskOptions = field(default_factory=TaskOptions)
    results: ResultsOptions = field(default_factory=ResultsOptions)
    evaluation: PerplexityOptions = field(default_factory=lambda: PerplexityOptions(max_tokens=0))
    data: DataOptions = field(default_factory=DataOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)


def run(config: EvaluateRun) -> dict:
    """Evaluate and write the results; returns them."""
    validate(config)
    names = parse_task_names(config.tasks.tasks) if config.tasks.tasks else None
    evaluation = config.evaluation
    if evaluation.ppl_data == "auto" and names:
        evaluation.ppl_data = "none"  # tasks asked for alone
    spec, output = config.model.model, config.results.output
    if output is None and Path(spec).is_dir():
        data_name = "wikitext2" if evaluation.ppl_data == "auto" else evaluation.ppl_data
        output = str(Path(spec) / ("eval-tasks" if names else f"eval-{Path(data_name).stem}.json"))
    if names and output is None:
        raise SdmpruneError("--tasks writes results.json and results.md: pass --output DIR")
    selection = resolve_tasks(names, config.data.data_dir) if names else None  # fail before loading the model
    if is_adapter_dir(spec):
        model, tokenizer = load_adapter(spec, dtype=config.model.dtype, device=config.model.device,
                                        trust_remote_code=config.model.trust_remote_code)
    else:
        model, tokenizer = load(config.model)
    windows = perplexity_windows(evaluation, config.data, model, tokenizer)
    if windows is None and not names:
        raise SdmpruneError("nothing to evaluate: pass --ppl-data or --tasks")
    result = {"model": spec}
    bf16 = config.runtime.bf16
    if windows is not None:  # several processes: each evaluates a share of the windows
        result["perplexity"] = ppl = measure(model, tokenizer, windows, evaluation, bf16)
    if not is_main():  # rank 0 alone runs the zero-shot tasks and writes the results
        return result
    if windows is not None:
        print(f"perplexity {ppl['ppl']:.3f} on {ppl['data']} ({ppl['tokens']} tokens, windows of "
              f"{ppl['seq_len']}, {ppl['tokens_per_s']:.0f} tokens/s)")
    if names:
        result |= evaluate_tasks(model, tokenizer, selection, limit=config.tasks.limit,
                                 batch_size=evaluation.eval_batch_size, bf16=bf16, seed=config.runtime.seed)
        for name, r in result["tasks"].items():
            print(f"{name:15s} {r['metric']:15s} {100 * r['value']:6.2f}  (n={r['n']})")
        if result["average"] is not None:
            print(f"{'average (10)':31s} {100 * result['average']:6.2f}")
        write_results(result, output, title=f"Zero-shot results: {spec}")
        print(f"wrote {output}/results.json and results.md ({result['seconds']:.0f} s)")
    elif output is not None:
        Path(output).write_text(json.dumps(result, indent=1))
        print(f"wrote {output}")
    return result
