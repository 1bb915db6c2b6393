"""LoRA recovery on a tiny pruned model: masking, loss going down, merge, resume, distillation, CLI."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import byte_tokenizer, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sdmprune import finetune
from sdmprune.cli import main
from sdmprune.errors import SdmpruneError
from sdmprune.evaluation.perplexity import perplexity
from sdmprune.models import load_model
from sdmprune.recovery import format_prompt, load_adapter, load_instructions, tokenize_example
from sdmprune.recovery.data import IGNORE_INDEX, PROMPT_NO_INPUT, collate, tokenize_dataset
from sdmprune.recovery.finetune import recovery_loss_sums

finetune_module = importlib.import_module("sdmprune.recovery.finetune")

EXAMPLES = [
    {"instruction": "Say hi.", "input": "", "output": "Hi there!"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Reverse the word.", "input": "cat", "output": "tac"},
    {"instruction": "Give an animal.", "input": "", "output": "A dog."},
    {"instruction": "Spell one.", "input": "", "output": "o-n-e"},
]
DATA_DIR = Path(os.environ.get("SDMPRUNE_DATA_DIR", Path(__file__).parents[2] / "shared" / "data"))
FAST = dict(max_len=256, batch_size=2, grad_accum=1, lr=5e-3, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny dense Llama and its 20% magnitude-pruned export (pruning.json names the dense source)."""
    root = tmp_path_factory.mktemp("models")
    dense = root / "dense"
    tiny_model("llama", max_position_embeddings=256).save_pretrained(dense)
    byte_tokenizer().save_pretrained(dense)
    pruned = root / "pruned"
    assert main(["prune", "--model", str(dense), "--ratio", "0.2", "--criterion", "magnitude",
                 "--ppl-data", "none", "--output", str(pruned)]) == 0
    return dense, pruned


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps(EXAMPLES))
    return path


def test_prompt_is_masked_and_eos_appended():
    tokenizer = byte_tokenizer()
    with_input, without = EXAMPLES[1], EXAMPLES[0]
    assert format_prompt(without) == PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert "### Input:\n2 and 3\n\n### Response:\n" in format_prompt(with_input)
    for example in (with_input, without):
        input_ids, labels = tokenize_example(tokenizer, example, max_len=512)
        prompt = tokenizer(format_prompt(example))["input_ids"]
        response = tokenizer(example["output"], add_special_tokens=False)["input_ids"]
        assert input_ids == prompt + response + [tokenizer.eos_token_id]
        assert labels == [IGNORE_INDEX] * len(prompt) + response + [tokenizer.eos_token_id]
    # Truncation keeps the mask aligned; an example whose prompt fills max_len is dropped.
    data = tokenize_dataset(tokenizer, [without, {**without, "instruction": "x" * 400}], max_len=200)
    assert len(data) == 1 and data.dropped == 1
    batch = collate(tokenize_dataset(tokenizer, EXAMPLES[:2], 512), [0, 1], pad_id=0)
    short = int(batch["attention_mask"][0].sum())
    assert batch["labels"].shape == batch["input_ids"].shape == (2, batch["attention_mask"].sum(1).max())
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and batch["input_ids"][0, short - 1] == 256


