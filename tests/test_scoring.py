"""Each calibration criterion equals a direct hand computation on a tiny model; the losses equal their
definitions; the masks-off teacher is exactly the dense model; FLAP's compensated export is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from sdmprune import SdmpruneError, export_pruned, prune
from sdmprune.criteria import CRITERIA, ScoringContext, Step, compute_scores
from sdmprune.criteria.sdmprune import SDMPrune
from sdmprune.losses import distillation_kl, self_distillation_loss
from sdmprune.masks import NeuronMasks
from sdmprune.teachers import TEACHERS, RunView, Teacher

N_WINDOWS, SEQ = 3, 12


def calibration(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (N_WINDOWS, SEQ), generator=torch.Generator().manual_seed(seed))


def half_masks(model) -> NeuronMasks:
    """Masks keeping a fixed random half of every layer."""
    generator = torch.Generator().manual_seed(3)
    keep = [torch.rand(mlp.down_proj.in_features, generator=generator) > 0.5 for mlp in mlps(model)]
    return NeuronMasks(model, keep)


def mlps(model):
    return [layer.mlp for layer in model.model.layers]


def down_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The (tokens, I) input of every down_proj, as the masked model computes it."""
    seen = []
    handles = [mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().flatten(0, 1)))
               for mlp in mlps(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return seen


def hand_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Forward KL(p_t || p_s) per token, summed over the vocabulary, averaged over predicting positions."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for s in range(student.shape[1] - 1):
            p = torch.softmax(teacher[b, s] / temperature, -1)
            total = total + (p * (p.log() - torch.log_softmax(student[b, s], -1))).sum()
            count += 1
    return total / count



def attached(kind: str, model, masks=None) -> Teacher:
    """Teacher `kind` attached to `model`, seeing `masks`."""
    teacher = TEACHERS.get(kind)()
    teacher.attach(model, RunView(masks))
    return teacher


def distillation_scores(model, masks, ids, importance: str) -> list[torch.Tensor]:
    """SDMPrune scores with the masks-off teacher, α = 0.4, T = 0.5."""
    criterion = SDMPrune(importance=importance)
    criterion.teacher.attach(model, RunView(masks))
    step = Step("prune", 0.0, {"alpha": 0.4, "temperature": 0.5})
    return compute_scores(criterion, ScoringContext(model, masks, ids), step)


def test_distillation_loss_is_its_definition():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    for temperature in (0.2, 1.0, 2.0):  # temperature on the teacher only, and no T² factor
        assert distillation_kl(student, teacher, temperature).item() == pytest.approx(
            hand_kl(student, teacher, temperature).item(), rel=1e-5)
    ce = F.cross_entropy(student[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    loss = self_distillation_loss(student, teacher, ids, alpha=0.4, temperature=0.5)
    assert loss.item() == pytest.approx((0.6 * ce + 0.4 * hand_kl(student, teacher, 0.5)).item(), rel=1e-5)
    assert self_distillation_loss(student, None, ids, alpha=0.0, temperature=0.5).item() == pytest.approx(ce.item())
    assert distillation_kl(teacher, teacher, 1.0).abs().item() < 1e-6  # zero when student = teacher at T = 1


def test_masks_off_teacher_is_exactly_the_dense_model():
    model = tiny_model("qwen3")
    ids = calibration()
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    masks = half_masks(model)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, dense)
    assert torch.equal(attached("masks-off", model, masks).logits(ids), dense)
    assert masks.enabled  # and the masks are back on afterwards


def test_taylor_is_llm_pruners_batched_gradient_by_hand():
    model, ids = tiny_model("llama"), calibration()
    masks = NeuronMasks(model)
    scores = compute_scores(CRITERIA.get("taylor")(), ScoringContext(model, masks, ids))
    weights = [p for mlp in mlps(model) for p in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)]
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, weights)
    for layer in range(2):
        gate, up, down = weights[3 * layer: 3 * layer + 3]
        g_gate, g_up, g_down = grads[3 * layer: 3 * layer + 3]
        expected = (gate * g_gate).abs().sum(1) + (up * g_up).abs().sum(1) + (down * g_down).abs().sum(0)
        torch.testing.assert_close(scores[layer], expected.detach(), rtol=1e-4, atol=1e-9)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def per_window_losses(model, teacher_model, ids, alpha, temperature):
    """Yield the self-distillation loss of each window, built from scratch."""
    for window in ids.split(1):
        logits = model(input_ids=window).logits
        with torch.no_grad():
            teacher = teacher_model(input_ids=window).logits
        ce = F.cross_entropy(logits[0, :-1], window[0, 1:])
        yield (1 - alpha) * ce + alpha * hand_kl(logits, teacher, temperature)


