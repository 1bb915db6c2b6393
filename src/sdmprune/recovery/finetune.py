"""LoRA recovery training: the config, the loss, the order of the data, and the training loop.

Loss per optimizer step, over the response tokens of its micro-batches (token-weighted):
plain `CE`, or with `kd` `(1-β)·CE + β·KL(softmax(z_t/T) || softmax(z_s))` (forward KL, temperature on the
teacher only, no T² factor), the teacher being the dense model run under inference mode, plus with `kd_hidden` γ
a hidden-state term γ·Σ_layers mean((h_s − h_t)²) / mean(h_t²) per target token.

`train` runs the steps on a model with LoRA attached (replicated by DDP or sharded by FSDP2 over several
processes); the recipe (`recipes/finetune.py`) loads, attaches, trains and writes. The run state (adapter,
optimizer, scheduler, every process's RNG, progress) is a `checkpoint.Checkpoint` in the output directory.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint, flatten_optimizer, prefixed, unflatten_optimizer
from ..config import LoraOptions, RuntimeOptions, TrainingOptions
from ..data.order import epoch_permutation
from ..distributed import (
    all_reduce_sum,
    gathered,
    inference_context,
    is_main,
    rank,
    shaped_like,
    shard,
    stack_from_all,
    world_size,
)
from ..errors import SdmpruneError
from ..losses import hidden_state_mse, kl_per_position
from ..options import described
from ..runtime import autocast_context
from .cached_teacher import top_k_kl
from .data import IGNORE_INDEX, TokenizedData, collate
from .targets import Teacher, TeacherOutput, TopKTargets


@dataclass
class RecoveryOptions:
    """recovery training"""

    weight_decay: float = field(default=0.05, metadata=described("AdamW weight decay"))
    warmup_steps: int = field(default=0, metadata=described("linear warm-up steps before the cosine decay"))
    epochs: int = field(default=2, metadata=described("passes over the data"))
    max_steps: int = field(default=0, metadata=described("optimizer steps to run instead of --epochs (0 = use epochs)"))
    batch_size: int = field(default=4, metadata=described("examples per forward pass"))
    grad_accum: int = field(default=4, metadata=described("forward passes per optimizer step"))
    max_len: int = field(default=512, metadata=described(
        "tokens per example: instruction prompt + response truncated to this, text cut into windows of this"))
    kd_beta: float = field(default=0.5, metadata=described(
        "KL weight β of the distillation loss (1-β)·CE + β·KL(softmax(z_t/T)||softmax(z_s))"))
    kd_temperature: float = field(default=1.0, metadata=described("teacher temperature T of the distillation loss"))
    kd_hidden: float = field(default=0.0, metadata=described(
        "weight γ of a hidden-state term added to the distillation loss: γ·Σ_layers mean((h_s − h_t)²) / mean(h_t²) "
        "over the non-padding tokens, the teacher's hidden states after every decoder layer (a live or copied "
        "teacher; 0 = off)"))
    lora: LoraOptions = field(default_factory=LoraOptions)
    training: TrainingOptions = field(default_factory=TrainingOptions)

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "max_len"):
            if getattr(self, name) < 1:
                raise SdmpruneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise SdmpruneError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if not 0 <= self.kd_beta <= 1:
            raise SdmpruneError(f"--kd-beta must be in [0, 1], got {self.kd_beta}")
        if not (math.isfinite(self.kd_hidden) and self.kd_hidden >= 0):
            raise SdmpruneError(f"--kd-hidden must be a finite number >= 0, got {self.kd_hidden}")
        if self.kd_temperature <= 0:
            raise SdmpruneError(f"--kd-temperature must be positive, got {self.kd_temperature}")


@dataclass
class FinetuneConfig:
    """recovery data and teacher"""

    data: str = field(metadata=described(
        "instruction data: an Alpaca .json/.jsonl file (instruction, input, output) or a hub dataset "
        "(lamini = MBZUAI/LaMini-instruction, alpaca-cleaned = yahma/alpaca-cleaned, or any id)"))
    max_samples: int = field(default=0, metadata=described("use only the first N examples (0 = all)"))
    kd: bool = field(default=False, metadata=described(
        "distil from the dense original too (see --kd-beta); holds one extra frozen inference copy of the "
        "teacher (no gradients, no optimizer state)"))
    teacher_model: str | None = field(default=None, metadata=described(
        "--kd: teacher model spec (default: source_model in the pruned directory's pruning.json)"))
    merge: bool = field(default=False, metadata=described(
        "also write merged/: the adapter merged into the weights, a standalone model directory"))
    recovery: RecoveryOptions = field(default_factory=RecoveryOptions)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)

    def validate(self) -> None:
        if self.max_samples < 0:
            raise SdmpruneError(f"--max-samples must be 0 or more, got {self.max_samples}")


def run_teacher(model: nn.Module, batch: dict[str, torch.Tensor], bf16: bool, hidden: bool) -> TeacherOutput:
    """`model`'s output on `batch` under inference mode, as ordinary tensors autograd may save (the caller sets
    the context that makes `model` the teacher: adapters or masks off)."""
    with inference_context(model), autocast_context(batch["input_ids"].device, bf16):
        result = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                       output_hidden_states=hidden)
        targets = result.logits[:, :-1][batch["labels"][:, 1:] != IGNORE_INDEX].clone()
        present = batch["attention_mask"].bool()
        states = [state[present].clone() for state in result.hidden_states[1:]] if hidden else None
    return TeacherOutput(targets, states)


def model_teacher(teacher: nn.Module, bf16: bool) -> Teacher:
    """A separate `teacher` model (`finetune --kd`)."""
    return lambda batch, hidden: run_teacher(teacher, batch, bf16, hidden)


def recovery_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | TopKTargets | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(CE sum, KL sum or None, n) over the n target positions of a batch.

    logits (B, S, V) predict labels[:, 1:] (B, S); positions labelled IGNORE_INDEX are left out.
    teacher_logits (n, V) are the teacher's at those positions; KL = KL(softmax(z_t/T) || softmax(z_s)). Cached
    top-k targets carry the teacher's temperature already (`cached_teacher.top_k_kl`).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    student = logits[:, :-1][mask].float()  # (n, V)
    ce = F.cross_entropy(student, targets[mask], reduction="sum")
    if teacher_logits is None:
        return ce, None, student.shape[0]
    if isinstance(teacher_logits, TopKTargets):
        return ce, top_k_kl(student, teacher_logits).sum(), student.shape[0]
    return ce, kl_per_position(student, teacher_logits, temperature).sum(), student.shape[0]


def accumulate_gradients(model, teacher: Teacher | None, batches: list[dict[str, torch.Tensor]], n_step: int,
                         options: RecoveryOptions, bf16: bool) -> tuple[float, float, float, int]:
    """Forward and backward this process's share of the micro-batches of one optimizer step, the loss
    normalised by the step's `n_step` response tokens (of every process) so that the gradients summed over
    processes are the single-process ones; returns the summed CE, KL and hidden-state terms (the last per target
    token: n × the batch's mean) and the non-padding tokens seen, over all processes. Fillers (a zero loss) give
    every process as many passes."""
    device = next(model.parameters()).device
    beta = options.kd_beta if teacher is not None else 0.0
    hidden = teacher is not None and options.kd_hidden > 0
    ddp = isinstance(model, DistributedDataParallel)
    scale = world_size() / n_step if ddp else 1 / n_step  # DDP averages gradients over processes: undo it
    totals = torch.zeros(4, dtype=torch.float64)  # CE, KL, hidden, tokens
    passes = shard(batches, lockstep=True)
    for index, (_, batch, counts) in enumerate(passes):
        batch = {k: v.to(device) for k, v in batch.items()}
        with model.no_sync() if ddp and index < len(passes) - 1 else nullcontext():  # DDP: one all-reduce
            target = teacher(batch, hidden) if teacher is not None else None
            with autocast_context(device, bf16):
                result = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False, output_hidden_states=hidden)
            ce, kl, n = recovery_loss_sums(result.logits, batch["labels"], None if target is None else target.targets,
                                           options.kd_temperature)
            loss = ce if kl is None else (1 - beta) * ce + beta * kl
            matching = torch.zeros(())
            if hidden:
                present = batch["attention_mask"].bool()
                matching = n * hidden_state_mse([state[present] for state in result.hidden_states[1:]],
                                                target.hidden, normalise=True)
                loss = loss + options.kd_hidden * matching
            (loss * (scale if counts else 0.0)).backward()
        if counts:
            totals += torch.tensor([ce.item(), kl.item() if kl is not None else 0.0, matching.item(),
                                    int(batch["attention_mask"].sum())], dtype=torch.float64)
    all_reduce_sum([totals])
    return totals[0].item(), totals[1].item(), totals[2].item(), int(totals[3])


class Schedule:
    """Which examples each optimizer step sees: micro-batch m of the run is slot m % B of epoch m // B
    (B micro-batches per epoch), each epoch a permutation seeded by (seed, epoch), so a resumed run sees
    exactly the batches the uninterrupted one would."""

    def __init__(self, n_examples: int, config: RecoveryOptions, seed: int):
        self.n, self.config, self.seed = n_examples, config, seed
        self.per_epoch = math.ceil(n_examples / config.batch_size)
        if config.max_steps:
            self.steps, self.micro_batches = config.max_steps, config.max_steps * config.grad_accum
        else:
            self.micro_batches = config.epochs * self.per_epoch
            self.steps = math.ceil(self.micro_batches / config.grad_accum)
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_permutation(self.n, self.seed, epoch)
        return self._order

    def step_batches(self, step: int) -> list[list[int]]:
        """Example indices of the micro-batches of optimizer step `step` (0-based)."""
        size, accum = self.config.batch_size, self.config.grad_accum
        batches = []
        for m in range(step * accum, min((step + 1) * accum, self.micro_batches)):
            slot = m % self.per_epoch
            batches.append(self._permutation(m // self.per_epoch)[slot * size:(slot + 1) * size].tolist())
        return batches


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The LoRA weights by parameter name, whole and on the CPU (gathered if FSDP sharded them)."""
    return {name: gathered(param).detach().cpu().contiguous()
            for name, param in model.named_parameters() if param.requires_grad}


def save_training_state(checkpoint: Checkpoint, settings: dict, model, optimizer, scheduler, step: int, log: list,
                        seconds: float) -> None:
    """Adapter, optimizer, scheduler, RNG (one row per process) and progress. Every process calls it."""
    tensors = {f"adapter.{k}": v for k, v in trainable_state(model).items()}
    optimizer_tensors, optimizer_meta = flatten_optimizer(optimizer)
    tensors |= {f"optimizer.{k}": v for k, v in optimizer_tensors.items()}
    tensors["rng.cpu"] = stack_from_all(torch.get_rng_state())
    if torch.cuda.is_available():
        tensors["rng.cuda"] = stack_from_all(torch.cuda.get_rng_state())
    progress = {"step": step, "seconds": seconds, "log": log, "optimizer": optimizer_meta,
                "scheduler": scheduler.state_dict(), "processes": world_size()}
    checkpoint.save(settings, progress, tensors)


def load_training_state(checkpoint: Checkpoint, settings: dict, model, optimizer, scheduler
                        ) -> tuple[int, list, float]:
    """Restore the saved state into model/optimizer/scheduler and the RNG; returns (step, log, seconds)."""
    progress, tensors = checkpoint.load(settings)
    if progress["processes"] != world_size():
        raise SdmpruneError(f"cannot resume {checkpoint.directory} with {world_size()} process(es): it was run with "
                            f"{progress['processes']}; launch as many")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    saved = prefixed(tensors, "adapter.")
    with torch.no_grad():
        for name, param in trainable:
            param.copy_(shaped_like(saved[name], param))
    optimizer_state = unflatten_optimizer(prefixed(tensors, "optimizer."), progress["optimizer"])
    for index, entries in optimizer_state["state"].items():  # moments are sharded like their parameters
        param = trainable[index][1]
        for key, value in entries.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                entries[key] = shaped_like(value, param)
    optimizer.load_state_dict(optimizer_state)  # which moves the rest to their parameters' devices
    scheduler.load_state_dict(progress["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"][rank()].clone())  # a copy: set_rng_state crashes on a view with an offset
    if "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"][rank()].clone())
    return progress["step"], progress["log"], progress["seconds"]


