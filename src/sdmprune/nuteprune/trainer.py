"""NutePrune training: gates, LoRA and the Lagrangian, with numerous teachers, in one model.

    result = nuteprune(model, NutePruneConfig(ratio=0.2), calibration=ids)   # ids: (N, S) token windows
    export_pruned(result.model, tokenizer, result.masks, "out", report=result.report, heads=result.heads)

Each step: the teacher of the scheduled level (teachers.py) runs under inference mode; the student runs
with freshly sampled gates; loss = kd_weight · T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + hidden_weight ·
Σ_layers MSE(h_s, h_t) + the Lagrangian penalty (lagrangian.py). LoRA (AdamW) and log α (Adam) descend,
λ ascends; the base weights stay frozen. Snapshots are recorded as the expected sparsity passes each
level. At the end the gates become deterministic keep-masks removing exactly the target (gates.py),
the LoRA weights are merged, and the masks are attached as `NeuronMasks` and `HeadMasks`.

With a state directory the run saves gates, LoRA, optimizers, λ, snapshots, RNG and log every
`save_every` steps (safetensors + JSON, atomically); `resume=True` continues to the same result.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import Checkpoint, flatten_optimizer, prefixed, restore_rng, rng_tensors, unflatten_optimizer
from ..config import LoraOptions, RuntimeOptions, TargetOptions, TrainingOptions
from ..data.order import example_at
from ..errors import SdmpruneError
from ..lora import attach_lora
from ..losses import hidden_state_mse, soft_target_kl
from ..masks import HeadMasks, NeuronMasks, count_parameters
from ..options import build, described, to_dict, validate
from ..runtime import autocast_context
from .gates import HardConcreteGates, StructureMasks
from .lagrangian import Lagrangian, sparsity_target
from .teachers import NumerousTeachers, Snapshot, layer_outputs, teacher_level

LOG_JSON, PLOT = "nuteprune_log.json", "nuteprune.png"


@dataclass
class NutePruneConfig:
    """nuteprune"""

    target: TargetOptions = field(default_factory=TargetOptions)
    train_steps: int = field(default=500, metadata=described("optimizer steps"))
    head_gates: bool = field(default=True, metadata=described(
        "learn gates over attention groups as well as MLP neurons (off: MLP neurons only, at the same total ratio)"))
    sparsity_warmup: float = field(default=0.7, metadata=described(
        "fraction of the steps over which the sparsity target ramps linearly from 0 to the ratio"))
    train_batch_size: int = field(default=1, metadata=described("calibration windows per step"))
    gate_init: float = field(default=3.0, metadata=described(
        "initial log α of every gate (3: P(gate ≠ 0) = 0.99, 80 percent of samples exactly 1)"))
    gate_lr: float = field(default=0.3, metadata=described("learning rate of the gates' log α (Adam)"))
    lambda_lr: float = field(default=1.0, metadata=described(
        "learning rate of the Lagrange multipliers λ1, λ2 (Adam without momentum, gradient ascent)"))
    kd_weight: float = field(default=0.1, metadata=described("weight of the logit KL term"))
    distill_temperature: float = field(default=2 / 3, metadata=described(
        "KL temperature T (both sides, loss scaled by T²)"))
    hidden_weight: float = field(default=0.9, metadata=described("weight of the summed per-layer hidden-state MSE"))
    hidden_normalise: bool = field(default=True, metadata=described(
        "divide each layer's MSE by the teacher's mean square there (off: plain MSE, whose scale follows the "
        "residual stream's)"))
    numerous_teachers: bool = field(default=True, metadata=described(
        "teachers from snapshots of the student (off: always the dense model)"))
    snapshot_every: float = field(default=0.01, metadata=described(
        "record a snapshot each time the expected sparsity passes a multiple of this"))
    teacher_gap: float = field(default=0.1, metadata=described(
        "sparsity gap between student and teacher while the target ramps up; afterwards the teacher walks back "
        "to the dense model"))
    lora: LoraOptions = field(default_factory=lambda: LoraOptions(lora_dropout=0.0, lora_targets="q_proj,v_proj"))
    training: TrainingOptions = field(default_factory=lambda: TrainingOptions(lr=2e-4, save_every=50))
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)

    def validate(self) -> None:
        if self.target.mlp_ratio is not None:
            raise SdmpruneError("--mlp-ratio applies to scoring methods; nuteprune removes attention groups too: "
                                "give --ratio (of total parameters)")
        for name in ("train_steps", "train_batch_size"):
            if getattr(self, name) < 1:
                raise SdmpruneError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("gate_lr", "lambda_lr", "distill_temperature", "snapshot_every"):
            if getattr(self, name) <= 0:
                raise SdmpruneError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 < self.sparsity_warmup <= 1:
            raise SdmpruneError(f"--sparsity-warmup must be in (0, 1], got {self.sparsity_warmup}")
        if self.kd_weight < 0 or self.hidden_weight < 0 or self.kd_weight + self.hidden_weight == 0:
            raise SdmpruneError("--kd-weight and --hidden-weight must be non-negative and not both 0")
        if not 0 <= self.teacher_gap < 1:
            raise SdmpruneError(f"--teacher-gap must be in [0, 1), got {self.teacher_gap}")

    @property
    def ratio(self) -> float:
        return self.target.total_ratio

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.sparsity_warmup * self.train_steps))


@dataclass
class NutePruneResult:
    model: nn.Module  # the input model, LoRA merged, masks attached
    masks: NeuronMasks
    heads: HeadMasks
    report: dict  # what pruning.json records
    log: list[dict]  # one entry per step: expected sparsity, target, λ, losses, teacher level


def window_indices(step: int, n_windows: int, train_batch_size: int, seed: int) -> list[int]:
    """Windows of 0-based `step`: slots step·B ... (step+1)·B - 1 of per-epoch permutations."""
    return [example_at(position, n_windows, seed)
            for position in range(step * train_batch_size, (step + 1) * train_batch_size)]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class NutePruneRun:
    """One run on `model`: gates, LoRA (attached to the model), λ, optimizers, snapshots and log.

    `train_step(ids)` is one optimizer step; `finish()` turns the gates into masks and merges LoRA.
    """

    def __init__(self, model: nn.Module, config: NutePruneConfig):
        device = next(model.parameters()).device
        self.config = config
        self.count = count_parameters(model)
        self.gates = HardConcreteGates(self.count, config.gate_init, device, heads=config.head_gates)
        if config.ratio > self.gates.max_ratio():
            raise SdmpruneError(f"--ratio {config.ratio} cannot be reached by removing attention groups and MLP "
                                f"neurons: at most {self.gates.max_ratio():.3f} of the total; ask for less")
        self.peft_model, _ = attach_lora(model, config.lora)
        self.model = model  # the same object, LoRA layers injected in place
        self.peft_model.train()
        self.masks = StructureMasks(model, self.gates)  # after LoRA: hooks sit on whatever module is there
        self.teachers = NumerousTeachers(self.peft_model, self.masks)
        self.lagrangian = Lagrangian(device)
        self.optimizer = torch.optim.AdamW([
            {"params": list(self.teachers.lora.values()), "lr": config.training.lr, "weight_decay": 0.0},
            {"params": [self.gates.log_alpha], "lr": config.gate_lr, "weight_decay": 0.0},
        ])
        # No momentum on λ: with it, λ keeps pushing for steps after ŝ crosses the target and ŝ oscillates.
        self.lambda_optimizer = torch.optim.Adam(self.lagrangian.parameters(), lr=config.lambda_lr, betas=(0.0, 0.999),
                                                 maximize=True)
        self.generator = torch.Generator(device=device).manual_seed(config.runtime.seed)
        self.step, self.log, self.seconds = 0, [], 0.0

    def state_bytes(self) -> dict[str, int]:
        """Memory beyond the model's weights: what NutePrune adds."""
        optimizer = [t for o in (self.optimizer, self.lambda_optimizer) for s in o.state.values()
                     for t in s.values() if torch.is_tensor(t)]
        parts = {"gates": _nbytes([self.gates.log_alpha, self.gates.costs]),
                 "lora": _nbytes(self.teachers.lora.values()),
                 "lambdas": _nbytes([self.lagrangian.lambdas]),
                 "optimizer": _nbytes(optimizer),
                 "snapshots": self.teachers.nbytes()}
        lora_ids = {id(p) for p in self.teachers.lora.values()}
        model = _nbytes(p for p in self.peft_model.parameters() if id(p) not in lora_ids)
        return {"model_weights": model, **parts, "state_total": sum(parts.values())}

    def save(self, checkpoint: Checkpoint, settings: dict) -> None:
        tensors = {"log_alpha": self.gates.log_alpha, "lambdas": self.lagrangian.lambdas,
                   "generator": self.generator.get_state(), **rng_tensors()}
        tensors |= {f"lora.{name}": p for name, p in self.teachers.lora.items()}
        copies: dict[int, int] = {}  # snapshots recorded at the same step share one LoRA copy: save it once
        snapshots = {}
        for level, snapshot in self.teachers.snapshots.items():
            tensors[f"snapshot.{level}.keep"] = snapshot.keep.to(torch.uint8)
            snapshots[level] = copies.setdefault(id(snapshot.lora), len(copies))
            if snapshots[level] == len(copies) - 1:
                tensors |= {f"snapshot_lora.{snapshots[level]}.{name}": t for name, t in snapshot.lora.items()}
        optimizer, optimizer_meta = flatten_optimizer(self.optimizer)
        lambda_optimizer, lambda_meta = flatten_optimizer(self.lambda_optimizer)
        tensors |= {f"optimizer.{k}": v for k, v in optimizer.items()}
        tensors |= {f"lambda_optimizer.{k}": v for k, v in lambda_optimizer.items()}
        progress = {"step": self.step, "seconds": self.seconds, "log": self.log, "snapshots": snapshots,
                    "optimizer": optimizer_meta, "lambda_optimizer": lambda_meta}
        checkpoint.save(settings, progress, tensors)

    def load(self, checkpoint: Checkpoint, settings: dict) -> None:
        progress, tensors = checkpoint.load(settings)
        device = self.gates.log_alpha.device
        with torch.no_grad():
            self.gates.log_alpha.copy_(tensors["log_alpha"])
            self.lagrangian.lambdas.copy_(tensors["lambdas"])
            for name, p in self.teachers.lora.items():
                p.copy_(tensors[f"lora.{name}"])
        copies = {c: {name: tensors[f"snapshot_lora.{c}.{name}"].to(device) for name in self.teachers.lora}
                  for c in set(progress["snapshots"].values())}
        for level, c in progress["snapshots"].items():
            keep = tensors[f"snapshot.{level}.keep"].bool().to(device)
            self.teachers.snapshots[int(level)] = Snapshot(keep, copies[c])
        self.optimizer.load_state_dict(unflatten_optimizer(prefixed(tensors, "optimizer."), progress["optimizer"]))
        self.lambda_optimizer.load_state_dict(unflatten_optimizer(prefixed(tensors, "lambda_optimizer."),
                                                                  progress["lambda_optimizer"]))
        self.generator.set_state(tensors["generator"])
        restore_rng(tensors)
        self.step, self.log, self.seconds = progress["step"], progress["log"], progress["seconds"]

    def train_step(self, ids: torch.Tensor) -> dict:
        """One optimizer step on windows `ids` (B, S), then the snapshots it earned; returns its log entry."""
        config, step, device = self.config, self.step, ids.device
        with torch.no_grad():
            previous = self.log[-1]["expected_sparsity"] if self.log else float(self.gates.expected_sparsity())
        wanted = teacher_level(step, previous, every=config.snapshot_every, gap=config.teacher_gap, ratio=config.ratio,
                               warmup_steps=config.warmup_steps, total_steps=config.train_steps)
        level = self.teachers.available(wanted) if config.numerous_teachers else 0
        with autocast_context(device, config.runtime.bf16):
            teacher = self.teachers.outputs(ids, level)
        self.masks.set(self.gates.sample(self.generator))
        with autocast_context(device, config.runtime.bf16), layer_outputs(self.model) as hidden:
            logits = self.model(input_ids=ids, use_cache=False).logits
        kd = soft_target_kl(logits, teacher.logits, config.distill_temperature)
        mse = hidden_state_mse(hidden, teacher.hidden, config.hidden_normalise)
        distill = config.kd_weight * kd + config.hidden_weight * mse
        target = sparsity_target(step, config.ratio, config.warmup_steps)
        loss = distill + self.lagrangian(self.gates.expected_sparsity(), target)
        if not torch.isfinite(loss):
            raise SdmpruneError(f"nuteprune step {step + 1}: the loss is not finite ({loss.item()}); try float32 "
                                "weights, no --bf16, or lower learning rates")
        loss.backward()
        if config.training.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.teachers.lora.values()), config.training.max_grad_norm)
        for optimizer in (self.optimizer, self.lambda_optimizer):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.gates.clamp_()
        self.step += 1
        with torch.no_grad():
            sparsity = float(self.gates.expected_sparsity())
        lambda1, lambda2 = self.lagrangian.lambdas.tolist()
        self.log.append({"step": self.step, "expected_sparsity": sparsity, "target": target, "lambda1": lambda1,
                         "lambda2": lambda2, "loss": distill.item(), "kd": kd.item(), "hidden_mse": mse.item(),
                         "teacher_level": level, "teacher_sparsity": level * config.snapshot_every})
        self.record_snapshots()
        return self.log[-1]

    def record_snapshots(self) -> None:
        """Snapshot every level the expected sparsity has passed, up to ratio - gap (sparser ones teach nobody)."""
        config = self.config
        if not config.numerous_teachers:
            return
        last = max(self.teachers.snapshots, default=0)
        top = math.floor((config.ratio - config.teacher_gap) / config.snapshot_every + 1e-9)
        reached = math.floor(self.log[-1]["expected_sparsity"] / config.snapshot_every + 1e-9)
        levels = list(range(last + 1, min(reached, top) + 1))
        if levels:
            self.teachers.record(levels, [self.gates.deterministic(k * config.snapshot_every) for k in levels])

    def finish(self) -> NutePruneResult:
        """Deterministic masks at the target ratio, LoRA merged into the model, masks attached; the report."""
        config, count = self.config, self.count
        memory = self.state_bytes()
        heads_keep, neurons_keep = self.gates.split(self.gates.deterministic(config.ratio))
        self.masks.remove()
        model = self.peft_model.merge_and_unload().eval()
        masks, heads = NeuronMasks(model, neurons_keep), HeadMasks(model, heads_keep)
        params_after = count.after(masks.widths, heads.kv_heads)
        report = {
            "method": "nuteprune",
            "config": to_dict(config),
            "requested": {"ratio": config.ratio, "mlp_ratio": None},
            "achieved": {
                "params_before": count.total,
                "params_after": params_after,
                "ratio": (count.total - params_after) / count.total,
                "mlp_ratio": 1 - sum(masks.widths) / sum(count.widths),
                "kv_head_ratio": 1 - sum(heads.kv_heads) / sum(count.kv_heads),
            },
            "widths_before": count.widths,
            "widths": masks.widths,
            "kv_heads_before": count.kv_heads,
            "kv_heads": heads.kv_heads,
            "seed": config.runtime.seed,
            "training": {
                "steps": self.step,
                "seconds": round(self.seconds, 2),
                "final_expected_sparsity": self.log[-1]["expected_sparsity"] if self.log else 0.0,
                "lambdas": self.lagrangian.lambdas.tolist(),
                "snapshots": sorted(self.teachers.snapshots),
            },
            "memory_bytes": memory,
        }
        return NutePruneResult(model, masks, heads, report, self.log)


