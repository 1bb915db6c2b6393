"""Zero-shot tasks: the shipped definitions read every shared file with the harness's choices, the metric
and average follow METHOD.md, and `sdmprune eval --tasks` runs end to end on a tiny model."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, byte_tokenizer, tiny_model

from sdmprune.cli import main
from sdmprune.errors import SdmpruneError
from sdmprune.evaluation.tasks import (
    ALL_TASKS,
    SDMPRUNE_TASKS,
    TASKS,
    evaluate_tasks,
    parse_task_names,
    sdmprune_average,
    select_metric,
    task_manager,
    with_bos,
)

DATA_DIR = Path(os.environ.get("SDMPRUNE_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))

# task -> (shared file, allowed numbers of choices per item; None = as many as the item's mc2 labels)
EXPECTED = {
    "arc_easy": ("arc_easy/test_shared_half.jsonl", {3, 4, 5}),
    "arc_challenge": ("arc_challenge/test.jsonl", {3, 4, 5}),
    "boolq": ("boolq/validation.jsonl", {2}),
    "crows_pairs": ("crows_pairs/crows_pairs.jsonl", {2}),
    "openbookqa": ("openbookqa/test.jsonl", {4}),
    "piqa": ("piqa/validation_shared_half.jsonl", {2}),
    "race": ("race_plus_expmrc/dev.jsonl", {2, 3, 4}),
    "siqa": ("siqa/validation.jsonl", {3}),
    "truthfulqa_mc2": ("truthfulqa_mc/validation.jsonl", None),
    "winogrande": ("winogrande/validation.jsonl", {2}),
    "hellaswag": ("hellaswag/validation_shared_half.jsonl", {4}),
    "lambada": ("lambada_openai/test.jsonl", set()),
}


@pytest.fixture(scope="module")
def data_dir() -> Path:
    assert DATA_DIR.is_dir(), f"{DATA_DIR} not found: set SDMPRUNE_DATA_DIR to the shared data directory"
    return DATA_DIR


def test_every_shipped_task_reads_its_shared_file_with_the_right_choices(data_dir):
    assert set(EXPECTED) == set(ALL_TASKS)
    manager, names = task_manager(data_dir)
    loaded = manager.load([names[name] for name in ALL_TASKS])["tasks"]
    for name, (file, allowed) in EXPECTED.items():
        rows = [json.loads(line) for line in (data_dir / file).read_text().splitlines() if line.strip()]
        task = loaded[name]
        docs = task.eval_docs
        expected_docs = len({row["article"] for row in rows}) if name == "race" else len(rows)
        assert len(docs) == expected_docs, name
        for doc in docs:
            if task.OUTPUT_TYPE == "loglikelihood":  # lambada: context and the last word, space-prefixed
                target = task.doc_to_target(doc)
                assert task.doc_to_text(doc) and target.startswith(" ") and len(target) > 1
                continue
            choices = task.doc_to_choice(doc)
            assert all(isinstance(c, str) and c for c in choices), name
            assert len(choices) == (len(doc["mc2_labels"]) if allowed is None else len(choices)), name
            assert allowed is None or len(choices) in allowed, (name, len(choices))
            # winogrande scores partially: the gold is the index returned by doc_to_text
            gold = task.doc_to_text(doc) if name == "winogrande" else task.doc_to_target(doc)
            assert 0 <= gold < len(choices), name
            if name not in ("crows_pairs", "winogrande"):
                assert task.doc_to_text(doc).strip(), name


def test_prompts_follow_the_harness(data_dir):
    manager, _ = task_manager(data_dir)
    loaded = manager.load(["arc_easy", "boolq", "siqa", "winogrande", "race"])["tasks"]
    arc = loaded["arc_easy"].eval_docs[0]
    assert loaded["arc_easy"].doc_to_text(arc) == f"Question: {arc['question']}\nAnswer:"
    boolq = loaded["boolq"].eval_docs[0]
    assert loaded["boolq"].doc_to_text(boolq) == f"{boolq['passage']}\nQuestion: {boolq['question']}?\nAnswer:"
    assert loaded["boolq"].doc_to_choice(boolq) == ["no", "yes"]
    siqa = loaded["siqa"].eval_docs[0]
    assert loaded["siqa"].doc_to_text(siqa) == f"Q: {siqa['context']} {siqa['question']}\nA:"
    wino = loaded["winogrande"].eval_docs[0]
    blank = wino["sentence"].index("_")
    assert loaded["winogrande"].doc_to_choice(wino)[1] == wino["sentence"][:blank] + wino["option2"]
    assert loaded["winogrande"].doc_to_target(wino) == wino["sentence"][blank + 1:].strip()
    race = loaded["race"].doc_to_text(loaded["race"].eval_docs[0])
    assert race.startswith("Article: ") and "\n\n" in race


def test_metric_selection():
    for name in ("arc_easy", "arc_challenge", "piqa", "openbookqa", "hellaswag"):
        assert select_metric(name, ["acc", "acc_norm"]) == "acc_norm"
    for name in ("boolq", "race", "siqa", "truthfulqa_mc2", "winogrande", "lambada"):
        assert select_metric(name, ["acc"]) == "acc"
    assert select_metric("crows_pairs", ["likelihood_diff", "pct_stereotype"]) == "pct_stereotype"
    assert select_metric("some_other_task", ["acc", "acc_norm"]) == "acc_norm"
    assert select_metric("some_other_task", ["acc"]) == "acc"
    assert TASKS["siqa"].harness == "social_iqa" and TASKS["crows_pairs"].harness == "crows_pairs_english"


def test_average_is_the_unweighted_mean_of_the_ten_sdmprune_tasks():
    # The dense LLaMA3.2-1.2B row of the SDMPrune table averages to its reported 51.47.
    row = [37.12, 60.69, 64.04, 62.55, 37.6, 74.16, 37.61, 42.89, 37.70, 60.38]
    values = dict(zip(SDMPRUNE_TASKS, row, strict=True))
    assert sdmprune_average({**values, "hellaswag": 99.0, "lambada": 0.0}) == pytest.approx(51.474)
    del values["race"]
    assert sdmprune_average(values) is None
    assert len(SDMPRUNE_TASKS) == 10 and "hellaswag" not in SDMPRUNE_TASKS


def test_task_name_parsing():
    assert parse_task_names("sdmprune") == list(SDMPRUNE_TASKS)
    assert parse_task_names("boolq, arc_easy,boolq") == ["boolq", "arc_easy"]
    assert parse_task_names("all") == list(ALL_TASKS)
    with pytest.raises(SdmpruneError, match="names no task"):
        parse_task_names(" , ")


def test_eval_tasks_cli_writes_results(capsys, tmp_path, data_dir, one_thread):
    model_dir = tmp_path / "tiny"
    tiny_model("llama", max_position_embeddings=1024).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(model_dir), "--tasks", "arc_easy,boolq", "--limit", "4",
                 "--data-dir", str(data_dir), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    result = json.loads((out / "results.json").read_text())
    assert list(result["tasks"]) == ["arc_easy", "boolq"]
    assert result["tasks"]["arc_easy"]["metric"] == "acc_norm" and result["tasks"]["boolq"]["metric"] == "acc"
    for r in result["tasks"].values():
        assert r["n"] == 4 and 0 <= r["value"] <= 1 and r["stderr"] is not None
    assert result["average"] is None and result["source"] == "local" and "perplexity" not in result
    assert result["scorer"] == "SharedContextLM"
    table = (out / "results.md").read_text()
    assert "| arc_easy | acc_norm |" in table and "| boolq | acc |" in table and "n/a" in table

    code = main(["eval", "--model", str(model_dir), "--tasks", "arc_easy,nope", "--data-dir", str(data_dir),
                 "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown task(s) nope" in err and len(err.strip().splitlines()) == 1


def test_with_bos_makes_a_copy_that_prepends_the_bos_token():
    tokenizer = byte_tokenizer(bos=True)
    bos, text = tokenizer.bos_token_id, tokenizer("ab").input_ids
    assert bos is not None and len(text) == 2 and bos not in text  # defined, not added (as SmolLM2's)
    bos_first = with_bos(tokenizer)
    assert bos_first("ab").input_ids == [bos, *text]
    assert tokenizer("ab").input_ids == text  # the caller's tokenizer is untouched
    assert with_bos(bos_first) is bos_first
    no_bos = byte_tokenizer()
    assert with_bos(no_bos) is no_bos  # Qwen-like: nothing to prepend


def test_every_scored_request_starts_with_bos(data_dir, one_thread):
    model, tokenizer = tiny_model("llama", max_position_embeddings=2048), byte_tokenizer(bos=True)  # no truncation
    context_rows = []  # the first token of every row of every context pass (the passes without a cache)
    model.register_forward_pre_hook(
        lambda module, args, kwargs: context_rows.extend(kwargs["input_ids"][:, 0].tolist())
        if kwargs.get("cache", kwargs.get("past_key_values")) is None else None, with_kwargs=True)
    result = evaluate_tasks(model, tokenizer, ["boolq", "siqa"], data_dir=data_dir, limit=3, batch_size=2)
    assert len(context_rows) == 3 + 3  # one per item: its 2 or 3 choices share the context pass
    assert set(context_rows) == {tokenizer.bos_token_id} and result["bos_token"] == "<bos>"


def _requests(seed: int, greedy_from=None) -> list:
    """Harness-style requests ((texts), context tokens, continuation tokens): contexts shared by 1–4
    continuations of 1–6 tokens, one request longer than the model's 64 positions, and with `greedy_from`
    a continuation that is that model's greedy decoding of its context."""
    generator = random.Random(seed)
    requests = []
    for item in range(5):
        context = [generator.randrange(256) for _ in range(generator.randint(1, 12))]
        for choice in range(generator.randint(1, 4)):
            continuation = [generator.randrange(256) for _ in range(generator.randint(1, 6))]
            requests.append(((f"c{item}", f"x{choice}"), context, continuation))
    requests.append((("long", "y"), list(range(100, 190)), [5, 6, 7]))  # truncated from the left
    if greedy_from is not None:
        context, continuation = [7, 8, 9], []
        with torch.no_grad():
            for _ in range(4):
                continuation.append(int(greedy_from(torch.tensor([context + continuation])).logits[0, -1].argmax()))
        requests += [(("g", "greedy"), context, continuation), (("g", "other"), context, [continuation[0], 3])]
    return requests


