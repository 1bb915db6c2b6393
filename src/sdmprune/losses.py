"""Losses used to score neurons: next-token cross-entropy and the SDMPrune self-distillation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, S, V) predicting ids[:, 1:] (B, S)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def kl_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(z_t / T) || softmax(z_s)) summed over the vocabulary (last dim): logits (..., V) -> (...).

    Forward KL, temperature on the teacher only, no T² factor; computed in fp32.
    """
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over predicting positions of `kl_per_position`; logits (B, S, V)."""
    return kl_per_position(student_logits[:, :-1], teacher_logits[:, :-1], temperature).mean()


def self_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    ids: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """`(1 - α)·CE + α·KL(softmax(z_t/T) || softmax(z_s))`; α = 0 is plain cross-entropy (no teacher needed)."""
    ce = next_token_ce(student_logits, ids)
    if alpha == 0.0:
        return ce
    return (1 - alpha) * ce + alpha * distillation_kl(student_logits, teacher_logits, temperature)