def test_instruction_loading_errors(tmp_path, monkeypatch):
    lamini = tmp_path / "lamini.jsonl"
    lamini.write_text(json.dumps({"instruction": "Hi", "response": "Hello"}) + "\n")
    assert load_instructions(str(lamini)) == [{"instruction": "Hi", "input": "", "output": "Hello"}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(SdmpruneError, match="needs string fields 'instruction' and 'output'"):
        load_instructions(str(bad))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(SdmpruneError, match="could not load instruction dataset 'MBZUAI/LaMini-instruction'"):
        load_instructions("lamini")


def test_finetune_lowers_the_loss_and_merges(models, data_file, tmp_path):
    _, pruned = models
    out = tmp_path / "lora"
    record = finetune(str(pruned), out, data=str(data_file), max_steps=12, merge=True, **FAST)
    log = json.loads((out / "loss.json").read_text())
    assert len(log) == record["steps"] == 12
    assert sum(e["loss"] for e in log[-3:]) / 3 < log[0]["loss"] - 0.5
    assert log[-1]["target_tokens"] > 0 and log[-1]["tokens"] > log[-1]["target_tokens"]
    assert (out / "loss.png").stat().st_size > 0 and not (out / "run_state.json").exists()
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]

    # The merged directory loads with plain transformers and computes what base + adapter computes.
    adapter_model, tokenizer = load_adapter(out)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.tensor([tokenizer(format_prompt(EXAMPLES[0]) + "Hi there!")["input_ids"]])
    with torch.inference_mode():
        torch.testing.assert_close(merged(ids).logits, adapter_model(ids).logits, atol=1e-4, rtol=0)
    source = json.loads((pruned / "pruning.json").read_text())
    extended = json.loads((out / "merged" / "pruning.json").read_text())
    assert extended["kept_indices"] == source["kept_indices"]
    assert extended["recovery"]["steps"] == 12 and extended["recovery"]["final_loss"] == log[-1]["loss"]
    assert {"data", "tokens", "lr", "seconds"} <= set(extended["recovery"])

    # Recovery lowers the loss on the training data.
    pruned_model, _ = load_model(str(pruned))
    text = "\n".join(format_prompt(e) + e["output"] for e in EXAMPLES)
    before = perplexity(pruned_model, tokenizer, text, seq_len=128, progress=False)["ppl"]
    after = perplexity(merged, tokenizer, text, seq_len=128, progress=False)["ppl"]
    assert after < before


def test_resume_reproduces_the_uninterrupted_run(models, data_file, tmp_path, monkeypatch):
    _, pruned = models
    settings = dict(data=str(data_file), max_steps=5, save_every=2, **FAST)
    finetune(str(pruned), tmp_path / "straight", **settings)

    save = finetune_module.save_training_state

    def save_then_crash(checkpoint, *args, **kwargs):
        save(checkpoint, *args, **kwargs)
        if args[4] == 4:  # the step just saved
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module, "save_training_state", save_then_crash)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        finetune(str(pruned), interrupted, **settings)
    assert json.loads((interrupted / "run_state.json").read_text())["progress"]["step"] == 4
    monkeypatch.setattr(finetune_module, "save_training_state", save)
    with pytest.raises(SdmpruneError, match="interrupted run: pass --resume"):
        finetune(str(pruned), interrupted, **settings)
    with pytest.raises(SdmpruneError, match="settings differ"):
        finetune(str(pruned), interrupted, resume=True, **{**settings, "lr": 1e-3})
    steps_run = []
    step_batches = finetune_module.Schedule.step_batches
    monkeypatch.setattr(finetune_module.Schedule, "step_batches",
                        lambda self, step: steps_run.append(step) or step_batches(self, step))
    finetune(str(pruned), interrupted, resume=True, **settings)
    assert steps_run == [4]  # only the step after the checkpoint ran again

    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(interrupted / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=0, rtol=0)
    straight_log = json.loads((tmp_path / "straight" / "loss.json").read_text())
    assert [e["loss"] for e in json.loads((interrupted / "loss.json").read_text())] == [e["loss"] for e in straight_log]


def test_kd_loss_matches_its_definition():
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 7, 11), torch.randn(2, 7, 11)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, :3] = IGNORE_INDEX
    labels[1, 5:] = IGNORE_INDEX
    mask = labels[:, 1:] != IGNORE_INDEX
    beta, temperature = 0.3, 2.0
    ce, kl, n = recovery_loss_sums(logits, labels, teacher[:, :-1][mask], temperature)
    student, target = logits[:, :-1][mask], labels[:, 1:][mask]
    expected_ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX)
    expected_kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher[:, :-1][mask] / temperature, -1),
                           log_target=True, reduction="batchmean")
    assert n == int(mask.sum()) == target.numel()
    torch.testing.assert_close((1 - beta) * ce / n + beta * kl / n, (1 - beta) * expected_ce + beta * expected_kl)


