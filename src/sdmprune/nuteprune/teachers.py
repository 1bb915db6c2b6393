"""Numerous teachers in one model: the dense model and snapshots of the student at lower sparsity.

The teacher is the student's own network. With the LoRA adapters disabled and every gate off it is
the original dense model; with the gates set to a snapshot's deterministic keep-mask and the LoRA
weights swapped for the snapshot's, it is the student as it was when its expected sparsity passed the
snapshot's level. A snapshot is N booleans and one copy of the LoRA weights: small next to the model,
which stays the only copy of the weights in memory.

Levels count in units of `snapshot_every` (level 0 = dense). Snapshots are recorded when the expected
sparsity first passes each level, up to `ratio - gap`: a sparser one could never be a teacher. The
schedule (NutePrune): while the target ramps up, the teacher is the snapshot `gap` less sparse than the
student; once the target is reached, the teacher walks back linearly to the dense model by the last step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..models.architectures import get_architecture
from .gates import StructureMasks


@contextmanager
def layer_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The output hidden states (B, S, H) of every decoder layer, appended in order by the forward
    passes run inside the block."""
    outputs: list[torch.Tensor] = []

    def record(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(record) for layer in get_architecture(model).decoder_layers(model)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class TeacherOutputs:
    logits: torch.Tensor  # (B, S, V)
    hidden: list[torch.Tensor]  # per decoder layer, (B, S, H)


@dataclass
class Snapshot:
    keep: torch.Tensor  # (N,) bool: the deterministic gates at the snapshot's level
    lora: dict[str, torch.Tensor]  # LoRA parameter name -> weights at the time


def teacher_level(step: int, sparsity: float, *, every: float, gap: float, ratio: float, warmup_steps: int,
                  total_steps: int) -> int:
    """The level (units of `every`, 0 = dense) the teacher of 0-based `step` should have, for a student of
    expected `sparsity` and a target ramping to `ratio` over `warmup_steps` of `total_steps`."""
    gap_levels = round(gap / every)
    if step < warmup_steps:
        return max(0, math.floor(sparsity / every + 1e-9) - gap_levels)
    start = max(0, math.floor(ratio / every + 1e-9) - gap_levels)
    progress = (step - warmup_steps + 1) / max(total_steps - warmup_steps, 1)
    return max(0, math.ceil(start * (1 - progress) - 1e-9))


class NumerousTeachers:
    """Snapshots of the student, and the same model run as the teacher of a given level."""

    def __init__(self, peft_model: nn.Module, masks: StructureMasks):
        self.peft_model = peft_model
        self.masks = masks
        self.lora = {name: p for name, p in peft_model.named_parameters() if "lora_" in name}
        self.snapshots: dict[int, Snapshot] = {}

    def record(self, levels: list[int], keeps: list[torch.Tensor]) -> None:
        """Snapshots at `levels` with their keep-masks, sharing one copy of the current LoRA weights."""
        lora = {name: p.detach().clone() for name, p in self.lora.items()}
        for level, keep in zip(levels, keeps, strict=True):
            self.snapshots[level] = Snapshot(keep.clone(), lora)

    def available(self, level: int) -> int:
        """The recorded level closest to `level` from below (0 = dense when none is)."""
        return max((k for k in self.snapshots if k <= level), default=0)

    @contextmanager
    def as_teacher(self, level: int) -> Iterator[None]:
        """Inside the block the model is the teacher of `level` (recorded, or 0 = dense), in eval mode;
        the student's gate values and LoRA weights are back afterwards."""
        training = self.peft_model.training
        self.peft_model.eval()
        try:
            if level == 0:
                with self.peft_model.disable_adapter(), self.masks.disabled():
                    yield
                return
            snapshot = self.snapshots[level]
            student = {name: p.detach().clone() for name, p in self.lora.items()}
            gate_values = self.masks.heads.keep, self.masks.neurons.keep
            with torch.no_grad():
                for name, p in self.lora.items():
                    p.copy_(snapshot.lora[name])
            self.masks.set(snapshot.keep)
            try:
                yield
            finally:
                self.masks.heads.keep, self.masks.neurons.keep = gate_values
                with torch.no_grad():
                    for name, p in self.lora.items():
                        p.copy_(student[name])
        finally:
            self.peft_model.train(training)

    def outputs(self, ids: torch.Tensor, level: int) -> TeacherOutputs:
        """Logits and per-layer hidden states of the teacher of `level` for ids (B, S), as constants."""
        with self.as_teacher(level), torch.inference_mode(), layer_outputs(self.peft_model.get_base_model()) as hidden:
            logits = self.peft_model(input_ids=ids, use_cache=False).logits
        return TeacherOutputs(logits.clone(), [h.clone() for h in hidden])  # ordinary tensors autograd may save

    def nbytes(self) -> int:
        """Memory held by the snapshots (shared LoRA copies counted once)."""
        seen, total = set(), 0
        for snapshot in self.snapshots.values():
            total += snapshot.keep.numel() * snapshot.keep.element_size()
            if id(snapshot.lora) not in seen:
                seen.add(id(snapshot.lora))
                total += sum(t.numel() * t.element_size() for t in snapshot.lora.values())
        return total
