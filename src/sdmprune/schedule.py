"""The pruning schedule: stages and prune-and-rescore steps, and the resumable run state.

A plan is a list of steps; each step scores the currently kept neurons, allocates a budget of kept
neurons over layers and updates the masks. SDMPrune's plan is a cold start (cross-entropy, prune
`cold_start` of the MLP width) followed by a distillation stage of `steps` steps; every other
criterion has a single stage of `steps` steps. After each step the masks, scores, RNG state and
config are saved (when a state directory is given), so an interrupted run resumes exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .allocation import achieved, allocate_widths, keep_top, kept_budget
from .criteria import ScoringContext, compute_scores, get_criterion
from .criteria.activations import compensate_bias
from .distributed import barrier, broadcast_from_main, broadcast_masks, is_main
from .errors import SdmpruneError
from .io import atomic_file
from .masks import NeuronMasks, ParameterCount, count_parameters
from .models.architectures import get_architecture
from .teacher import MasksOffTeacher, ProgressiveTeacher, copy_teacher_before_masking

# Official SDMPrune (α, T) per target ratio of total parameters (METHOD.md); the nearest is used.
OFFICIAL_DISTILLATION = {0.2: (0.4, 0.2), 0.3: (0.42, 0.5), 0.4: (0.1, 0.2)}
TWO_STAGE_CRITERIA = ("sdmprune",)
STATE_JSON, STATE_TENSORS = "run_state.json", "run_state.safetensors"


@dataclass(frozen=True)
class Step:
    stage: str  # "cold-start" or "prune"
    budget: float  # neurons kept over all layers after this step
    alpha: float
    temperature: float


def distillation_settings(config, count: ParameterCount, budget: float) -> tuple[float, float]:
    """(α, T): the config's, else the official values for the target ratio nearest this one."""
    target_ratio = (sum(count.widths) - budget) * count.per_neuron[0] / count.total
    nearest = min(OFFICIAL_DISTILLATION, key=lambda r: abs(r - target_ratio))
    alpha, temperature = OFFICIAL_DISTILLATION[nearest]
    return (
        config.alpha if config.alpha is not None else alpha,
        config.temperature if config.temperature is not None else temperature,
    )


def plan_steps(config, count: ParameterCount) -> list[Step]:
    target = kept_budget(count, ratio=config.ratio, mlp_ratio=config.mlp_ratio)
    start = float(sum(count.widths))
    steps: list[Step] = []
    alpha, temperature = 0.0, 1.0
    if config.criterion in TWO_STAGE_CRITERIA:
        cold = start * (1 - config.cold_start)
        if cold <= target:
            raise SdmpruneError(f"--cold-start {config.cold_start} already reaches the target: lower it")
        steps.append(Step("cold-start", cold, 0.0, 1.0))
        start = cold
        alpha, temperature = distillation_settings(config, count, target)
    for k in range(1, config.steps + 1):
        steps.append(Step("prune", start + (target - start) * k / config.steps, alpha, temperature))
    return steps


def uses_bias_compensation(config, model: nn.Module) -> bool:
    """The config's choice, else automatic: the criterion's default (on for flap) when the architecture
    can store the bias (an MLP-bias config option: Llama), off otherwise."""
    if config.bias_compensation is not None:
        return config.bias_compensation
    return get_criterion(config.criterion).bias_compensation and get_architecture(model).bias_key is not None


def check_plan(model: nn.Module, config) -> list[Step]:
    """The steps of the run, failing before any work if the target is out of reach (`global` needs
    scores to allocate, and shares `uniform`'s bound) or a compensation bias could not be exported."""
    count = count_parameters(model)
    steps = plan_steps(config, count)
    if uses_bias_compensation(config, model) and get_architecture(model).bias_key is None:
        raise SdmpruneError(f"'{model.config.model_type}' has no MLP-bias option to store the compensation bias "
                            "in: pass --no-bias-compensation")
    early_check = "uniform" if config.allocation == "global" else config.allocation
    allocate_widths(count, steps[-1].budget, allocation=early_check, width_multiple=config.width_multiple)
    return steps