@pytest.mark.parametrize("importance", ["weight", "weight-wanda"])
def test_sdmprune_importance_by_hand(importance):
    model, ids = tiny_model("mistral"), calibration()
    dense_copy = tiny_model("mistral")  # same seed: the dense teacher, built independently
    masks = half_masks(model)
    scores = distillation_scores(model, masks, ids, importance)
    taylor, squares = ([torch.zeros(64) for _ in range(2)] for _ in range(2))
    captured = []
    handles = [mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0])) for mlp in mlps(model)]
    for loss in per_window_losses(model, dense_copy, ids, 0.4, 0.5):
        for layer, mlp in enumerate(mlps(model)):
            gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            g_gate, g_up, g_down = torch.autograd.grad(loss, (gate, up, down), retain_graph=True)
            # products added at aligned (i, j) before |.|, |.| per window, mean over the hidden index j
            taylor[layer] += (g_gate * gate + g_up * up + (g_down * down).T).abs().mean(1).detach()
            squares[layer] += captured[layer].detach()[0].pow(2).sum(0)  # the student's down_proj input (S, I)
        captured[:] = []
    for handle in handles:
        handle.remove()
    downs = [mlp.down_proj.weight.detach() for mlp in mlps(model)]
    expected = taylor if importance == "weight" else [
        (t * sq.sqrt() * down.abs().mean(0)).sqrt() for t, sq, down in zip(taylor, squares, downs, strict=True)]
    for layer in range(2):
        keep = masks.keep[layer]
        torch.testing.assert_close(scores[layer][keep], expected[layer][keep], rtol=1e-4, atol=1e-9)
        assert torch.isinf(scores[layer][~keep]).all()


@pytest.mark.parametrize("importance", ["activation", "fisher", "activation-wanda"])
def test_activation_importance_by_hand(importance):
    model, ids = tiny_model("qwen2"), calibration()
    masks = half_masks(model)
    scores = distillation_scores(model, masks, ids, importance)
    dense_copy = tiny_model("qwen2")
    first, second, squares = ([torch.zeros(64) for _ in range(2)] for _ in range(3))
    captured = []
    handles = [mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0])) for mlp in mlps(model)]
    for loss in per_window_losses(model, dense_copy, ids, 0.4, 0.5):
        student_inputs, captured[:] = captured[:2], []  # the student's two down_proj inputs
        grads = torch.autograd.grad(loss, student_inputs)
        for layer, (a, g) in enumerate(zip(student_inputs, grads, strict=True)):
            product = (a * g).detach()[0]  # (S, I)
            first[layer] += product.abs().sum(0)
            second[layer] += product.pow(2).sum(0)
            squares[layer] += a.detach()[0].pow(2).sum(0)
    for handle in handles:
        handle.remove()
    downs = [mlp.down_proj.weight.detach() for mlp in mlps(model)]
    wanda = [sq.sqrt() * down.abs().mean(0) for sq, down in zip(squares, downs, strict=True)]
    expected = {"activation": first, "fisher": second,
                "activation-wanda": [(f * w).sqrt() for f, w in zip(first, wanda, strict=True)]}[importance]
    for layer in range(2):
        keep = masks.keep[layer]
        torch.testing.assert_close(scores[layer][keep], expected[layer][keep], rtol=1e-4, atol=1e-12)


def test_wanda_sp_by_hand():
    model, ids = tiny_model("llama"), calibration()
    masks = NeuronMasks(model)
    scores = compute_scores(CRITERIA.get("wanda-sp")(), ScoringContext(model, masks, ids))
    for layer, (x, mlp) in enumerate(zip(down_inputs(model, ids), mlps(model), strict=True)):
        expected = mlp.down_proj.weight.abs().mean(0) * x.norm(dim=0)
        torch.testing.assert_close(scores[layer], expected.detach(), rtol=1e-5, atol=1e-9)


