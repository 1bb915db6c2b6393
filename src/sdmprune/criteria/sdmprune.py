"""SDMPrune importance: first-order Taylor under the self-distillation loss (METHOD.md).

    s_i = mean_j  sum_n | g_gate[i,j]·W_gate[i,j] + g_up[i,j]·W_up[i,j] + g_down[j,i]·W_down[j,i] |

The three products are added at aligned positions before the absolute value, the absolute value is
taken per micro-batch n (batch size 1 in the official code), and the score is the mean over the hidden
index j. The loss is `(1-α)·CE + α·KL(softmax(z_t/T) || softmax(z_s))`; the plan runs a cold start with
α = 0 (cross-entropy) before the distillation stage.

Beyond the paper, `importance` scores in activation space instead, from the neuron's output a (the
down_proj input) and g = ∂L/∂a under the same loss, over calibration tokens t:
- `activation`: Σ_t |a_t·g_t|, the first-order estimate of the loss change from removing the neuron at t;
- `fisher`: Σ_t (a_t·g_t)², its empirical-Fisher second-order counterpart;
- `activation-wanda`: the geometric mean of `activation` and structured Wanda's ‖a‖₂·mean|W_down[:, i]|,
  which joins the distillation gradient with the activation statistics Wanda relies on;
- `weight-wanda`: the same geometric mean with the paper's weight-space Taylor score in place of `activation`
  (‖a‖₂ from the same passes);
- `auto`: not a score but a choice: the run scores, masks and refits with each of `AUTO_IMPORTANCES` in turn and
  keeps the one with the lower perplexity on held-out calibration windows (`sdmprune.selection`): the preset is the
  better selection on SmolLM2, the paper's on Qwen2.5-Coder-0.5B (README, Reconstruction).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..distributed import all_reduce_sum, gathered, is_sharded
from ..errors import SdmpruneError
from ..masks import ParameterCount
from ..options import described, registered
from ..teachers import TEACHERS, RunView, Teacher
from .gradients import (
    Distillation,
    activation_gradient_passes,
    gradients_on_mlp_only,
    loss_backward_passes,
    mlp_weights,
)
from .registry import CRITERIA, Criterion, ScoringContext, Step
from .wanda_sp import structured_wanda

ACTIVATION_IMPORTANCES = ("activation", "fisher", "activation-wanda")
WEIGHT_IMPORTANCES = ("weight", "weight-wanda")  # |.| of each micro-batch's weight gradients: not under FSDP
IMPORTANCES = ("activation-wanda", "weight", "activation", "fisher", "weight-wanda", "auto")
AUTO_IMPORTANCES = ("activation-wanda", "weight")  # what `auto` chooses between
# Official SDMPrune (α, T) per target ratio of total parameters (METHOD.md); the nearest is used.
OFFICIAL_DISTILLATION = {0.2: (0.4, 0.2), 0.3: (0.42, 0.5), 0.4: (0.1, 0.2)}


@CRITERIA.register("sdmprune")
@dataclass
class SDMPrune(Criterion):
    """SDMPrune: Taylor importance under the self-distillation loss, |.| per sample, mean over hidden"""

    alpha: float | None = field(default=None, metadata=described(
        "KL weight α (default: official value for the nearest of the 20/30/40 percent targets)"))
    temperature: float | None = field(default=None, metadata=described(
        "teacher temperature T (default: official value for the nearest ratio)"))
    cold_start: float = field(default=0.025, metadata=described(
        "fraction of MLP width pruned by the cross-entropy cold start (0: none, the distillation loss scores the "
        "dense model itself)"))
    importance: str = field(default="activation-wanda", metadata=described(
        "activation-wanda (the preset; one scoring, half auto's time) = geometric mean of the activation Taylor "
        "score and structured Wanda's | weight = the paper's weight-space Taylor (faithful SDMPrune) | "
        "activation = sum over tokens of |a*dL/da| at the neuron's output | fisher = sum over tokens of "
        "(a*dL/da)^2 | weight-wanda = geometric mean of the weight-space Taylor score and structured Wanda's | "
        "auto = run activation-wanda and weight (and the refit) in turn, keep the one with the lower perplexity on "
        "held-out calibration windows (the default of prune and compress: how often it kept the lower of the two "
        "is in the README, Reconstruction; 2x the scoring and refit time)",
        choices=IMPORTANCES))
    teacher: Teacher = registered(TEACHERS, "masks-off", "the teacher of the self-distillation loss")

    def validate(self) -> None:
        if not 0 <= self.cold_start < 1:
            raise SdmpruneError(f"--cold-start must be in [0, 1), got {self.cold_start}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise SdmpruneError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.temperature is not None and self.temperature <= 0:
            raise SdmpruneError(f"--temperature must be positive, got {self.temperature}")
        if self.importance not in IMPORTANCES:
            raise SdmpruneError(f"unknown importance '{self.importance}': choose {', '.join(IMPORTANCES)}")

    def distillation_settings(self, count: ParameterCount, target: float) -> dict[str, float]:
        """α and T: the options', else the official values for the target ratio nearest this one."""
        target_ratio = (sum(count.widths) - target) * count.per_neuron[0] / count.total
        alpha, temperature = OFFICIAL_DISTILLATION[min(OFFICIAL_DISTILLATION, key=lambda r: abs(r - target_ratio))]
        return {"alpha": alpha if self.alpha is None else self.alpha,
                "temperature": temperature if self.temperature is None else self.temperature}

    def plan(self, count: ParameterCount, target: float, steps: int) -> list[Step]:
        """A cross-entropy cold start removing `cold_start` of the width (none at 0), then `steps` distillation
        steps."""
        start = float(sum(count.widths))
        cold = start * (1 - self.cold_start)
        if cold <= target:
            raise SdmpruneError(f"--cold-start {self.cold_start} already reaches the target: lower it")
        self.teacher.check_steps(steps)
        settings = self.distillation_settings(count, target)
        cold_start = [Step("cold-start", cold, {"alpha": 0.0, "temperature": 1.0})] if self.cold_start > 0 else []
        return [*cold_start,
                *(Step("prune", cold + (target - cold) * k / steps, settings) for k in range(1, steps + 1))]

    def candidates(self) -> dict[str, Criterion]:
        if self.importance != "auto":
            return {self.importance: self}
        return {importance: replace(self, importance=importance) for importance in AUTO_IMPORTANCES}

    def attach(self, model: nn.Module, plan: list[Step], run: RunView) -> None:
        if any(step.settings.get("alpha", 0.0) > 0 for step in plan):
            self.teacher.attach(model, run)

    def score(self, context: ScoringContext, step: Step) -> list[torch.Tensor]:
        alpha, temperature = step.settings.get("alpha", 0.0), step.settings.get("temperature", 1.0)
        distillation = Distillation(self.teacher, alpha, temperature)
        description = f"sdmprune α={alpha:g} T={temperature:g}"
        if self.importance in ACTIVATION_IMPORTANCES:
            return self.activation_importance(context, description, distillation)
        if is_sharded(context.model):
            raise SdmpruneError(f"--importance {self.importance} takes |.| of each micro-batch's own weight gradient, "
                                "which FSDP sums over processes before anyone sees it: drop --fsdp, or use an "
                                f"activation-space importance ({', '.join(ACTIVATION_IMPORTANCES)}; activation-wanda "
                                "is the default)")
        weights = mlp_weights(context)
        scores = [torch.zeros(gate.shape[0], dtype=torch.float32, device=gate.device) for gate, _, _ in weights]
        wanda = self.importance == "weight-wanda"
        squares = [torch.zeros_like(score) for score in scores] if wanda else []
        with gradients_on_mlp_only(context.model, weights), (
                down_input_squares(context, squares) if wanda else nullcontext()):
            for _ in loss_backward_passes(context, description, distillation):
                with torch.no_grad():
                    for score, (gate, up, down) in zip(scores, weights, strict=True):
                        product = gate.grad * gate + up.grad * up + (down.grad * down).T  # (I, H)
                        score += product.float().abs().mean(dim=1)
                        for weight in (gate, up, down):
                            weight.grad = None
        all_reduce_sum(scores + squares)
        if not wanda:
            return scores
        return [(taylor * structured_wanda(down, sq.sqrt())).sqrt()
                for taylor, sq, (_, _, down) in zip(scores, squares, weights, strict=True)]

    def activation_importance(self, context: ScoringContext, description: str,
                              distillation: Distillation) -> list[torch.Tensor]:
        """Scores from one pass of (a, ∂L/∂a) pairs, per `importance` (see the module docstring)."""
        first_order, second_order, squares = (
            [torch.zeros(keep.numel(), dtype=torch.float32, device=keep.device) for keep in context.masks.keep]
            for _ in range(3)
        )
        for pairs in activation_gradient_passes(context, description, distillation):
            for layer, (a, g) in enumerate(pairs):  # (tokens, I) each
                product = a.float() * g.float()
                first_order[layer] += product.abs().sum(0)
                second_order[layer] += product.pow(2).sum(0)
                squares[layer] += a.float().pow(2).sum(0)
        all_reduce_sum(first_order + second_order + squares)  # sums over processes, before the nonlinear steps
        if self.importance == "activation":
            return first_order
        if self.importance == "fisher":
            return second_order
        architecture = context.masks.architecture
        downs = [architecture.projections(mlp)[2].weight for mlp in architecture.mlps(context.model)]
        return [(taylor * structured_wanda(gathered(down), sq.sqrt())).sqrt()
                for taylor, sq, down in zip(first_order, squares, downs, strict=True)]


@contextmanager
def down_input_squares(context: ScoringContext, squares: list[torch.Tensor]) -> Iterator[None]:
    """Inside the block, add Σ_t a_t² of each layer's down_proj input (the student's passes only) to the (I,)
    `squares`."""
    architecture = context.masks.architecture

    def accumulate(layer: int):
        def hook(module, args):
            if args[0].requires_grad:  # not the masks-off teacher's pass
                squares[layer] += args[0].detach().float().pow(2).flatten(0, -2).sum(0)

        return hook

    handles = [architecture.projections(mlp)[2].register_forward_pre_hook(accumulate(layer))
               for layer, mlp in enumerate(architecture.mlps(context.model))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