class RunState:
    """Files in the output directory recording finished steps; written atomically (tmp + rename)."""

    def __init__(self, directory: Path | None):
        self.directory = directory

    def exists(self) -> bool:
        return self.directory is not None and (self.directory / STATE_JSON).is_file()

    def save(self, config_dict: dict, done: int, masks: NeuronMasks, scores: list[torch.Tensor], log: list,
             history: list[list[torch.Tensor]]) -> None:
        """Rank 0 writes; with several processes all wait until it has (each may read the state later).
        `history[j]` holds the masks step j + 1 started from (the progressive teacher's)."""
        if self.directory is None:
            return
        if not is_main():
            barrier()
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"keep.{i}": m.to(torch.uint8).cpu() for i, m in enumerate(masks.keep)}
        tensors |= {f"scores.{i}": s.float().cpu().contiguous() for i, s in enumerate(scores)}
        tensors |= {f"history.{j}.{i}": m.to(torch.uint8).cpu() for j, step in enumerate(history)
                    for i, m in enumerate(step)}
        tensors["rng"] = torch.get_rng_state()
        with atomic_file(self.directory / STATE_TENSORS) as tmp:
            save_file(tensors, tmp)
        record = {"config": config_dict, "steps_done": done, "log": log}
        with atomic_file(self.directory / STATE_JSON) as tmp:  # written last: it marks the step done
            tmp.write_text(json.dumps(record, indent=1))
        barrier()

    def load(self, config_dict: dict) -> tuple[int, list[torch.Tensor], list, list[list[torch.Tensor]]]:
        record = json.loads((self.directory / STATE_JSON).read_text())
        if record["config"] != config_dict:
            changed = sorted(k for k in config_dict if record["config"].get(k) != config_dict[k])
            raise SdmpruneError(f"cannot resume {self.directory}: the settings differ from the interrupted run's "
                                f"({', '.join(changed)}); use the same command, or --overwrite to start over")
        tensors = load_file(self.directory / STATE_TENSORS)
        done = record["steps_done"]
        layers = sum(k.startswith("keep.") for k in tensors)
        keep = [tensors[f"keep.{i}"].bool() for i in range(layers)]
        history = [[tensors[f"history.{j}.{i}"].bool() for i in range(layers)] for j in range(done)]
        torch.set_rng_state(tensors["rng"])
        return done, keep, record["log"], history


def run_schedule(
    model: nn.Module,
    config,
    calibration: torch.Tensor | None,
    calibration_summary: dict | None = None,
    state_dir: Path | None = None,
    resume: bool = False,
) -> tuple[NeuronMasks, dict]:
    """Run every step of the plan on `model` (masks attached), resuming from `state_dir` if asked."""
    count = count_parameters(model)
    steps = check_plan(model, config)
    compensate = uses_bias_compensation(config, model)
    if compensate and calibration is None:
        raise SdmpruneError("bias compensation needs calibration data (the removed neurons' mean output): pass "
                            "--calib, or --no-bias-compensation")
    if calibration is not None:  # several processes: every one scores its share of rank 0's windows
        calibration = broadcast_from_main(calibration)
    needs_teacher = any(s.alpha > 0 for s in steps)
    copy_teacher = copy_teacher_before_masking(model, config.teacher) if needs_teacher else None
    torch.manual_seed(config.seed)
    masks = NeuronMasks(model)
    history: list[list[torch.Tensor]] = []  # the masks each step started from
    if config.teacher == "progressive":
        teacher = ProgressiveTeacher(model, masks, history, config.teacher_lag)
    else:
        teacher = copy_teacher or MasksOffTeacher(model, masks)
    state = RunState(state_dir)
    config_dict = {**asdict(config), "calibration": calibration_summary}  # what a resumed run must match
    done, log = 0, []
    if resume and state.exists():
        done, keep, log, saved = state.load(config_dict)
        history[:] = [[m.to(k.device) for m, k in zip(step, masks.keep, strict=True)] for step in saved]
        masks.update(keep)
    context = ScoringContext(model, masks, calibration, config.seed, teacher=teacher,
                             micro_batch=config.micro_batch, bf16=config.bf16, importance=config.importance)
    for index, step in enumerate(steps[done:], start=done):
        start = time.perf_counter()
        context.alpha, context.temperature = step.alpha, step.temperature
        history.append(list(masks.keep))  # masks.update replaces the tensors: no copy needed
        scores = compute_scores(config.criterion, context)
        widths = allocate_widths(count, step.budget, allocation=config.allocation,
                                 width_multiple=config.width_multiple, scores=scores)
        masks.update(broadcast_masks(keep_top(scores, widths)))  # rank 0 decides for every process
        log.append({"step": index + 1, "stage": step.stage, "alpha": step.alpha, "temperature": step.temperature,
                    "widths": widths, "seconds": round(time.perf_counter() - start, 3)})
        state.save(config_dict, index + 1, masks, scores, log, history)
    if compensate:
        compensate_bias(context)
    report = {
        "method": config.criterion,
        "config": asdict(config),
        "requested": {"ratio": config.ratio, "mlp_ratio": config.mlp_ratio},
        "achieved": achieved(count, masks.widths),
        "widths_before": count.widths,
        "widths": masks.widths,
        "seed": config.seed,
        "bias_compensation": compensate,
        "steps": log,
        "calibration": calibration_summary,
    }
    return masks, report