def test_flap_fluctuation_and_compensation_by_hand():
    model, ids = tiny_model("llama"), calibration()
    masks = half_masks(model)
    context = ScoringContext(model, masks, ids)
    scores = compute_scores(CRITERIA.get("flap")(), context)
    masked_inputs = down_inputs(model, ids)
    for layer, (x, mlp) in enumerate(zip(masked_inputs, mlps(model), strict=True)):
        expected = x.var(dim=0) * mlp.down_proj.weight.pow(2).sum(0)
        keep = masks.keep[layer]
        torch.testing.assert_close(scores[layer][keep], expected[keep].detach(), rtol=1e-4, atol=1e-9)

    from sdmprune.criteria.activations import compensate_bias

    compensate_bias(context)
    with masks.disabled():
        dense_inputs = down_inputs(model, ids)
    for layer, (x, mlp) in enumerate(zip(dense_inputs, mlps(model), strict=True)):
        removed = ~masks.keep[layer]
        expected = mlp.down_proj.weight[:, removed] @ x[:, removed].mean(0)
        torch.testing.assert_close(masks.bias[layer], expected.detach(), rtol=1e-4, atol=1e-6)


def test_flap_compensated_export_reproduces_the_masked_model(tmp_path, tokenizer):
    model, ids = tiny_model("llama"), calibration()
    result = prune(model, ratio=0.2, criterion="flap", allocation="global", calibration=ids)
    assert any(bias.abs().sum() > 0 for bias in result.masks.bias)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    for padded in (True, False):
        out = tmp_path / f"flap-{padded}"
        copy = tiny_model("llama")
        again = prune(copy, ratio=0.2, criterion="flap", allocation="global", calibration=ids)
        assert again.masks.kept_indices() == result.masks.kept_indices()
        export_pruned(copy, tokenizer, again.masks, out, report=again.report, padded=padded)
        if padded:  # plain transformers, no custom code: mlp_bias in the config
            reloaded = AutoModelForCausalLM.from_pretrained(out)
            assert reloaded.config.mlp_bias
        else:
            from sdmprune import load_pruned

            reloaded, _ = load_pruned(out)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, masked, rtol=1e-4, atol=1e-5)


def test_bias_compensation_needs_an_mlp_bias_option():
    ids = calibration()
    with pytest.raises(SdmpruneError, match="no MLP-bias option"):
        prune(tiny_model("qwen2"), ratio=0.2, criterion="flap", calibration=ids, bias_compensation=True)
    automatic = prune(tiny_model("qwen2"), ratio=0.2, criterion="flap", calibration=ids)  # off where unstorable
    assert all(bias is None for bias in automatic.masks.bias) and not automatic.report["bias_compensation"]
    llama = prune(tiny_model("llama"), ratio=0.2, criterion="flap", calibration=ids)
    assert llama.report["bias_compensation"] and all(bias is not None for bias in llama.masks.bias)
    plain = prune(tiny_model("llama"), ratio=0.2, criterion="wanda-sp", calibration=ids)
    assert not plain.report["bias_compensation"]
    magnitude = prune(tiny_model("llama"), ratio=0.2, criterion="magnitude", bias_compensation=True,
                      calibration=ids)
    assert magnitude.report["bias_compensation"]


def test_copy_teacher_gives_the_same_masks_as_the_masks_off_teacher():
    ids = calibration()
    runs = {}
    for teacher in ("masks-off", "copy"):
        runs[teacher] = prune(tiny_model("llama"), mlp_ratio=0.4, criterion="sdmprune", teacher=teacher,
                              calibration=ids, cold_start=0.1)
    assert runs["copy"].masks.kept_indices() == runs["masks-off"].masks.kept_indices()
    assert runs["copy"].report["steps"][1]["alpha"] > 0  # the distillation stage really used the teacher
    model = tiny_model("llama")
    dense = attached("masks-off", model, NeuronMasks(model)).logits(ids)
    assert torch.equal(attached("copy", model).logits(ids), dense)


def test_no_cold_start_scores_the_dense_model_under_distillation():
    ids = calibration()
    result = prune(tiny_model("llama"), mlp_ratio=0.4, criterion="sdmprune", calibration=ids, cold_start=0)
    steps = result.report["steps"]
    assert [step["stage"] for step in steps] == ["prune"] and steps[0]["alpha"] > 0
    assert result.masks.widths == [38, 38]  # 64 neurons, 40% removed in one distillation step
    with pytest.raises(SdmpruneError, match=r"--cold-start must be in \[0, 1\)"):
        prune(tiny_model("llama"), mlp_ratio=0.4, criterion="sdmprune", calibration=ids, cold_start=1)


def test_non_finite_loss_stops_the_run():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SdmpruneError, match="not finite"):
        prune(model, ratio=0.2, criterion="taylor", calibration=calibration())


def test_data_free_criteria_refuse_nothing_and_data_criteria_need_data():
    with pytest.raises(SdmpruneError, match="needs calibration data"):
        prune(tiny_model("llama"), ratio=0.2, criterion="wanda-sp")
