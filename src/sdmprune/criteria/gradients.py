"""Backward passes over calibration windows: gradients on the MLP weights only, or on activations only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import is_main
from ..errors import SdmpruneError
from ..losses import self_distillation_loss
from ..runtime import autocast_context
from ..teachers import Teacher
from .registry import ScoringContext

MLPWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # W_gate (I, H), W_up (I, H), W_down (H, I)


def mlp_weights(context: ScoringContext) -> list[MLPWeights]:
    architecture = context.masks.architecture
    return [
        tuple(linear.weight for linear in architecture.projections(mlp))
        for mlp in architecture.mlps(context.model)
    ]


@contextmanager
def gradients_on_mlp_only(model: nn.Module, weights: list[MLPWeights]) -> Iterator[None]:
    """Only MLP weights (none if `weights` is empty) require grad inside the block (activations still carry
    gradients through attention); grads are cleared and the previous flags restored afterwards."""
    previous = {param: param.requires_grad for param in model.parameters()}
    model.requires_grad_(False)
    for triple in weights:
        for weight in triple:
            weight.requires_grad_(True)
            weight.grad = None
    try:
        yield
    finally:
        for param, flag in previous.items():
            param.requires_grad_(flag)
            param.grad = None


@dataclass(frozen=True)
class Distillation:
    """The self-distillation term of the loss: `(1-α)·CE + α·KL(softmax(z_t/T) || softmax(z_s))`."""

    teacher: Teacher
    alpha: float
    temperature: float


def loss_backward_passes(
    context: ScoringContext, description: str, distillation: Distillation | None = None
) -> Iterator[int]:
    """For each micro-batch of this process's calibration windows: forward, loss (cross-entropy, or the
    self-distillation loss with `distillation`), backward.

    Yields the micro-batch's window count after its backward, with the gradients in `.grad`
    (accumulated across micro-batches unless the caller clears them). Stops on a non-finite loss.
    A filler pass (FSDP lockstep) backpropagates a zero loss and yields nothing.
    """
    device = next(context.model.parameters()).device
    for batch in tqdm(context.micro_batches(), desc=description, unit="batch", leave=False, disable=not is_main()):
        ids = batch.ids.to(device)
        with autocast_context(device, context.bf16):
            alpha = distillation.alpha if distillation is not None else 0.0
            teacher_logits = distillation.teacher.logits(ids) if alpha > 0 else None
            logits = context.model(input_ids=ids, use_cache=False).logits
        temperature = distillation.temperature if distillation is not None else 1.0
        loss = self_distillation_loss(logits, teacher_logits, ids, alpha, temperature)
        if not torch.isfinite(loss):
            raise SdmpruneError(
                f"{description}: the loss is not finite ({loss.item()}); the model or calibration data produce "
                "inf/nan (try float32 weights, no --bf16, or other calibration text)"
            )
        if not batch.counts:
            (loss * 0).backward()
            continue
        loss.backward()
        yield ids.shape[0]


def activation_gradient_passes(
    context: ScoringContext, description: str, distillation: Distillation | None = None
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per micro-batch, per layer: the down_proj input `a` and `∂L/∂a`, both (tokens, I).

    `a` is each neuron's output (after the masks). No parameter gradient is computed: the only leaf
    requiring grad is the embeddings' output, so the backward pass costs about a third less than
    one with weight gradients.
    """
    architecture = context.masks.architecture
    model = context.model
    downs = [architecture.projections(mlp)[2] for mlp in architecture.mlps(model)]
    captured: list[torch.Tensor | None] = [None] * len(downs)

    def capture(layer: int):
        def hook(module, args):
            if args[0].requires_grad:  # not the masks-off teacher's pass
                args[0].retain_grad()
                captured[layer] = args[0]

        return hook

    def embeddings_require_grad(module, args, output):
        return output.detach().requires_grad_(True)

    handles = [down.register_forward_pre_hook(capture(layer)) for layer, down in enumerate(downs)]
    handles.append(model.get_input_embeddings().register_forward_hook(embeddings_require_grad))
    try:
        with gradients_on_mlp_only(model, []):
            for _ in loss_backward_passes(context, description, distillation):
                yield [(a.detach().flatten(0, -2), a.grad.flatten(0, -2)) for a in captured]
    finally:
        for handle in handles:
            handle.remove()
