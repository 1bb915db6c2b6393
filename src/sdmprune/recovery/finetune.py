"""LoRA recovery of a pruned model on instruction data, optionally distilling from the dense original.

    record = finetune("runs/p20", "runs/p20-lora", FinetuneConfig(data="alpaca_data_1k.json", merge=True))

Loss per optimizer step, over the response tokens of its micro-batches (token-weighted):
plain `CE`, or with `kd` `(1-β)·CE + β·KL(softmax(z_t/T) || softmax(z_s))` (forward KL, temperature on the
teacher only, no T² factor), the teacher being a frozen copy of the dense model run under inference mode.

The output directory holds the adapter (`adapter_model.safetensors`, `adapter_config.json`), `recovery.json`,
`loss.json`, `loss.png` and, with `merge`, `merged/`: a standalone model directory. During the run it holds
`checkpoint/` (adapter, optimizer, scheduler, RNG, step; safetensors + JSON), from which `resume` continues.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..distributed import (
    all_reduce_sum,
    barrier,
    gathered,
    inference_context,
    is_main,
    rank,
    shaped_like,
    shard,
    shard_model,
    stack_from_all,
    world_size,
)
from ..errors import SdmpruneError
from ..io import atomic_directory, check_output_dir, flatten_optimizer, unflatten_optimizer
from ..losses import kl_per_position
from ..models import load_model
from ..options import described
from ..runtime import autocast_context, context_length, library_versions
from .data import IGNORE_INDEX, TokenizedData, collate, load_instructions, tokenize_dataset

CHECKPOINT_DIR, RECORD = "checkpoint", "recovery.json"
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class FinetuneConfig:
    """Settings of a recovery run; each field's help is the CLI's help (`--field-name`)."""

    data: str = field(metadata=described(
        "instruction data: an Alpaca .json/.jsonl file (instruction, input, output) or a hub dataset "
        "(lamini = MBZUAI/LaMini-instruction, alpaca-cleaned = yahma/alpaca-cleaned, or any id)"))
    max_samples: int = field(default=0, metadata=described("use only the first N examples (0 = all)"))
    lora_r: int = field(default=8, metadata=described("LoRA rank"))
    lora_alpha: float = field(default=16.0, metadata=described("LoRA alpha (the update is scaled by alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=described("dropout on the LoRA input"))
    lora_targets: str = field(default=LORA_TARGETS, metadata=described("comma-separated module names that get LoRA"))
    lr: float = field(default=1e-4, metadata=described("peak learning rate (AdamW, cosine decay to 0)"))
    weight_decay: float = field(default=0.05, metadata=described("AdamW weight decay"))
    warmup_steps: int = field(default=0, metadata=described("linear warm-up steps before the cosine decay"))
    max_grad_norm: float = field(default=1.0, metadata=described("clip the gradient norm to this (0 = no clipping)"))
    epochs: int = field(default=2, metadata=described("passes over the data"))
    max_steps: int = field(default=0, metadata=described("optimizer steps to run instead of --epochs (0 = use epochs)"))
    batch_size: int = field(default=4, metadata=described("examples per forward pass"))
    grad_accum: int = field(default=4, metadata=described("forward passes per optimizer step"))
    max_len: int = field(default=512, metadata=described("truncate prompt + response to this many tokens"))
    bf16: bool = field(default=False, metadata=described("bf16 autocast for forward passes (CPU and GPU)"))
    seed: int = field(default=0, metadata=described("seed for the LoRA init, data order and dropout"))
    kd: bool = field(default=False, metadata=described(
        "distil from the dense original too: (1-β)·CE + β·KL(softmax(z_t/T)||softmax(z_s)); holds one extra "
        "frozen inference copy of the teacher (no gradients, no optimizer state)"))
    kd_beta: float = field(default=0.5, metadata=described("--kd: KL weight β"))
    kd_temperature: float = field(default=1.0, metadata=described("--kd: teacher temperature T"))
    teacher_model: str | None = field(default=None, metadata=described(
        "--kd: teacher model spec (default: source_model in the pruned directory's pruning.json)"))
    save_every: int = field(default=100, metadata=described("write a resumable checkpoint every N steps (0 = never)"))
    merge: bool = field(default=False, metadata=described(
        "also write merged/: the adapter merged into the weights, a standalone model directory"))
    fsdp: bool = field(default=False, metadata=described(
        "several processes (torchrun / accelerate launch): shard the model, its LoRA weights and the --kd teacher "
        "with FSDP2 instead of replicating them (DDP)"))

    def validate(self) -> None:
        for name in ("lora_r", "epochs", "batch_size", "grad_accum", "max_len"):
            if getattr(self, name) < 1:
                raise SdmpruneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_samples", "max_steps", "warmup_steps", "save_every"):
            if getattr(self, name) < 0:
                raise SdmpruneError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.lr <= 0:
            raise SdmpruneError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.lora_dropout < 1:
            raise SdmpruneError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.kd_beta <= 1:
            raise SdmpruneError(f"--kd-beta must be in [0, 1], got {self.kd_beta}")
        if self.kd_temperature <= 0:
            raise SdmpruneError(f"--kd-temperature must be positive, got {self.kd_temperature}")
        if not self.lora_targets.strip(","):
            raise SdmpruneError("--lora-targets names no module: give e.g. q_proj,v_proj")


def recovery_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(CE sum, KL sum or None, n) over the n response positions of a batch.

    logits (B, S, V) predict labels[:, 1:] (B, S); positions labelled IGNORE_INDEX are left out.
    teacher_logits (n, V) are the teacher's at those positions; KL = KL(softmax(z_t/T) || softmax(z_s)).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    student = logits[:, :-1][mask].float()  # (n, V)
    ce = F.cross_entropy(student, targets[mask], reduction="sum")
    if teacher_logits is None:
        return ce, None, student.shape[0]
    return ce, kl_per_position(student, teacher_logits, temperature).sum(), student.shape[0]


def _teacher_logits(teacher, batch: dict[str, torch.Tensor], bf16: bool) -> torch.Tensor:
    """Teacher logits (n, V) at the response positions of `batch`, an ordinary tensor autograd may save."""
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    with inference_context(teacher), autocast_context(batch["input_ids"].device, bf16):
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         use_cache=False).logits[:, :-1][mask]
    return logits.clone()


def _accumulate_gradients(model, teacher, batches: list[dict[str, torch.Tensor]], n_step: int,
                          config: FinetuneConfig) -> tuple[float, float, int]:
    """Forward and backward this process's share of the micro-batches of one optimizer step, the loss
    normalised by the step's `n_step` response tokens (of every process) so that the gradients summed over
    processes are the single-process ones; returns the summed CE and KL (nats) and the non-padding tokens
    seen, over all processes. Fillers (a zero loss) give every process as many passes."""
    device = next(model.parameters()).device
    beta = config.kd_beta if teacher is not None else 0.0
    ddp = isinstance(model, DistributedDataParallel)
    scale = world_size() / n_step if ddp else 1 / n_step  # DDP averages gradients over processes: undo it
    totals = torch.zeros(3, dtype=torch.float64)  # CE, KL, tokens
    passes = shard(batches, lockstep=True)
    for index, (_, batch, counts) in enumerate(passes):
        batch = {k: v.to(device) for k, v in batch.items()}
        with model.no_sync() if ddp and index < len(passes) - 1 else nullcontext():  # DDP: one all-reduce
            teacher_logits = _teacher_logits(teacher, batch, config.bf16) if teacher is not None else None
            with autocast_context(device, config.bf16):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
            ce, kl, _ = recovery_loss_sums(logits, batch["labels"], teacher_logits, config.kd_temperature)
            loss = ce if kl is None else (1 - beta) * ce + beta * kl
            (loss * (scale if counts else 0.0)).backward()
        if counts:
            totals += torch.tensor([ce.item(), kl.item() if kl is not None else 0.0,
                                    int(batch["attention_mask"].sum())], dtype=torch.float64)
    all_reduce_sum([totals])
    return totals[0].item(), totals[1].item(), int(totals[2])


def _model_ref(spec: str) -> str:
    """How the adapter names its base: an absolute path for a local directory, else the spec itself."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _source_record(spec: str) -> dict | None:
    path = Path(spec).expanduser() / "pruning.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _teacher_spec(config: FinetuneConfig, source: dict | None) -> str:
    if config.teacher_model:
        return config.teacher_model
    if source and source.get("source_model"):
        return source["source_model"]
    raise SdmpruneError("--kd needs a teacher: the model has no pruning.json naming its source_model, so pass "
                        "--teacher-model (the dense original)")


