"""SDMPrune importance: first-order Taylor under the self-distillation loss (METHOD.md).

    s_i = mean_j  sum_n | g_gate[i,j]·W_gate[i,j] + g_up[i,j]·W_up[i,j] + g_down[j,i]·W_down[j,i] |

The three products are added at aligned positions before the absolute value, the absolute value is
taken per micro-batch n (batch size 1 in the official code), and the score is the mean over the hidden
index j. The loss is `(1-α)·CE + α·KL(softmax(z_t/T) || softmax(z_s))`; the schedule runs a cold start
with α = 0 before the distillation stage (see schedule.py).
"""

from __future__ import annotations

import torch

from . import ScoringContext, register_criterion
from .gradients import gradients_on_mlp_only, loss_backward_passes, mlp_weights


@register_criterion("sdmprune", needs_calibration=True)
def sdmprune(context: ScoringContext) -> list[torch.Tensor]:
    """SDMPrune: Taylor importance under the self-distillation loss, |.| per sample, mean over hidden."""
    weights = mlp_weights(context)
    scores = [torch.zeros(gate.shape[0], dtype=torch.float32, device=gate.device) for gate, _, _ in weights]
    with gradients_on_mlp_only(context.model, weights):
        for _ in loss_backward_passes(context, f"sdmprune α={context.alpha:g} T={context.temperature:g}"):
            with torch.no_grad():
                for score, (gate, up, down) in zip(scores, weights, strict=True):
                    product = gate.grad * gate + up.grad * up + (down.grad * down).T  # (I, H)
                    score += product.float().abs().mean(dim=1)
                    for weight in (gate, up, down):
                        weight.grad = None
    return scores
