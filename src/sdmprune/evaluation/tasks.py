"""Zero-shot tasks through lm-evaluation-harness: task registry, metric choice, averaging, the lm-eval bridge.

Online, task names go to the harness's own definitions (hub datasets). With a local data directory
(`--data-dir` / `$SDMPRUNE_DATA_DIR`, laid out as `../shared/data`), the project's definitions in
`tasks/*.yaml` are used instead: the harness's prompts and metrics, reading the shared JSONL files through
`load_local_dataset`. The functions below named in those files (`!function sdmprune.evaluation.tasks.…`)
adapt the harness's helpers to the shared files' field names.

Metric per task as in METHOD.md: acc_norm where the harness reports it (ARC, PIQA, OpenBookQA, HellaSwag),
pct_stereotype for CrowS-Pairs, else acc. The average is the unweighted mean of the 10 SDMPrune tasks.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.text import data_dir as local_data_dir
from ..errors import SdmpruneError
from ..io import atomic_file
from ..runtime import context_length

TASKS_DIR = Path(__file__).with_name("tasks")


@dataclass(frozen=True)
class TaskSpec:
    harness: str  # the harness's task name (used online)
    metric: str  # the metric reported for this task


TASKS = {
    "arc_easy": TaskSpec("arc_easy", "acc_norm"),
    "arc_challenge": TaskSpec("arc_challenge", "acc_norm"),
    "boolq": TaskSpec("boolq", "acc"),
    "crows_pairs": TaskSpec("crows_pairs_english", "pct_stereotype"),
    "openbookqa": TaskSpec("openbookqa", "acc_norm"),
    "piqa": TaskSpec("piqa", "acc_norm"),
    "race": TaskSpec("race", "acc"),
    "siqa": TaskSpec("social_iqa", "acc"),
    "truthfulqa_mc2": TaskSpec("truthfulqa_mc2", "acc"),
    "winogrande": TaskSpec("winogrande", "acc"),
    "hellaswag": TaskSpec("hellaswag", "acc_norm"),
    "lambada": TaskSpec("lambada_openai", "acc"),
}
# The SDMPrune table's 10 tasks, whose unweighted mean is its "Average" column.
SDMPRUNE_TASKS = ("arc_easy", "arc_challenge", "boolq", "crows_pairs", "openbookqa", "piqa", "race", "siqa",
                  "truthfulqa_mc2", "winogrande")
ALL_TASKS = tuple(TASKS)


def parse_task_names(spec: str) -> list[str]:
    """`a,b,c` -> names; `sdmprune` stands for the 10 SDMPrune tasks, `all` for every shipped one."""
    names: list[str] = []
    for name in (part.strip() for part in spec.split(",")):
        expanded = {"sdmprune": SDMPRUNE_TASKS, "all": ALL_TASKS}.get(name, (name,) if name else ())
        names += [n for n in expanded if n not in names]
    if not names:
        raise SdmpruneError(f"--tasks '{spec}' names no task: give e.g. arc_easy,boolq or 'sdmprune'")
    return names


def select_metric(name: str, reported: Sequence[str]) -> str:
    """The metric reported for task `name`: METHOD.md's choice, else acc_norm when reported, else acc."""
    if name in TASKS:
        return TASKS[name].metric
    return "acc_norm" if "acc_norm" in reported else "acc"


def sdmprune_average(values: dict[str, float]) -> float | None:
    """Unweighted mean of the 10 SDMPrune tasks' values (as the paper: pct_stereotype counted as is);
    None unless all 10 are present."""
    if any(name not in values for name in SDMPRUNE_TASKS):
        return None
    return sum(values[name] for name in SDMPRUNE_TASKS) / len(SDMPRUNE_TASKS)


# ----------------------------------------------------------------------------- used by tasks/*.yaml


def load_local_dataset(data_files: dict[str, str], data_dir: str | None = None, **_):
    """`custom_dataset` of the shipped tasks: `data_files` (split -> path relative to the data directory)
    loaded with the `json` builder. The directory comes from the task metadata, else $SDMPRUNE_DATA_DIR."""
    import datasets

    directory = local_data_dir(data_dir)
    if directory is None:
        raise SdmpruneError("the shipped task definitions read local files: pass --data-dir or set "
                            "SDMPRUNE_DATA_DIR (e.g. ../shared/data)")
    files = {split: directory / path for split, path in data_files.items()}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise SdmpruneError(f"{', '.join(missing)} not found: the data directory must be laid out as "
                            "../shared/data")
    return datasets.load_dataset("json", data_files={split: str(path) for split, path in files.items()})


def crows_pairs_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """The harness's CrowS-Pairs scoring: is the more stereotypical sentence (choice 0) the more likely?"""
    (more, _), (less, _) = results
    return {"likelihood_diff": abs(more - less), "pct_stereotype": float(more > less)}