class Schedule:
    """Which examples each optimizer step sees: micro-batch m of the run is slot m % B of epoch m // B
    (B micro-batches per epoch), each epoch a permutation seeded by (seed, epoch), so a resumed run sees
    exactly the batches the uninterrupted one would."""

    def __init__(self, n_examples: int, config: FinetuneConfig):
        self.n, self.config = n_examples, config
        self.per_epoch = math.ceil(n_examples / config.batch_size)
        if config.max_steps:
            self.steps, self.micro_batches = config.max_steps, config.max_steps * config.grad_accum
        else:
            self.micro_batches = config.epochs * self.per_epoch
            self.steps = math.ceil(self.micro_batches / config.grad_accum)
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.n, generator=generator)
        return self._order

    def step_batches(self, step: int) -> list[list[int]]:
        """Example indices of the micro-batches of optimizer step `step` (0-based)."""
        size, accum = self.config.batch_size, self.config.grad_accum
        batches = []
        for m in range(step * accum, min((step + 1) * accum, self.micro_batches)):
            slot = m % self.per_epoch
            batches.append(self._permutation(m // self.per_epoch)[slot * size:(slot + 1) * size].tolist())
        return batches


# ----------------------------------------------------------------------------- checkpoints


def _trainable_state(model) -> dict[str, torch.Tensor]:
    """The LoRA weights by parameter name, whole and on the CPU (gathered if FSDP sharded them)."""
    return {name: gathered(param).detach().cpu().contiguous()
            for name, param in model.named_parameters() if param.requires_grad}


def _save_checkpoint(directory: Path, model, optimizer, scheduler, step: int, log: list, seconds: float,
                     run: dict) -> None:
    """Write `directory` atomically: adapter, optimizer, scheduler, RNG (one row per process) and progress
    (safetensors + JSON). Every process calls it; rank 0 writes."""
    adapter = _trainable_state(model)
    optimizer_tensors, optimizer_meta = flatten_optimizer(optimizer)
    rng = {"cpu": stack_from_all(torch.get_rng_state())}
    if torch.cuda.is_available():
        rng["cuda"] = stack_from_all(torch.cuda.get_rng_state())
    if is_main():
        with atomic_directory(directory, overwrite=True) as tmp:
            save_file(adapter, tmp / "adapter.safetensors")
            save_file(optimizer_tensors, tmp / "optimizer.safetensors")
            save_file(rng, tmp / "rng.safetensors")
            state = {"run": run, "step": step, "seconds": seconds, "log": log, "optimizer": optimizer_meta,
                     "scheduler": scheduler.state_dict()}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
    barrier()


def _load_checkpoint(directory: Path, model, optimizer, scheduler, run: dict) -> tuple[int, list, float]:
    """Restore a checkpoint into model/optimizer/scheduler and the RNG; returns (step, log, seconds)."""
    state = json.loads((directory / "state.json").read_text())
    if state["run"] != run:
        changed = sorted(k for k in run if state["run"].get(k) != run[k])
        raise SdmpruneError(f"cannot resume {directory.parent}: the settings differ from the interrupted run's "
                            f"({', '.join(changed)}); use the same command, or --overwrite to start over")
    rng = load_file(directory / "rng.safetensors")
    if rng["cpu"].shape[0] != world_size():
        raise SdmpruneError(f"cannot resume {directory.parent} with {world_size()} process(es): it was run with "
                            f"{rng['cpu'].shape[0]}; launch as many")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    saved = load_file(directory / "adapter.safetensors")
    with torch.no_grad():
        for name, param in trainable:
            param.copy_(shaped_like(saved[name], param))
    optimizer_state = unflatten_optimizer(load_file(directory / "optimizer.safetensors"), state["optimizer"])
    for index, entries in optimizer_state["state"].items():  # moments are sharded like their parameters
        param = trainable[index][1]
        for key, value in entries.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                entries[key] = shaped_like(value, param)
    optimizer.load_state_dict(optimizer_state)  # which moves the rest to their parameters' devices
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["cpu"][rank()].clone())  # a copy: set_rng_state crashes on a view with an offset
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"][rank()].clone())
    return state["step"], state["log"], state["seconds"]


def _prepare_output(output: Path, overwrite: bool, resume: bool) -> bool:
    """Check output/overwrite/resume before any work; True if an interrupted run is resumed."""
    interrupted = (output / CHECKPOINT_DIR / "state.json").is_file() and not (output / RECORD).is_file()
    if resume:
        if not interrupted:
            raise SdmpruneError(f"nothing to resume: {output} holds no interrupted finetune run")
        return True
    if interrupted and not overwrite:
        raise SdmpruneError(f"{output} holds an interrupted run: pass --resume to continue it or --overwrite to "
                            "start over")
    check_output_dir(output, overwrite)
    return False


# ----------------------------------------------------------------------------- outputs


def plot_loss(log: list[dict], path: Path) -> None:
    """Training loss per optimizer step (and its CE / KL parts with --kd) as a PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), layout="tight")
    axes = figure.subplots()
    steps = [entry["step"] for entry in log]
    axes.plot(steps, [entry["loss"] for entry in log], label="loss")
    if log and "kl" in log[0]:
        axes.plot(steps, [entry["ce"] for entry in log], label="CE", alpha=0.7)
        axes.plot(steps, [entry["kl"] for entry in log], label="KL", alpha=0.7)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss per response token")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


def _write_output(output: Path, model, tokenizer, log: list, record: dict, source: dict | None,
                  merge: bool) -> None:
    with atomic_directory(output, overwrite=True) as tmp:  # replaces the run's checkpoint directory
        model.save_pretrained(tmp)
        (tmp / "loss.json").write_text(json.dumps(log, indent=1))
        plot_loss(log, tmp / "loss.png")
        (tmp / RECORD).write_text(json.dumps(record, indent=1))
        if merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(tmp / "merged")
            tokenizer.save_pretrained(tmp / "merged")
            if source is not None:  # the pruning record travels with the weights, extended by the recovery
                (tmp / "merged" / "pruning.json").write_text(json.dumps({**source, "recovery": record}, indent=1))


def load_adapter(directory: str | Path, *, dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False):
    """`(PeftModel, tokenizer)`: the base named in adapter_config.json loaded with `load_model` (so pruned
    and per-layer exports work), with the adapter on top, in eval mode."""
    from peft import PeftModel

    directory = Path(directory)
    base = json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise SdmpruneError(f"{directory}/adapter_config.json names no base_model_name_or_path: set it to the "
                            "model the adapter was trained on")
    model, tokenizer = load_model(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(model, directory).eval(), tokenizer


def _unsharded(peft_model, spec: str, lora, dtype: str, trust_remote_code: bool):
    """On rank 0, the FSDP-trained `peft_model` as a plain model on the CPU: the base reloaded from `spec`
    (its weights are frozen) with the gathered LoRA weights; None elsewhere. Every process calls it."""
    from peft import get_peft_model

    state = _trainable_state(peft_model)
    if not is_main():
        return None
    base, _ = load_model(spec, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    plain = get_peft_model(base, lora)
    unexpected = plain.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"LoRA weights without a place in the reloaded model: {unexpected[:3]}")
    return plain.eval()


def is_adapter_dir(spec: str) -> bool:
    return (Path(spec).expanduser() / "adapter_config.json").is_file()


# ----------------------------------------------------------------------------- the run


def finetune(
    model: str,
    output: str | Path,
    config: FinetuneConfig | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    **overrides,
) -> dict:
    """LoRA-recover model `model` (a spec for `load_model`) and write `output`; returns the recovery record.

    Keyword overrides update `config` (e.g. `data=...`, `max_steps=10`). `resume=True` continues an
    interrupted run from `output/checkpoint/`.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    config = FinetuneConfig(**{**(asdict(config) if config else {}), **overrides})
    config.validate()
    output = Path(output)
    resume = _prepare_output(output, overwrite, resume)

    torch.manual_seed(config.seed)  # the same LoRA initialisation in every process
    # fully_shard moves each process's shard to its own GPU (or keeps it on the CPU)
    student, tokenizer = load_model(model, dtype=dtype, device="cpu" if config.fsdp else device,
                                    trust_remote_code=trust_remote_code)
    torch_device = next(student.parameters()).device
    context = context_length(student)
    if context is not None and config.max_len > context:
        raise SdmpruneError(f"--max-len {config.max_len} is longer than the model's context ({context} tokens): "
                            "lower it")
    examples = load_instructions(config.data, config.max_samples)
    data: TokenizedData = tokenize_dataset(tokenizer, examples, config.max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    source = _source_record(model)

    teacher, teacher_spec = None, None
    if config.kd:
        teacher_spec = _teacher_spec(config, source)
        teacher, _ = load_model(teacher_spec, dtype=dtype, device=str(torch_device),
                                trust_remote_code=trust_remote_code)
        teacher.requires_grad_(False)
        if teacher.config.vocab_size != student.config.vocab_size:
            raise SdmpruneError(f"teacher {teacher_spec} has a different vocabulary ({teacher.config.vocab_size} vs "
                                f"{student.config.vocab_size}): pass the dense model the student was pruned from")
        if config.fsdp:
            shard_model(teacher)

    targets = [name for name in config.lora_targets.split(",") if name]
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=_model_ref(model))
    try:
        peft_model = get_peft_model(student, lora)
    except ValueError as error:
        raise SdmpruneError(f"LoRA could not be attached ({str(error).splitlines()[0][:200]}): check "
                            "--lora-targets against the model's module names") from error
    if config.fsdp:  # LoRA weights are sharded with the decoder layer they sit in
        shard_model(student)
    peft_model.train()
    replicated = world_size() > 1 and not config.fsdp  # DDP: one all-reduce of the LoRA gradients per step
    device_ids = [torch_device.index] if torch_device.type == "cuda" else None
    train_model = DistributedDataParallel(peft_model, device_ids=device_ids) if replicated else peft_model
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    schedule = Schedule(len(data), config)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, schedule.steps)

    run = {"model": model, **asdict(config)}  # what a resumed run must match
    checkpoint = output / CHECKPOINT_DIR
    start, log, seconds_before = 0, [], 0.0
    if resume:
        start, log, seconds_before = _load_checkpoint(checkpoint, peft_model, optimizer, scheduler, run)
    elif output.exists() and is_main():
        shutil.rmtree(output)  # --overwrite (checked above): checkpoints go into the output directory
    barrier()

    tokens = log[-1]["tokens"] if log else 0
    target_tokens = log[-1]["target_tokens"] if log else 0
    beta = config.kd_beta if config.kd else 0.0
    started = time.perf_counter()
    bar = tqdm(total=schedule.steps, initial=start, desc="finetune", unit="step", disable=not (progress and is_main()))
    for step in range(start, schedule.steps):
        batches = [collate(data, indices, pad_id) for indices in schedule.step_batches(step)]
        n_step = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        lr = scheduler.get_last_lr()[0]
        ce_total, kl_total, step_tokens = _accumulate_gradients(train_model, teacher, batches, n_step, config)
        tokens += step_tokens
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        target_tokens += n_step
        entry = {"step": step + 1, "loss": ((1 - beta) * ce_total + beta * kl_total) / n_step, "lr": lr,
                 "tokens": tokens, "target_tokens": target_tokens}
        if teacher is not None:
            entry |= {"ce": ce_total / n_step, "kl": kl_total / n_step}
        log.append(entry)
        elapsed = seconds_before + time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{tokens / elapsed:.0f}")
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < schedule.steps:
            _save_checkpoint(checkpoint, peft_model, optimizer, scheduler, step + 1, log, elapsed, run)
    bar.close()
    seconds = seconds_before + time.perf_counter() - started

    peft_model.eval()
    record = {
        "base_model": model,
        "data": config.data,
        "examples": len(data),
        "examples_dropped": data.dropped,
        "steps": schedule.steps,
        "epochs": schedule.micro_batches / schedule.per_epoch,
        "tokens": tokens,
        "target_tokens": target_tokens,
        "lr": config.lr,
        "final_loss": log[-1]["loss"],
        "seconds": round(seconds, 2),
        "tokens_per_s": tokens / seconds,
        "teacher": teacher_spec,
        "config": asdict(config),
        "versions": library_versions(),
    }
    weights_dtype = str(next(student.parameters()).dtype).removeprefix("torch.")
    plain = _unsharded(peft_model, model, lora, weights_dtype, trust_remote_code) if config.fsdp else peft_model
    if is_main():
        _write_output(output, plain, tokenizer, log, record, source, config.merge)
    barrier()
    return record