def train(peft_model, teacher: Teacher | None, data: TokenizedData, pad_id: int, config: RecoveryOptions,
          runtime: RuntimeOptions, checkpoint: Checkpoint, settings: dict, *, resume: bool, progress: bool = True,
          keep_final_state: bool = False) -> dict:
    """Run every optimizer step on `peft_model` (LoRA attached; sharded or not), resuming from `checkpoint`
    if asked (`keep_final_state`: also after the last step, so a later stage's resume finds the trained
    adapter); returns {"log", "tokens", "target_tokens", "seconds", "steps", "epochs"}."""
    from transformers import get_cosine_schedule_with_warmup

    torch_device = next(peft_model.parameters()).device
    sharded = any(type(m).__name__.startswith("FSDP") for m in peft_model.modules())
    replicated = world_size() > 1 and not sharded  # DDP: one all-reduce of the LoRA gradients per step
    device_ids = [torch_device.index] if torch_device.type == "cuda" else None
    train_model = DistributedDataParallel(peft_model, device_ids=device_ids) if replicated else peft_model
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.training.lr, weight_decay=config.weight_decay)
    schedule = Schedule(len(data), config, runtime.seed)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, schedule.steps)
    start, log, seconds_before = 0, [], 0.0
    if resume:
        start, log, seconds_before = load_training_state(checkpoint, settings, peft_model, optimizer, scheduler)

    tokens = log[-1]["tokens"] if log else 0
    target_tokens = log[-1]["target_tokens"] if log else 0
    beta = config.kd_beta if teacher is not None else 0.0
    started = time.perf_counter()
    bar = tqdm(total=schedule.steps, initial=start, desc="finetune", unit="step", disable=not (progress and is_main()))
    for step in range(start, schedule.steps):
        batches = [collate(data, indices, pad_id) for indices in schedule.step_batches(step)]
        n_step = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        lr = scheduler.get_last_lr()[0]
        ce_total, kl_total, hidden_total, step_tokens = accumulate_gradients(train_model, teacher, batches, n_step,
                                                                               config, runtime.bf16)
        tokens += step_tokens
        if config.training.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.training.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        target_tokens += n_step
        matching = config.kd_hidden * hidden_total if teacher is not None else 0.0
        entry = {"step": step + 1, "loss": ((1 - beta) * ce_total + beta * kl_total + matching) / n_step, "lr": lr,
                 "tokens": tokens, "target_tokens": target_tokens}
        if teacher is not None:
            entry |= {"ce": ce_total / n_step, "kl": kl_total / n_step}
        if matching:
            entry["hidden"] = hidden_total / n_step
        log.append(entry)
        elapsed = seconds_before + time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{tokens / elapsed:.0f}")
        every = config.training.save_every
        last = step + 1 == schedule.steps
        if (every and (step + 1) % every == 0 and not last) or (keep_final_state and last):
            save_training_state(checkpoint, settings, peft_model, optimizer, scheduler, step + 1, log, elapsed)
    bar.close()
    return {"log": log, "tokens": tokens, "target_tokens": target_tokens, "steps": schedule.steps,
            "epochs": schedule.micro_batches / schedule.per_epoch,
            "seconds": seconds_before + time.perf_counter() - started}