def truthfulqa_mc2_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """The harness's MC2 score: probability mass of the true answers, normalised over all answers."""
    log_likelihoods = [ll for ll, _ in results]
    top = max(log_likelihoods)
    weights = [math.exp(ll - top) for ll in log_likelihoods]  # shifted: same ratios, no underflow
    true_mass = sum(w for w, label in zip(weights, doc["mc2_labels"], strict=True) if label == 1)
    return {"acc": true_mass / sum(weights)}


def winogrande_text(doc: dict) -> int:
    """Partial scoring: the 'text' is the gold context's index among the two filled-in contexts."""
    return int(doc["label"])


def winogrande_target(doc: dict) -> str:
    """The shared continuation after the blank."""
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def winogrande_choices(doc: dict) -> list[str]:
    """The sentence up to the blank, completed by each option."""
    prefix = doc["sentence"][: doc["sentence"].index("_")]
    return [prefix + doc["option1"], prefix + doc["option2"]]


_BLANK = re.compile(r"_{2,}|\s_\s")


def _answered(question: str, answer: str) -> str:
    """A context question with its answer: a cloze blank is filled in, else `Question: …\\nAnswer: …`."""
    if _BLANK.search(question):
        return " ".join(_BLANK.sub(lambda _: f" {answer} ", question, count=1).split()) + "\n"
    return f"Question: {question}\nAnswer: {answer}\n"


def race_docs(dataset):
    """One document per article, as in the harness's RACE: the last question is scored, the earlier
    ones (with their answers) go into the context."""
    import datasets

    articles: dict[str, list[dict]] = {}
    for row in dataset:
        articles.setdefault(row["article"], []).append(row)
    docs = []
    for article, rows in articles.items():
        *earlier, last = rows
        context = "".join(_answered(r["question"], r["choices"][r["label"]]) for r in earlier)
        docs.append({"id": last["id"], "article": article, "context": context, "question": last["question"],
                     "choices": last["choices"], "label": last["label"]})
    return datasets.Dataset.from_list(docs)


def race_text(doc: dict) -> str:
    """The harness's RACE prompt: article, the earlier questions answered, then the last question."""
    return f"Article: {doc['article']}\n\n{doc['context']}{doc['question']}"


# ----------------------------------------------------------------------------- the lm-eval bridge


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise SdmpruneError("zero-shot tasks need lm-evaluation-harness: pip install 'sdmprune[eval]'") from error


def _hide_custom_dataset_notice(record: logging.LogRecord) -> bool:
    """The harness advertises `--metadata` for every task with a custom_dataset: not useful here."""
    return "Custom kwargs can be passed" not in record.getMessage()


def task_manager(data_dir: str | Path | None):
    """`(TaskManager, {our name: harness task name})`: the shipped definitions when a data directory is
    given (or $SDMPRUNE_DATA_DIR is set), else the harness's own."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    directory = local_data_dir(data_dir)
    if directory is not None:
        logging.getLogger("lm_eval.api.task").addFilter(_hide_custom_dataset_notice)  # idempotent
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                              metadata={"data_dir": str(directory)})
        return manager, {name: name for name in TASKS}
    return TaskManager(), {name: spec.harness for name, spec in TASKS.items()}


@dataclass
class TaskSelection:
    """Tasks resolved before any model is loaded: the manager, our name -> its task name, and the source."""

    manager: object
    run_names: dict[str, str]
    local: bool


def resolve_tasks(names: Sequence[str], data_dir: str | Path | None = None) -> TaskSelection:
    """Check `names` against the shipped tasks (local data) or the harness's (online)."""
    manager, harness_names = task_manager(data_dir)
    local = harness_names["siqa"] == "siqa"
    run_names = {name: harness_names.get(name, name) for name in names}
    unknown = [name for name, harness in run_names.items() if harness not in manager.all_tasks]
    if unknown:
        where = f"the shipped tasks ({', '.join(TASKS)})" if local else "the harness's tasks"
        raise SdmpruneError(f"unknown task(s) {', '.join(unknown)}: choose from {where}")
    return TaskSelection(manager, run_names, local)