def plot_trajectory(log: list[dict], path: Path) -> None:
    """Expected sparsity and target, the teacher's sparsity, and the distillation loss per step, as a PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 6.5), layout="tight")
    sparsity, teacher, loss = figure.subplots(3, 1, sharex=True)
    steps = [entry["step"] for entry in log]
    sparsity.plot(steps, [100 * e["expected_sparsity"] for e in log], label="student: expected sparsity")
    sparsity.plot(steps, [100 * e["target"] for e in log], "--", label="target")
    sparsity.set_ylabel("parameters removed (%)")
    sparsity.legend()
    teacher.step(steps, [100 * e["teacher_sparsity"] for e in log], where="post", color="tab:green")
    teacher.set_ylabel("teacher sparsity (%)\n(0 = dense model)")
    loss.plot(steps, [e["loss"] for e in log], color="tab:red", linewidth=0.8)
    loss.set_ylabel("distillation loss")
    loss.set_xlabel("step")
    for axes in (sparsity, teacher, loss):
        axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


def nuteprune(
    model: nn.Module,
    config: NutePruneConfig | None = None,
    *,
    calibration: torch.Tensor,
    calibration_summary: dict | None = None,
    state_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    **options,
) -> NutePruneResult:
    """Learn attention-group and MLP-neuron masks of `model` with NutePrune; keyword `options` (flat option names, as on
    the command line) update `config`.

    `calibration` (N, S) token ids are the training windows. `model` is changed in place: LoRA merged,
    `NeuronMasks` and `HeadMasks` attached (weights not sliced yet; `export_pruned` does that). With
    `state_dir` the run state is saved every `save_every` steps; `resume=True` continues from it.
    """
    config = build(NutePruneConfig, options, base=config)
    validate(config)
    if calibration is None or calibration.dim() != 2:
        raise SdmpruneError("nuteprune trains on calibration windows: pass an (N, S) tensor of token ids (--calib)")
    torch.manual_seed(config.runtime.seed)
    checkpoint = Checkpoint(state_dir)
    run = NutePruneRun(model, config)
    settings = {"method": "nuteprune", "config": to_dict(config), "calibration": calibration_summary}
    if resume and checkpoint.exists():
        run.load(checkpoint, settings)
    device = next(model.parameters()).device
    started = time.perf_counter() - run.seconds
    bar = tqdm(total=config.train_steps, initial=run.step, desc="nuteprune", unit="step", disable=not progress)
    while run.step < config.train_steps:
        ids = calibration[window_indices(run.step, calibration.shape[0], config.train_batch_size,
                                             config.runtime.seed)]
        entry = run.train_step(ids.to(device))
        run.seconds = time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(sparsity=f"{entry['expected_sparsity']:.3f}", target=f"{entry['target']:.3f}",
                        lam=f"{entry['lambda1']:.2f},{entry['lambda2']:.2f}", loss=f"{entry['loss']:.3f}",
                        teacher=f"{entry['teacher_sparsity']:.2f}")
        every = config.training.save_every
        if every and run.step % every == 0 and run.step < config.train_steps:
            run.save(checkpoint, settings)
    bar.close()
    result = run.finish()
    result.report["training"]["tokens"] = config.train_steps * config.train_batch_size * calibration.shape[1]
    result.report["calibration"] = calibration_summary
    return result


def write_training_outputs(log: list[dict], directory: Path) -> None:
    """The step log (JSON) and the trajectory plot of a NutePrune run, into `directory`."""
    (directory / LOG_JSON).write_text(json.dumps(log, indent=1))
    plot_trajectory(log, directory / PLOT)
