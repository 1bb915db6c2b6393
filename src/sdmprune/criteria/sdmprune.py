"""SDMPrune importance: first-order Taylor under the self-distillation loss (METHOD.md).

    s_i = mean_j  sum_n | g_gate[i,j]·W_gate[i,j] + g_up[i,j]·W_up[i,j] + g_down[j,i]·W_down[j,i] |

The three products are added at aligned positions before the absolute value, the absolute value is
taken per micro-batch n (batch size 1 in the official code), and the score is the mean over the hidden
index j. The loss is `(1-α)·CE + α·KL(softmax(z_t/T) || softmax(z_s))`; the schedule runs a cold start
with α = 0 before the distillation stage (see schedule.py).

Beyond the paper, `importance` scores in activation space instead, from the neuron's output a (the
down_proj input) and g = ∂L/∂a under the same loss, over calibration tokens t:
- `activation`: Σ_t |a_t·g_t|, the first-order estimate of the loss change from removing the neuron at t;
- `fisher`: Σ_t (a_t·g_t)², its empirical-Fisher second-order counterpart;
- `activation-wanda`: the geometric mean of `activation` and structured Wanda's ‖a‖₂·mean|W_down[:, i]|,
  which joins the distillation gradient with the activation statistics Wanda relies on.
"""

from __future__ import annotations

import torch

from ..distributed import all_reduce_sum, gathered, is_sharded
from ..errors import SdmpruneError
from . import ScoringContext, register_criterion
from .gradients import activation_gradient_passes, gradients_on_mlp_only, loss_backward_passes, mlp_weights
from .wanda_sp import structured_wanda

ACTIVATION_IMPORTANCES = ("activation", "fisher", "activation-wanda")
IMPORTANCES = ("activation-wanda", "weight", "activation", "fisher")


def activation_importance(context: ScoringContext, description: str) -> list[torch.Tensor]:
    """Scores from one pass of (a, ∂L/∂a) pairs, per `context.importance` (see the module docstring)."""
    first_order, second_order, squares = (
        [torch.zeros(keep.numel(), dtype=torch.float32, device=keep.device) for keep in context.masks.keep]
        for _ in range(3)
    )
    for pairs in activation_gradient_passes(context, description):
        for layer, (a, g) in enumerate(pairs):  # (tokens, I) each
            product = a.float() * g.float()
            first_order[layer] += product.abs().sum(0)
            second_order[layer] += product.pow(2).sum(0)
            squares[layer] += a.float().pow(2).sum(0)
    all_reduce_sum(first_order + second_order + squares)  # sums over processes, before the nonlinear steps
    if context.importance == "activation":
        return first_order
    if context.importance == "fisher":
        return second_order
    architecture = context.masks.architecture
    downs = [architecture.projections(mlp)[2].weight for mlp in architecture.mlps(context.model)]
    return [(taylor * structured_wanda(gathered(down), sq.sqrt())).sqrt()
            for taylor, sq, down in zip(first_order, squares, downs, strict=True)]


@register_criterion("sdmprune", needs_calibration=True)
def sdmprune(context: ScoringContext) -> list[torch.Tensor]:
    """SDMPrune: Taylor importance under the self-distillation loss, |.| per sample, mean over hidden."""
    description = f"sdmprune α={context.alpha:g} T={context.temperature:g}"
    if context.importance in ACTIVATION_IMPORTANCES:
        return activation_importance(context, description)
    if is_sharded(context.model):
        raise SdmpruneError("--importance weight takes |.| of each micro-batch's own weight gradient, which FSDP "
                            "sums over processes before anyone sees it: drop --fsdp, or use an activation-space "
                            f"importance ({', '.join(ACTIVATION_IMPORTANCES)}; activation-wanda is the default)")
    weights = mlp_weights(context)
    scores = [torch.zeros(gate.shape[0], dtype=torch.float32, device=gate.device) for gate, _, _ in weights]
    with gradients_on_mlp_only(context.model, weights):
        for _ in loss_backward_passes(context, description):
            with torch.no_grad():
                for score, (gate, up, down) in zip(scores, weights, strict=True):
                    product = gate.grad * gate + up.grad * up + (down.grad * down).T  # (I, H)
                    score += product.float().abs().mean(dim=1)
                    for weight in (gate, up, down):
                        weight.grad = None
    all_reduce_sum(scores)
    return scores
