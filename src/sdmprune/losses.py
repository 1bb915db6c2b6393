"""Losses: next-token cross-entropy, the SDMPrune self-distillation loss, and NutePrune's distillation terms."""

from __future__ import annotations

from collections.abc import Sequence

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


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation loss `T²·KL(softmax(z_t/T) || softmax(z_s/T))`, mean over positions; logits (B, S, V).

    The temperature divides both sides here, and T² keeps the gradient scale independent of T.
    """
    student = student_logits.float() / temperature
    return temperature**2 * kl_per_position(student, teacher_logits, temperature).mean()


def hidden_state_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], normalise: bool) -> torch.Tensor:
    """`Σ_layers mean((h_s - h_t)²)` over per-layer hidden states (B, S, H), in fp32.

    With `normalise`, each layer's term is divided by the teacher's `mean(h_t²)` there: a relative error,
    so layers (and models) whose residual streams differ in scale count alike.
    """
    total = torch.zeros((), device=student[0].device)
    for s, t in zip(student, teacher, strict=True):
        t = t.float()
        error = (s.float() - t).pow(2).mean()
        total = total + (error / t.pow(2).mean().clamp_min(1e-12) if normalise else error)
    return total
