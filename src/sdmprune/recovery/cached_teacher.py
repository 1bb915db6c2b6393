"""A teacher with no model in memory: the dense model's top-k next-token log-probabilities, computed once (before
pruning) over the recovery examples and stored beside the run.

For every target position of every example (a position whose next token is trained on) the file holds the k largest
teacher log-probabilities log softmax(z/T) and their token ids: 8·k bytes per target token (fp32 + int32), 512 B at
k = 64. The KL trained on lumps the tokens outside the teacher's top k into one outcome: it is the KL between the
(k+1)-outcome coarsenings of teacher p and student q (p's top k, then p's tail mass P = 1 − Σ_top-k p against q's
mass Q on the same other tokens),

    Σ_{i ∈ top-k} p_i (log p_i − log q_i) + P (log P − log Q),

a lower bound of the full KL(p ‖ q) (log-sum inequality) that ignores how q spreads its tail, exact when the top k
hold all of p (k = V).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..distributed import inference_context, is_main
from ..errors import SdmpruneError
from ..io import atomic_file
from ..runtime import autocast_context
from .data import IGNORE_INDEX, TokenizedData, collate
from .targets import TeacherOutput, TopKTargets


def top_k_kl(student_logits: torch.Tensor, targets: TopKTargets) -> torch.Tensor:
    """Per position (n,): the KL of the teacher's top-k (plus tail bucket) against softmax(student_logits) (n, V),
    computed in fp32; see the module docstring."""
    student = F.log_softmax(student_logits.float(), dim=-1)
    student_top = student.gather(1, targets.indices)
    teacher = targets.log_probs.float()
    kl = (teacher.exp() * (teacher - student_top)).sum(1)
    if targets.indices.shape[1] < student.shape[1]:  # a tail to lump
        teacher_tail = (1 - teacher.exp().sum(1)).clamp_min(0)
        student_tail = -torch.expm1(torch.logsumexp(student_top, 1))  # 1 − Σ_top-k q
        tiny = torch.finfo(student_tail.dtype).tiny
        kl = kl + torch.xlogy(teacher_tail, teacher_tail) - teacher_tail * student_tail.clamp_min(tiny).log()
    return kl


def cache_teacher(model: nn.Module, data: TokenizedData, path: Path, *, top_k: int, temperature: float, bf16: bool,
                  batch_size: int, pad_id: int) -> dict:
    """Run `model` (the dense teacher) over every example of `data` and write its top-k targets to `path`
    (safetensors, atomically): `log_probs` (N, k) fp32 and `indices` (N, k) int32 over the N target positions of
    all examples in order, `offsets` (examples + 1,) int64. Returns the file's description (also its metadata)."""
    device = next(model.parameters()).device
    log_probs, indices, counts = [], [], []
    order = range(0, len(data), batch_size)
    for start in tqdm(order, desc="teacher top-k", unit="batch", disable=not is_main()):
        batch = collate(data, list(range(start, min(start + batch_size, len(data)))), pad_id)
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        with inference_context(model), autocast_context(device, bf16):
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           use_cache=False).logits[:, :-1]
        teacher = F.log_softmax(logits[mask.to(device)].float() / temperature, dim=-1)
        if top_k > teacher.shape[-1]:
            raise SdmpruneError(f"--teacher-top-k {top_k} is more than the vocabulary ({teacher.shape[-1]}): lower it")
        values, ids = teacher.topk(top_k, dim=-1)
        log_probs.append(values.cpu())
        indices.append(ids.to(torch.int32).cpu())
        counts.append(mask.sum(1))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(counts).cumsum(0)])
    tensors = {"log_probs": torch.cat(log_probs).contiguous(), "indices": torch.cat(indices).contiguous(),
               "offsets": offsets}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    description = {"top_k": top_k, "temperature": temperature, "examples": len(data),
                   "target_tokens": int(offsets[-1]), "bytes": size, "bytes_per_token": 8 * top_k}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"description": json.dumps(description)})
    return description


class CachedTeacher:
    """The teacher targets of a batch's examples (`batch["example"]`, their indices in the data) from a cache file."""

    def __init__(self, path: Path, device: torch.device):
        tensors = load_file(str(path))
        self.log_probs, self.indices, self.offsets = tensors["log_probs"], tensors["indices"], tensors["offsets"]
        self.device = device

    def __call__(self, batch: dict[str, torch.Tensor], hidden: bool = False) -> TeacherOutput:
        """The batch's targets (no hidden states: the cache holds none)."""
        if hidden:
            raise SdmpruneError("the cached teacher holds no hidden states: --kd-hidden needs --recover-teacher live")
        rows = torch.cat([torch.arange(self.offsets[e], self.offsets[e + 1]) for e in batch["example"].tolist()])
        return TeacherOutput(TopKTargets(self.log_probs[rows].to(self.device),
                                         self.indices[rows].long().to(self.device)))