@pytest.mark.parametrize("contexts_per_forward,answer_positions", [(1, None), (3, None), (3, 6)])
def test_shared_context_scoring_equals_the_harness(arch, contexts_per_forward, answer_positions, one_thread,
                                                   monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from sdmprune.evaluation import shared_context
    from sdmprune.evaluation.shared_context import SharedContextLM

    if answer_positions:  # so small that groups are split and passes hold one or two groups
        monkeypatch.setattr(shared_context, "LOGITS_BYTES", 12 * VOCAB * answer_positions)
    model, tokenizer = tiny_model(arch, max_position_embeddings=64), byte_tokenizer()
    requests = _requests(0, greedy_from=model)
    options = dict(pretrained=model, tokenizer=tokenizer, batch_size=contexts_per_forward, max_length=64)
    expected = HFLM(logits_cache=False, **options)._loglikelihood_tokens(requests, disable_tqdm=True)
    scored = SharedContextLM(**options)._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [greedy for _, greedy in scored] == [greedy for _, greedy in expected]
    assert scored[-2][1] and not scored[-1][1]  # the greedy continuation is recognised as such
    assert torch.allclose(torch.tensor([ll for ll, _ in scored]), torch.tensor([ll for ll, _ in expected]),
                          rtol=1e-5, atol=1e-4)


def test_contexts_are_grouped_once_and_truncated_as_the_harness_does():
    from sdmprune.evaluation.shared_context import batches, group_by_context

    requests = [(("a", "1"), [1, 2], [3]), (("b", "1"), [4], [5, 6]), (("a", "2"), [1, 2], [7, 8]),
                (("c", "1"), [9, 9, 9, 9], [1, 2])]
    assert group_by_context(requests, max_length=4) == [
        ([9, 9, 9], [(3, [1, 2])]),  # 6 tokens > max_length + 1: the context loses its first token
        ([1, 2], [(0, [3]), (2, [7, 8])]),
        ([4], [(1, [5, 6])]),
    ]
    one, two, three = [(0, [1, 2]), (1, [3, 4]), (2, [5])], [(3, [6])], [(4, [7])]
    assert batches([([1], one), ([2], two), ([3], three)], contexts=2, positions=4) == [
        [([1], one[:2])],  # 2 rows × 2 tokens fill the 4 positions: the third answer goes on with its context
        [([1], one[2:]), ([2], two)],
        [([3], three)],  # two contexts per pass at most
    ]
