"""BoolQ check: is a model's below-chance BoolQ score the model's or the evaluation's?

Scores the first --limit BoolQ items outside lm-evaluation-harness's model code: the items, prompts and
answers come from the shipped task definition (`{passage}\\nQuestion: {question}?\\nAnswer:`, answers " no"
/ " yes"), then one fp32 forward pass per item over BOS + the prompt gives the log-probabilities of the two
one-token answers. Reports the accuracy (to compare with `sdmprune eval`), how often the
model says yes against how often the answer is yes, and the ROC AUC of the margin log P(yes) - log P(no)
against the label: an AUC near 0.5 means the margin carries no information about the answer, so no
threshold or calibration would lift the accuracy above the majority class.

    SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/boolq_check.py   # ~2 min on 2 CPU cores

Writes bench/results/boolq_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from lm_eval.tasks import get_task_dict

from sdmprune.evaluation.tasks import resolve_tasks, with_bos
from sdmprune.models.loading import load_model

RESULTS = Path(__file__).parent / "results"


def answer_margins(model, tokenizer, prompts: list[str], answers: tuple[str, str]) -> torch.Tensor:
    """(n,) log P(answers[1]) - log P(answers[0]) at the position after each prompt, fp32."""
    first, second = (tokenizer(answer, add_special_tokens=False).input_ids for answer in answers)
    if len(first) != 1 or len(second) != 1:
        sys.exit(f"this check needs {answers[0]!r} and {answers[1]!r} to be single tokens")
    tokenizer = with_bos(tokenizer)
    margins = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt).input_ids], device=model.device)
            log_probs = model(ids).logits[0, -1].float().log_softmax(-1)
            margins.append(log_probs[second[0]] - log_probs[first[0]])
    return torch.stack(margins).cpu()


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    greater = (positive[:, None] > negative[None, :]).double()
    ties = (positive[:, None] == negative[None, :]).double()
    return (greater + 0.5 * ties).mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model spec, as for `sdmprune eval`")
    parser.add_argument("--limit", type=int, default=200, help="first N validation items")
    parser.add_argument("--results", type=Path, default=RESULTS / "boolq_check.json")
    args = parser.parse_args(argv)
    data_dir = os.environ.get("SDMPRUNE_DATA_DIR")
    if not data_dir:
        sys.exit("set SDMPRUNE_DATA_DIR to the shared data directory (e.g. ../shared/data)")
    task = get_task_dict(["boolq"], resolve_tasks(["boolq"], data_dir).manager)["boolq"]
    items = list(task.validation_docs())[: args.limit]
    answers = tuple(task.config.target_delimiter + choice for choice in task.doc_to_choice(items[0]))  # no, yes

    model, tokenizer = load_model(args.model, dtype="float32")
    start = time.perf_counter()
    margins = answer_margins(model, tokenizer, [task.doc_to_text(item) for item in items], answers)
    labels = torch.tensor([task.doc_to_target(item) for item in items])
    says_yes = margins > 0
    result = {
        "model": args.model,
        "items": len(items),
        "accuracy": (says_yes.long() == labels).double().mean().item(),
        "says_yes": says_yes.double().mean().item(),
        "answer_is_yes": labels.double().mean().item(),
        "margin_auc": roc_auc(margins, labels),
        "mean_margin_when_yes": margins[labels == 1].mean().item(),
        "mean_margin_when_no": margins[labels == 0].mean().item(),
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1))
    args.results.with_suffix(".md").write_text("\n".join([
        f"# BoolQ check: {args.model}, first {len(items)} validation items, fp32, outside the harness",
        "",
        "| accuracy | says yes | answer is yes | AUC of log P(yes) - log P(no) | mean margin, yes items | no items |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {100 * result['accuracy']:.1f}% | {100 * result['says_yes']:.1f}% | {100 * result['answer_is_yes']:.1f}% "
        f"| {result['margin_auc']:.3f} | {result['mean_margin_when_yes']:.3f} | {result['mean_margin_when_no']:.3f} |",
        "",
        f"Command: `SDMPRUNE_DATA_DIR=../shared/data .venv/bin/python bench/boolq_check.py --model {args.model} "
        f"--limit {args.limit}` ({result['seconds']} s, {result['threads']} torch threads, torch {torch.__version__}).",
        "",
    ]))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