def with_bos(tokenizer):
    """`tokenizer`, or a copy of it, whose encodings start with its BOS token (METHOD.md's add_bos_token=True).

    HFLM's `add_bos_token` reaches only tokenizers the harness builds itself; with ours it merely asks for
    special tokens, and a tokenizer whose post-processor adds none (SmolLM2's, GGUF-converted ones) would
    score every item without BOS. A tokenizer that defines no BOS token (Qwen2/3) is returned unchanged.
    """
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer("a").input_ids[:1] == [bos]:
        return tokenizer
    bos_first = copy.deepcopy(tokenizer)
    bos_first.add_bos_token = True
    if bos_first("a").input_ids[:1] != [bos]:
        raise SdmpruneError(f"could not make the {type(tokenizer).__name__} tokenizer prepend its BOS token "
                            f"{tokenizer.bos_token!r}: the zero-shot protocol needs it")
    return bos_first


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Sequence[str] | TaskSelection,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    bf16: bool = False,
    seed: int = 0,
    lm_class: type | None = None,
) -> dict:
    """Zero-shot evaluation of an in-memory model (a PreTrainedModel or a PeftModel) on `tasks` (names, or
    a `resolve_tasks` result).

    Every request starts with the tokenizer's BOS token (see `with_bos`). The harness builds the requests
    and computes the metrics; `SharedContextLM` scores them, `batch_size` distinct contexts per forward
    (`lm_class` replaces it by another HFLM subclass, e.g. HFLM itself: the harness's own scoring).
    Returns {"tasks": {name: {"harness_task", "metric", "value", "stderr", "n"}}, "average" (the 10-task
    mean or None), "source" ("local" or "hub"), "scorer" (the LM class), "bos_token" (None if the tokenizer
    has none), "limit", "seconds"}; values are fractions in [0, 1].
    """
    _require_lm_eval()
    from lm_eval import simple_evaluate

    from .shared_context import SharedContextLM

    selection = tasks if isinstance(tasks, TaskSelection) else resolve_tasks(tasks, data_dir)
    run_names = selection.run_names
    if limit is not None and limit < 1:
        raise SdmpruneError(f"--limit must be at least 1, got {limit}")
    tokenizer = with_bos(tokenizer)
    lm = (lm_class or SharedContextLM)(pretrained=model, tokenizer=tokenizer, add_bos_token=True,
                                       batch_size=batch_size, max_length=context_length(model),
                                       mixed_precision_dtype=torch.bfloat16 if bf16 else None)
    start = time.perf_counter()
    try:
        output = simple_evaluate(model=lm, tasks=list(dict.fromkeys(run_names.values())), num_fewshot=0,
                                 limit=limit, task_manager=selection.manager, bootstrap_iters=1000, log_samples=False,
                                 random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                 fewshot_random_seed=seed)
    except (ConnectionError, OSError) as error:
        raise SdmpruneError(f"could not load task data ({str(error).splitlines()[0][:200]}); offline, pass "
                            "--data-dir ../shared/data (or set SDMPRUNE_DATA_DIR)") from error
    seconds = time.perf_counter() - start
    scored = {}
    for name, harness in run_names.items():
        scores = output["results"][harness]
        reported = [key.split(",")[0] for key in scores if "," in key and "_stderr" not in key]
        metric = select_metric(name, reported)
        stderr = scores.get(f"{metric}_stderr,none")
        scored[name] = {
            "harness_task": harness,
            "metric": metric,
            "value": scores[f"{metric},none"],
            "stderr": stderr if isinstance(stderr, float) else None,
            "n": output["n-samples"].get(harness, {}).get("effective"),  # groups report no count
        }
    return {
        "tasks": scored,
        "average": sdmprune_average({name: r["value"] for name, r in scored.items()}),
        "average_tasks": list(SDMPRUNE_TASKS),
        "source": "local" if selection.local else "hub",
        "scorer": type(lm).__name__,
        "bos_token": tokenizer.bos_token,
        "limit": limit,
        "seconds": seconds,
    }


def results_markdown(result: dict, title: str = "Zero-shot results") -> str:
    """A markdown table (values in percent, ± standard error) with the 10-task average."""
    lines = [f"# {title}", "", "| task | metric | value (%) | ± stderr | n |", "|---|---|---:|---:|---:|"]
    for name, r in result["tasks"].items():
        stderr = f"{100 * r['stderr']:.2f}" if r["stderr"] is not None else "–"
        lines.append(f"| {name} | {r['metric']} | {100 * r['value']:.2f} | {stderr} | {r['n']} |")
    average = result["average"]
    lines.append(f"| **average (10 SDMPrune tasks)** | | {f'{100 * average:.2f}' if average is not None else 'n/a'}"
                 " | | |")
    lines += [
        "",
        f"Zero-shot, lm-evaluation-harness, scored by {result.get('scorer', 'HFLM')}, "
        + (f"BOS `{result['bos_token']}` prepended" if result.get("bos_token") else "no BOS (the tokenizer has none)")
        + f"; task data: {result['source']}"
        + (f"; first {result['limit']} items per task" if result["limit"] else "") + ".",
        "The average is the unweighted mean of " + ", ".join(result["average_tasks"])
        + " (n/a unless all were run); crows_pairs counts its pct_stereotype as is, as the paper does.",
        "",
    ]
    if "perplexity" in result:
        ppl = result["perplexity"]
        lines.insert(-1, f"Perplexity ({ppl['data']}, {ppl['tokens']} tokens, windows of {ppl['seq_len']}): "
                         f"{ppl['ppl']:.3f}.")
    return "\n".join(lines)


def write_results(result: dict, output_dir: str | Path, title: str = "Zero-shot results") -> Path:
    """Write `results.json` and `results.md` into `output_dir` (each file replaced atomically; other files
    there are left alone)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(result, indent=1)), ("results.md", results_markdown(result, title))):
        with atomic_file(output_dir / name) as tmp:
            tmp.write_text(text)
    return output_dir
