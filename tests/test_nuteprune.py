"""NutePrune: hard-concrete gates and expected L0 as defined, the sparsity constraint, teachers from
snapshots in the same model, attention-group export, resuming, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import VOCAB, manual_report, tiny_model
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from sdmprune import SdmpruneError, count_parameters, export_pruned, load_pruned
from sdmprune.cli import main
from sdmprune.masks import HeadMasks, NeuronMasks
from sdmprune.nuteprune import NutePruneConfig, nuteprune
from sdmprune.nuteprune.gates import BETA, GAMMA, ZETA, HardConcreteGates, hard_concrete, prob_nonzero
from sdmprune.nuteprune.teachers import layer_outputs, teacher_level
from sdmprune.nuteprune.trainer import NutePruneRun
from sdmprune.options import build

IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
WINDOWS = torch.randint(0, VOCAB, (32, 16), generator=torch.Generator().manual_seed(0))
DEEPER = dict(num_hidden_layers=4, intermediate_size=128)  # enough gates for a smooth expected sparsity


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS, use_cache=False).logits


def test_gate_samples_and_expected_l0_match_their_definitions():
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0], dtype=torch.float64)
    u = torch.tensor([0.01, 0.3, 0.5, 0.7, 0.2, 0.99], dtype=torch.float64)
    by_hand = []
    for a, x in zip(log_alpha.tolist(), u.tolist(), strict=True):
        s = 1 / (1 + math.exp(-(math.log(x) - math.log(1 - x) + a) / BETA))
        by_hand.append(min(1.0, max(0.0, s * (ZETA - GAMMA) + GAMMA)))
    assert torch.allclose(hard_concrete(log_alpha, u), torch.tensor(by_hand, dtype=torch.float64), atol=1e-12)

    # P(z != 0) = sigmoid(log α - β log(-γ/ζ)), against 200k samples per gate
    generator = torch.Generator().manual_seed(0)
    samples = hard_concrete(log_alpha, torch.rand(200_000, 6, generator=generator, dtype=torch.float64))
    assert torch.allclose((samples > 0).double().mean(0), prob_nonzero(log_alpha), atol=0.005)
    by_hand = [1 / (1 + math.exp(-(a - BETA * math.log(-GAMMA / ZETA)))) for a in log_alpha.tolist()]
    assert torch.allclose(prob_nonzero(log_alpha), torch.tensor(by_hand, dtype=torch.float64), atol=1e-12)

    # expected sparsity: expected removed parameters over the total, groups and neurons at their costs
    model = tiny_model("qwen2")  # q/k/v biases: a group costs its bias entries too
    count = count_parameters(model)
    gates = HardConcreteGates(count, 0.0)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.randn(gates.log_alpha.shape, generator=generator) * 2)
    heads, neurons = gates.split(1 - prob_nonzero(gates.log_alpha.detach().double()))
    removed = sum(float(h.sum()) * c for h, c in zip(heads, count.per_kv_head, strict=True))
    removed += sum(float(n.sum()) * c for n, c in zip(neurons, count.per_neuron, strict=True))
    assert gates.expected_sparsity().item() == pytest.approx(removed / count.total, rel=1e-6)
    assert count.per_kv_head[0] == 2 * 8 * (32 + 32 + 1) + 8 * (32 + 32 + 2)  # G=2 q heads + o cols, one k/v head


def test_deterministic_masks_remove_the_target_lowest_log_alpha_first():
    count = count_parameters(tiny_model("llama"))
    gates = HardConcreteGates(count, 0.0)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.randn(gates.log_alpha.shape, generator=torch.Generator().manual_seed(3)))
    keep = gates.deterministic(0.3)
    removed = gates.removed_ratio(keep)
    assert 0.3 <= removed < 0.3 + max(count.per_kv_head) / count.total
    best = torch.cat([segment == segment.max() for segment in gates.log_alpha.split(gates.sizes)])
    assert keep[best].all()  # every layer keeps its best group and its best neuron
    assert gates.log_alpha[~keep].max() <= gates.log_alpha[keep & ~best].min()  # the rest: lowest log α removed
    with pytest.raises(SdmpruneError, match="cannot be reached"):
        gates.deterministic(0.99)


def test_without_head_gates_only_neurons_are_removed():
    count = count_parameters(tiny_model("llama"))
    gates = HardConcreteGates(count, 0.0, heads=False)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.randn(gates.log_alpha.shape, generator=torch.Generator().manual_seed(3)))
    heads, neurons = gates.split(gates.deterministic(0.3))
    assert all(h.all() for h in heads) and 0.3 <= gates.removed_ratio(torch.cat([*heads, *neurons])) < 0.31
    heads, _ = gates.split(gates.sample())
    assert all((h == 1).all() for h in heads)  # held at 1 while training
    # the expected sparsity counts the neurons alone; the reachable ratio leaves every group and a neuron a layer
    _, p_neurons = gates.split(1 - prob_nonzero(gates.log_alpha.detach().double()))
    removed = sum(float(n.sum()) * c for n, c in zip(p_neurons, count.per_neuron, strict=True))
    assert gates.expected_sparsity().item() == pytest.approx(removed / count.total, rel=1e-6)
    neuron_cost = sum(w * c for w, c in zip(count.widths, count.per_neuron, strict=True))
    assert gates.max_ratio() == pytest.approx((neuron_cost - sum(count.per_neuron)) / count.total)
    assert gates.max_ratio() < HardConcreteGates(count, 0.0).max_ratio()

    model = tiny_model("llama", **DEEPER)
    result = nuteprune(model, calibration=WINDOWS, ratio=0.2, train_steps=30, head_gates=False, progress=False)
    assert result.heads.kv_heads == count_parameters(model).kv_heads  # every group kept
    assert result.report["achieved"]["ratio"] >= 0.2 and result.report["achieved"]["kv_head_ratio"] == 0


def test_teacher_schedule_keeps_the_gap_then_walks_back_to_dense():
    settings = dict(every=0.01, gap=0.1, ratio=0.3, warmup_steps=70, total_steps=100)
    assert teacher_level(10, 0.05, **settings) == 0
    assert teacher_level(50, 0.237, **settings) == 13  # 23 points - 10
    after = [teacher_level(step, 0.3, **settings) for step in range(70, 100)]
    assert after[0] == 20 and after[-1] == 0
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))


def test_expected_sparsity_converges_to_the_target():
    result = nuteprune(tiny_model("llama", **DEEPER), calibration=WINDOWS, ratio=0.2, train_steps=300,
                       progress=False)
    assert result.log[0]["expected_sparsity"] < 0.01  # gates start almost all on
    tail = [entry["expected_sparsity"] for entry in result.log[-60:]]  # the last 20 %: target constant at 0.2
    assert all(entry["target"] == pytest.approx(0.2) for entry in result.log[-60:])
    assert abs(sum(tail) / len(tail) - 0.2) < 0.02 and max(abs(s - 0.2) for s in tail) < 0.04
    count = count_parameters(tiny_model("llama", **DEEPER))
    assert 0.2 <= result.report["achieved"]["ratio"] < 0.2 + max(count.per_kv_head) / count.total
    assert result.report["training"]["snapshots"] == list(range(1, 11))  # every 1% up to 20% - 10%


def test_snapshot_teacher_is_the_model_with_the_snapshot_masks_and_adapters():
    config = build(NutePruneConfig, dict(ratio=0.3, train_steps=60, teacher_gap=0.1))
    run = NutePruneRun(tiny_model("llama", **DEEPER), config)
    for step in range(config.train_steps):
        run.train_step(WINDOWS[step % len(WINDOWS)][None])
    level = max(run.teachers.snapshots)
    assert level >= 5
    snapshot = run.teachers.snapshots[level]
    assert any(t.abs().sum() > 0 for name, t in snapshot.lora.items() if "lora_B" in name)  # the adapters matter
    for step in range(3):  # the student moves on
        run.train_step(WINDOWS[step][None])
    student = {name: p.detach().clone() for name, p in run.teachers.lora.items()}
    run.masks.set(run.gates.sample(run.generator))
    student_gates = run.masks.heads.keep + run.masks.neurons.keep

    teacher = run.teachers.outputs(IDS, level)
    assert all(torch.equal(p, student[name]) for name, p in run.teachers.lora.items())  # the student is back
    assert all(a is b for a, b in zip(run.masks.heads.keep + run.masks.neurons.keep, student_gates, strict=True))

    lora = LoraConfig(r=config.lora.lora_r, lora_alpha=config.lora.lora_alpha, target_modules=["q_proj", "v_proj"])
    reference = get_peft_model(tiny_model("llama", **DEEPER), lora)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.copy_(snapshot.lora[name])
    heads, neurons = run.gates.split(snapshot.keep)
    base = reference.get_base_model()
    NeuronMasks(base, neurons), HeadMasks(base, heads)
    with torch.inference_mode(), layer_outputs(base) as hidden:
        expected = base(input_ids=IDS, use_cache=False).logits
    assert torch.equal(teacher.logits, expected)
    assert all(torch.equal(a, b) for a, b in zip(teacher.hidden, hidden, strict=True))
    assert not all(torch.equal(p, snapshot.lora[name]) for name, p in run.teachers.lora.items())  # it moved on

    dense = run.teachers.outputs(IDS, 0)  # adapters off, gates off: the original model
    assert torch.equal(dense.logits, logits(tiny_model("llama", **DEEPER)))


@pytest.mark.parametrize("padded", [False, True])
def test_export_reload_reproduces_the_deterministic_model(tokenizer, tmp_path, padded):
    result = nuteprune(tiny_model("qwen2", **DEEPER), calibration=WINDOWS, ratio=0.3, train_steps=40,
                       progress=False)
    masked = logits(result.model)
    with result.masks.disabled(), result.heads.disabled():
        assert not torch.equal(logits(result.model), masked)
    assert len(set(result.heads.kv_heads)) > 1 or len(set(result.masks.widths)) > 1  # widths differ per layer

    out = export_pruned(result.model, tokenizer, result.masks, tmp_path / "out", report=result.report,
                        heads=result.heads, padded=padded)
    record = json.loads((out / "pruning.json").read_text())
    assert record["export"]["layout"] == ("padded" if padded else "per-layer")
    reloaded, _ = load_pruned(out, dtype="float32", device="cpu")
    assert (logits(reloaded) - masked).abs().max().item() <= 1e-4
    if padded:
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert (logits(plain) - masked).abs().max().item() <= 1e-4
    else:
        assert sum(p.numel() for p in reloaded.parameters()) == record["achieved"]["params_after"]
        layers = reloaded.model.layers
        assert [layer.self_attn.k_proj.out_features // 8 for layer in layers] == record["kv_heads"]
        assert [layer.mlp.down_proj.in_features for layer in layers] == record["widths"]


def test_attention_groups_export_for_every_architecture(arch, tokenizer, tmp_path):
    model = tiny_model(arch, num_key_value_heads=2)  # Gemma 3's tiny config has one key/value head
    count = count_parameters(model)
    masks = NeuronMasks(model, [torch.arange(64) % 3 != 0, torch.arange(64) % 2 == 0])
    heads = HeadMasks(model, [torch.tensor([False, True]), torch.tensor([True, True])])
    masked = logits(model)
    out = export_pruned(model, tokenizer, masks, tmp_path / "out", report=manual_report(), heads=heads)
    reloaded, _ = load_pruned(out, dtype="float32", device="cpu")
    assert (logits(reloaded) - masked).abs().max().item() <= 1e-4
    assert sum(p.numel() for p in reloaded.parameters()) == count.after([42, 32], [1, 2])
    assert "key/value heads per layer | 2 -> 1..2" in (out / "README.md").read_text()


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    settings = dict(calibration=WINDOWS, ratio=0.3, train_steps=24, save_every=5, progress=False)
    reference = nuteprune(tiny_model("llama"), state_dir=tmp_path / "a", **settings)

    original = NutePruneRun.train_step

    def crash_at_step_13(self, ids):
        if self.step == 12:
            raise KeyboardInterrupt
        return original(self, ids)

    monkeypatch.setattr(NutePruneRun, "train_step", crash_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        nuteprune(tiny_model("llama"), state_dir=tmp_path / "b", **settings)
    assert json.loads((tmp_path / "b" / "run_state.json").read_text())["progress"]["step"] == 10
    monkeypatch.setattr(NutePruneRun, "train_step", original)
    resumed = nuteprune(tiny_model("llama"), state_dir=tmp_path / "b", resume=True, **settings)
    assert [e["loss"] for e in resumed.log] == [e["loss"] for e in reference.log]
    assert resumed.report["training"]["snapshots"] == reference.report["training"]["snapshots"]
    assert resumed.masks.kept_indices() == reference.masks.kept_indices()
    assert torch.equal(logits(resumed.model), logits(reference.model))
    with pytest.raises(SdmpruneError, match="settings differ"):
        nuteprune(tiny_model("llama"), state_dir=tmp_path / "b", resume=True, **{**settings, "lr": 1e-3})


def test_cli(saved_model, text_file, tmp_path, capsys):
    output = tmp_path / "out"
    args = ["prune", "--model", str(saved_model), "--method", "nuteprune", "--ratio", "0.25", "--train-steps", "12",
            "--calib", str(text_file), "--calib-samples", "8", "--calib-seq-len", "16", "--ppl-data", str(text_file),
            "--seq-len", "32", "--output", str(output)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "nuteprune, 12 steps" in printed and "perplexity" in printed
    record = json.loads((output / "pruning.json").read_text())
    assert record["method"] == "nuteprune" and record["achieved"]["ratio"] >= 0.25
    assert len(json.loads((output / "nuteprune_log.json").read_text())) == 12
    assert (output / "nuteprune.png").stat().st_size > 0
    assert record["memory_bytes"]["state_total"] < record["memory_bytes"]["model_weights"]
    assert main([*args[:-1], str(tmp_path / "other"), "--criterion", "taylor"]) == 2
    assert "unrecognized arguments: --criterion taylor" in capsys.readouterr().err  # a scoring option
    assert main([*args[:3], "--train-steps", "5", "--output", str(tmp_path / "x")]) == 2  # --method scoring
    assert "unrecognized arguments: --train-steps 5" in capsys.readouterr().err
    assert main([*args[:-1], str(tmp_path / "sharded"), "--fsdp"]) == 2
    assert "unrecognized arguments: --fsdp" in capsys.readouterr().err  # nuteprune runs in one process
    assert "reconstruction" not in record  # off by default for NutePrune
    refitted = tmp_path / "refitted"
    assert main([*args[:-1], str(refitted), "--reconstruct", "sequential"]) == 0
    layers = json.loads((refitted / "pruning.json").read_text())["reconstruction"]["layers"]
    # the same training: the same masks, now with down_proj (and where groups went, o_proj) refitted
    assert json.loads((refitted / "pruning.json").read_text())["kept_indices"] == record["kept_indices"]
    assert all("error_after" in row for row in layers if row["kept"] < record["widths_before"][row["layer"]])
    assert all(row["attention"]["error_after"] <= row["attention"]["error_before"] for row in layers
               if "attention" in row)