def test_kd_run_uses_the_dense_source_as_teacher(models, tmp_path):
    dense, pruned = models
    data = tmp_path / "one.json"
    data.write_text(json.dumps(EXAMPLES[:1]))
    beta, temperature = 0.3, 2.0
    record = finetune(str(pruned), tmp_path / "kd", data=str(data), max_steps=1, kd=True, kd_beta=beta,
                      kd_temperature=temperature, **FAST)
    assert record["teacher"] == str(dense)  # from pruning.json's source_model
    logged = json.loads((tmp_path / "kd" / "loss.json").read_text())[0]
    # At step 1 the LoRA update is zero (B = 0), so the student is the pruned model itself.
    tokenizer = byte_tokenizer()
    input_ids, labels = tokenize_example(tokenizer, EXAMPLES[0], 256)
    ids, labels = torch.tensor([input_ids]), torch.tensor([labels])
    with torch.inference_mode():
        student = load_model(str(pruned))[0](ids).logits
        teacher = load_model(str(dense))[0](ids).logits
    mask = labels[:, 1:] != IGNORE_INDEX
    ce = F.cross_entropy(student[:, :-1][mask], labels[:, 1:][mask])
    kl = F.kl_div(F.log_softmax(student[:, :-1][mask], -1), F.log_softmax(teacher[:, :-1][mask] / temperature, -1),
                  log_target=True, reduction="batchmean")
    assert logged["ce"] == pytest.approx(ce.item(), rel=1e-5) and logged["kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert logged["loss"] == pytest.approx(((1 - beta) * ce + beta * kl).item(), rel=1e-5)


def test_hidden_state_term_matches_its_definition(models, tmp_path):
    dense, pruned = models
    data = tmp_path / "one.json"
    data.write_text(json.dumps(EXAMPLES[:1]))
    beta, gamma = 0.3, 0.5
    finetune(str(pruned), tmp_path / "kd", data=str(data), max_steps=1, kd=True, kd_beta=beta, kd_hidden=gamma,
             **FAST)
    logged = json.loads((tmp_path / "kd" / "loss.json").read_text())[0]
    input_ids, _ = tokenize_example(byte_tokenizer(), EXAMPLES[0], 256)
    with torch.inference_mode():  # at step 1 the student is the pruned model itself (LoRA B = 0)
        student = load_model(str(pruned))[0](torch.tensor([input_ids]), output_hidden_states=True).hidden_states[1:]
        teacher = load_model(str(dense))[0](torch.tensor([input_ids]), output_hidden_states=True).hidden_states[1:]
    expected = sum(((s - t).pow(2).mean() / t.pow(2).mean()).item() for s, t in zip(student, teacher, strict=True))
    assert logged["hidden"] == pytest.approx(expected, rel=1e-5) and expected > 0
    assert logged["loss"] == pytest.approx((1 - beta) * logged["ce"] + beta * logged["kl"] + gamma * expected,
                                           rel=1e-5)


def test_finetune_cli_and_adapter_eval(models, data_file, tmp_path, capsys, text_file):
    _, pruned = models
    out = tmp_path / "cli"
    argv = ["finetune", "--model", str(pruned), "--data", str(data_file), "--max-steps", "2", "--max-len", "256",
            "--output", str(out)]
    assert main(argv) == 0
    assert "2 steps" in capsys.readouterr().out and (out / "adapter_config.json").is_file()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 2 and "nothing to resume" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "x"), "--kd", "--teacher-model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # `eval` on the adapter directory loads the base it names, then the adapter; tasks and perplexity together.
    assert main(["eval", "--model", str(out), "--ppl-data", str(text_file), "--seq-len", "64", "--tasks", "boolq",
                 "--limit", "2", "--data-dir", str(DATA_DIR), "--output", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["perplexity"]["ppl"] > 1 and result["tasks"]["boolq"]["n"] == 2
    assert "Perplexity (" in (tmp_path / "eval" / "results.md").read_text()
