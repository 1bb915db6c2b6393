"""Recipe `compress`: from a dense model to a deployable one in one command.

    from sdmprune.recipes import compress
    report = compress.run(compress.CompressRun.of(model="smollm2-135m", ratio=0.2, output="runs/c20"))

Stages, each resumable (a killed run continued with --resume ends with the same export, byte for byte):
check every input → calibrate (calibration and recovery windows, dense perplexity) → prune (SDMPrune
with one importance; masks only) → reconstruct (refit of the kept down_proj weights, held beside
the weights) → recover (LoRA distilled from the dense model, which is the same weights with adapters and
masks off: no second copy; or from the dense model's top-k log-probabilities cached in the calibrate stage) →
evaluate (zero-shot tasks, optional) → export (LoRA merged, sliced, written). With `--importance auto` (the
default), prune and reconstruct are one stage, select: each candidate importance is pruned and refitted in
turn, and the one with the lower perplexity on further calibration windows is kept (`sdmprune.selection`).
Perplexity (on each text of --ppl-data, a comma-separated list here) is measured after every stage that changes
the model and plotted in `stages.png`; every stage's seconds and peak memory go into pruning.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import Checkpoint, clear_for_new_run, prepare_output
from ..config import LoraOptions, TrainingOptions
from ..criteria.sdmprune import WEIGHT_IMPORTANCES
from ..data import load_calibration
from ..errors import SdmpruneError
from ..evaluation.tasks import evaluate_tasks, parse_task_names, resolve_tasks
from ..export import export_copy, export_pruned
from ..lora import attach_lora
from ..masks import NeuronMasks, count_parameters
from ..options import described, to_dict, validate
from ..pruning import PruneConfig
from ..reconstruct import ReconstructConfig
from ..recovery.cached_teacher import CachedTeacher, cache_teacher
from ..recovery.data import load_instructions, text_windows, tokenize_dataset
from ..recovery.finetune import RecoveryOptions, run_teacher, train
from ..recovery.targets import Teacher, TeacherOutput
from ..runtime import PeakMemory, context_length, use_bf16
from ..schedule import check_plan
from ..selection import SELECTION_WINDOWS, describe_choice, prune_and_refit, reconstruct_on
from .options import PerplexityOptions, PruningRunOptions, TaskOptions
from .prune import FINISHED, recommended_pruning
from .steps import (
    calibration_windows,
    load,
    measure,
    perplexity_windows,
    refit_windows,
    say,
    selection_windows,
)

STAGES = ("calibrate", "prune", "reconstruct", "recover", "evaluate", "export")
# --importance auto: prune and reconstruct run together, once per candidate importance (sdmprune.selection)
CHOOSING_STAGES = ("calibrate", "select", "recover", "evaluate", "export")
STAGE_MODELS = "stage-models"  # --export-stages: OUTPUT/stage-models/{pruned,reconstructed} (select: selected)
# down_proj stays without LoRA: its input is what the masks cut, and its weight may be a refit held by the masks
COMPRESS_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj"
# Fractions of the matmul ceiling our passes reach, (fp32, bf16 autocast): fp32 inference ~0.8 (SmolLM2 forward 370
# tok/s against 117 GFLOP/s), passes with a backward 0.38-0.49 (bench/results/perf_cost.md); under bf16 autocast
# every stage of a compress run of SmolLM2 reached ~0.4 (bench/results/compress.md)
FORWARD_EFFICIENCY, TRAINING_EFFICIENCY = {False: 0.8, True: 0.4}, {False: 0.4, True: 0.4}
# Layer passes over the calibration tokens per reconstruction mode (sequential: the dense and the pruned stream; it
# was 3 with the refitted layer run again, and dropping that pass took ~20% off the measured refit), fitted to the
# same run
RECONSTRUCT_PASSES = {"none": 0, "one-shot": 2, "sequential": 2.4}


TEACHERS = ("live", "cached")


@dataclass
class RecoverySource:
    """recovery data and teacher"""

    recover_data: str = field(default="c4", metadata=described(
        "text to distil on (c4, wikitext2, a .txt file, a .jsonl file with a text field, a directory of text or "
        "source files, or self: windows of --max-len tokens, no labels needed), an Alpaca instruction .json file "
        "(prompt masked), or 'none' to skip the stage"))
    recover_tokens: int = field(default=16384, metadata=described(
        "tokens of recovery data per epoch (windows of --max-len; instruction data: the first examples up to it)"))

    recover_teacher: str = field(default="live", metadata=described(
        "live: the dense model from the same weights (adapters and masks off), run at every step; cached: its top-k "
        "log-probabilities over the recovery data, computed once before pruning and stored in the output, so that "
        "no teacher runs during recovery (see --recover-top-k)"))
    recover_top_k: int = field(default=64, metadata=described(
        "cached teacher: teacher tokens kept per position (8·k bytes per token on disk); the KL lumps the others "
        "into one outcome"))

    def validate(self) -> None:
        if self.recover_tokens < 1:
            raise SdmpruneError(f"--recover-tokens must be at least 1, got {self.recover_tokens}")
        if self.recover_teacher not in TEACHERS:
            raise SdmpruneError(f"unknown --recover-teacher '{self.recover_teacher}': choose {', '.join(TEACHERS)}")
        if self.recover_top_k < 1:
            raise SdmpruneError(f"--recover-top-k must be at least 1, got {self.recover_top_k}")


@dataclass
class CompressRun(PruningRunOptions):
    """Dense model to deployable model: prune and reconstruct with the selection that suits the model (the preset's
    or the paper's scores, whichever refits to the lower held-out perplexity), recover by distillation from the
    dense model held in the same weights, evaluate, export."""

    pruning: PruneConfig = field(default_factory=lambda: recommended_pruning(bf16=True))
    reconstruction: ReconstructConfig = field(default_factory=ReconstructConfig)
    recovery: RecoveryOptions = field(default_factory=lambda: RecoveryOptions(
        epochs=1, batch_size=4, grad_accum=2, max_len=256, kd_beta=1.0,
        lora=LoraOptions(lora_dropout=0.0, lora_targets=COMPRESS_LORA_TARGETS),
        training=TrainingOptions(lr=5e-4, save_every=4)))
    source: RecoverySource = field(default_factory=RecoverySource)
    tasks: TaskOptions = field(default_factory=TaskOptions)
    # --ppl-data may name several texts here (comma-separated), each measured after every stage
    evaluation: PerplexityOptions = field(default_factory=lambda: PerplexityOptions(max_tokens=8192))
    export_stages: bool = field(default=False, metadata=described(
        "also export the model as it is after the prune and the reconstruct stages (sliced, loadable like the "
        f"final export) into OUTPUT/{STAGE_MODELS}/pruned and .../reconstructed, e.g. to run the zero-shot tasks on "
        "each stage; a second copy of the weights while each is written, not counted in the stage's figures"))
    dry_run: bool = field(default=False, metadata=described(
        "print the plan (stages, estimated time and memory) and stop"))


# ----------------------------------------------------------------------------- the plan


def _matmul_gflops(bf16: bool, device: torch.device) -> float:
    """This machine's matmul speed (GFLOP/s), measured on 1024 x 1024 products for about 0.2 s."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(1024, 1024, dtype=dtype, device=device)
    a @ a  # warm-up
    start, runs = time.perf_counter(), 0
    while time.perf_counter() - start < 0.2:
        a @ a
        runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * 1024**3 * runs / (time.perf_counter() - start) / 1e9


def plan(config: CompressRun, model: nn.Module) -> list[dict]:
    """The stages that will run, each with its estimated seconds and peak memory (GiB): pass FLOPs counted
    from the parameters and tokens, at the efficiencies above of the matmul speed measured now."""
    count, pruning = count_parameters(model), config.pruning
    device = next(model.parameters()).device
    bf16 = use_bf16(device, pruning.runtime.bf16)  # what the passes will run in
    params, width = count.total, max(count.widths)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ceiling = _matmul_gflops(bf16, device) * 1e9
    calibration_tokens = config.calibration.calib_samples * config.calibration.calib_seq_len
    refit_tokens = (config.reconstruction.refit_samples or config.calibration.calib_samples) * \
        config.calibration.calib_seq_len
    candidates = pruning.criterion.candidates().values()
    recovery_tokens = config.source.recover_tokens * config.recovery.epochs
    eval_tokens = config.evaluation.max_tokens * len(perplexity_sets(config.evaluation))
    # SharedContextLM runs ~100 tokens per item (233,624 for the 12 local tasks' first 200 items with Qwen2.5's
    # tokenizer); without --limit, ~1,000 items per task
    task_items = (config.tasks.limit or 1000) * len(parse_task_names(config.tasks.tasks)) if config.tasks.tasks else 0
    task_tokens = 100 * task_items
    reconstruct_passes = RECONSTRUCT_PASSES[config.reconstruction.reconstruct]
    recovering = config.source.recover_data != "none"
    cached = recovering and config.source.recover_teacher == "cached"
    cold_start = 4 if pruning.criterion.name == "sdmprune" else 0
    # (forward-only FLOPs, training FLOPs): 2 per parameter and token forward, 6 with the backward pass
    work = {
        "calibrate": (2 * params * (eval_tokens + cached * recovery_tokens // config.recovery.epochs), 0),
        "prune": (2 * params * (eval_tokens + pruning.steps * calibration_tokens),
                  (cold_start + 4 * pruning.steps) * params * calibration_tokens),
        "reconstruct": (2 * params * (eval_tokens + reconstruct_passes * refit_tokens), 0),
        # each candidate's prune and refit, and its perplexity on the selection windows
        "select": (2 * params * (eval_tokens + len(candidates) * (
            pruning.steps * calibration_tokens + reconstruct_passes * refit_tokens
            + SELECTION_WINDOWS * config.calibration.calib_seq_len)),
                   len(candidates) * (cold_start + 4 * pruning.steps) * params * calibration_tokens),
        "recover": (2 * params * (eval_tokens + (not cached) * recovery_tokens),
                    6 * params * recovery_tokens * recovering),
        "evaluate": (2 * params * task_tokens, 0),
        "export": (0, 0),
    }
    logits = 4 * max(config.calibration.calib_seq_len, config.recovery.max_len) * model.config.vocab_size
    eval_logits = 4 * config.evaluation.seq_len * model.config.vocab_size * config.evaluation.eval_batch_size
    # above a base: on a GPU what is allocated now; on the CPU what the process holds now plus the weights (loaded
    # weights are often memory-mapped and become resident only when a pass reads them; where they already are, the
    # base counts them twice). A stage's peak also holds what earlier stages left on the heap, not modelled here.
    weight_gradients = any(getattr(candidate, "importance", "") in WEIGHT_IMPORTANCES for candidate in candidates)
    extra = {
        "calibrate": 3 * eval_logits,
        "prune": weight_bytes * (1 + weight_gradients) + 3 * logits,
        # one layer's fp64 Gram at a time, two with held-out windows
        "reconstruct": weight_bytes + 8 * width**2 * (1 + (config.reconstruction.refit_holdout > 0)),
        # fp32 logits of a window live in ~16 copies (student, teacher, softmaxes, gradients)
        "recover": weight_bytes * 0.3 + 16 * logits * config.recovery.batch_size,
        "evaluate": weight_bytes * 0.2,
        "export": weight_bytes,
    }
    extra["select"] = max(extra["prune"], extra["reconstruct"] * (config.reconstruction.reconstruct != "none"))
    held = (PeakMemory(device).current_mib() or 0) * 2**20
    base = held if device.type == "cuda" else weight_bytes + held
    efficiency = FORWARD_EFFICIENCY[bf16], TRAINING_EFFICIENCY[bf16]
    seconds = {stage: forward / (ceiling * efficiency[0]) + training / (ceiling * efficiency[1])
               for stage, (forward, training) in work.items()}
    return [{"stage": stage, "seconds": round(seconds[stage], 1),
             "memory_gib": round((base + extra[stage]) / 2**30, 2)}
            for stage in (CHOOSING_STAGES if len(candidates) > 1 else STAGES)
            if stage != "reconstruct" or config.reconstruction.reconstruct != "none"
            if stage != "recover" or recovering]


def perplexity_sets(options: PerplexityOptions) -> list[str]:
    """The texts of a comma-separated --ppl-data ([] for none)."""
    return [] if options.ppl_data == "none" else [name.strip() for name in options.ppl_data.split(",") if name.strip()]


def print_plan(stages: list[dict], config: CompressRun) -> None:
    print(f"plan for {config.model.model} -> {config.output.output} (estimates on this machine):")
    for index, stage in enumerate(stages, start=1):
        print(f"  {index}. {stage['stage']:12s} ~{stage['seconds']:8.1f} s   peak ~{stage['memory_gib']:.2f} GiB")
    print(f"  total ~{sum(s['seconds'] for s in stages):.0f} s")


# ----------------------------------------------------------------------------- the stages


def live_teacher(peft_model: nn.Module, masks: NeuronMasks, bf16: bool) -> Teacher:
    """The dense model from the student's own weights: adapters off (peft) and masks off (which also takes the
    reconstruction's refit away)."""

    def output(batch: dict[str, torch.Tensor], hidden: bool) -> TeacherOutput:
        with peft_model.disable_adapter(), masks.disabled():
            return run_teacher(peft_model, batch, bf16, hidden)

    return output


def recovery_data(config: CompressRun, model: nn.Module, tokenizer):
    """Tokenised recovery examples: windows of text, or instruction examples up to --recover-tokens."""
    source, length = config.source, config.recovery.max_len
    if Path(source.recover_data).suffix == ".json":
        examples = load_instructions(source.recover_data)
        data = tokenize_dataset(tokenizer, examples, length)
        total, keep = 0, 0
        while keep < len(data) and total < source.recover_tokens:
            total, keep = total + len(data.input_ids[keep]), keep + 1
        data.input_ids, data.labels = data.input_ids[:keep], data.labels[:keep]
        return data
    n_windows = max(1, source.recover_tokens // length)
    windows, _ = load_calibration(source.recover_data, tokenizer, n_samples=n_windows, seq_len=length,
                                  seed=config.pruning.runtime.seed + 1, model=model, data_dir=config.data.data_dir,
                                  temperature=config.calibration.calib_temperature,
                                  top_p=config.calibration.calib_top_p)
    return text_windows(windows)


def plot_stages(figures: dict[str, dict[str, dict]], path: Path) -> None:
    """Perplexity after each stage (log scale), one bar per evaluation text, as a PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 3.5), layout="tight")
    axes = figure.subplots()
    stages = list(figures)
    texts = list(figures[stages[0]])
    width = 0.8 / len(texts)
    for offset, text in enumerate(texts):
        values = [figures[stage][text]["ppl"] for stage in stages]
        xs = [x + (offset - (len(texts) - 1) / 2) * width for x in range(len(stages))]
        axes.bar(xs, values, width, label=f"{text} ({figures[stages[0]][text]['tokens']} tokens)")
        for x, value in zip(xs, values, strict=True):
            axes.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom", fontsize=8)
    axes.set_xticks(range(len(stages)), stages)
    axes.set_yscale("log")
    axes.set_ylabel("perplexity")
    axes.set_title("perplexity after each stage")
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def run(config: CompressRun) -> dict:
    """Run every stage (resuming the saved ones) and export; returns the report written to pruning.json."""
    validate(config)
    if config.source.recover_teacher == "cached" and config.recovery.kd_hidden > 0:
        raise SdmpruneError("the cached teacher holds no hidden states: --kd-hidden needs --recover-teacher live")
    config.pruning.width_multiple = config.export.width_multiple(config.pruning.width_multiple)
    pruning, output = config.pruning, Path(config.output.output)
    bf16 = pruning.runtime.bf16
    if not config.dry_run:
        resume = prepare_output(output, overwrite=config.output.overwrite, resume=config.output.resume,
                                finished=FINISHED)
    names = parse_task_names(config.tasks.tasks) if config.tasks.tasks else None
    task_selection = resolve_tasks(names, config.data.data_dir) if names else None
    model, tokenizer = load(config.model)
    check_plan(model, pruning)
    context = context_length(model)
    if context is not None and config.recovery.max_len > context:
        raise SdmpruneError(f"--max-len {config.recovery.max_len} is longer than the model's context ({context} "
                            "tokens): lower it")
    stages = plan(config, model)
    if config.dry_run:
        print_plan(stages, config)
        return {"plan": stages}
    windows = []  # (options naming one evaluation text, its (n, seq_len) windows)
    for text in perplexity_sets(config.evaluation):
        options = replace(config.evaluation, ppl_data=text)
        if (text_windows := perplexity_windows(options, config.data, model, tokenizer)) is not None:
            windows.append((options, text_windows))
    calibration = calibration_windows(config.calibration, config.data, model, tokenizer, pruning.runtime.seed)
    names_in_plan = [stage["stage"] for stage in stages]
    windows_to_refit = windows_to_select = None  # each (ids, summary) where needed
    if config.reconstruction.reconstruct != "none":
        windows_to_refit = refit_windows(config.reconstruction, config.calibration, config.data, model, tokenizer,
                                         pruning.runtime.seed, calibration[0])
    if "select" in names_in_plan:
        windows_to_select = selection_windows(config.calibration, config.data, model, tokenizer, pruning.runtime.seed)
    data = recovery_data(config, model, tokenizer) if config.source.recover_data != "none" else None
    clear_for_new_run(output, resume)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    teacher_cache = output / "stages" / "teacher_top_k.safetensors"

    settings = {k: v for k, v in to_dict(config).items() if k not in ("output", "dry_run")}
    state = Checkpoint(output)  # the stages done and their figures; prune and recover keep their own states
    progress = state.load(settings)[0] if resume and state.exists() else {"done": [], "figures": {}, "reports": {}}
    state.save(settings, progress, {})  # from here on a killed run is an interrupted one, to --resume
    figures, reports = progress["figures"], progress["reports"]

    memory = PeakMemory(next(model.parameters()).device)

    def finish(stage: str, started: float, figure_name: str | None = None) -> None:
        if figure_name and windows and figure_name not in figures:
            figures[figure_name] = {}
            for options, text_windows in windows:
                figure = measure(model, tokenizer, text_windows, options, bf16)
                figure.pop("window_nll")
                figures[figure_name][figure["data"]] = figure
        if stage not in progress["done"]:
            peak = memory.peak_mib()
            reports.setdefault(stage, {}).update(seconds=round(time.perf_counter() - started, 2),
                                                 peak_memory_mib=None if peak is None else round(peak))
            progress["done"].append(stage)
        state.save(settings, progress, {})

    def export_stage(figure_name: str, masks: NeuronMasks, report: dict) -> None:
        """--export-stages: the masked model as it is now, sliced into OUTPUT/stage-models/FIGURE_NAME."""
        target = output / STAGE_MODELS / figure_name
        if config.export_stages and not target.exists():  # a resumed run keeps what it exported
            export_copy(model, tokenizer, masks, target, padded=config.export.padded,
                        report={**report, "source_model": config.model.model, "stage": figure_name})

    def begin(index: int, stage: str) -> float:
        estimate = next(s["seconds"] for s in stages if s["stage"] == stage)
        say(f"[{index}/{len(stages)}] {stage}{' (done, restoring)' if stage in progress['done'] else ''} "
            f"~{estimate:.0f} s")
        memory.reset()
        return time.perf_counter()

    started = begin(1, "calibrate")
    if data is not None and config.source.recover_teacher == "cached" and "calibrate" not in progress["done"]:
        reports["calibrate"] = {"teacher_cache": cache_teacher(
            model, data, teacher_cache, top_k=config.source.recover_top_k,
            temperature=config.recovery.kd_temperature, bf16=bf16, batch_size=config.recovery.batch_size,
            pad_id=pad_id)}
    finish("calibrate", started, "dense")

    if "select" in names_in_plan:
        started = begin(2, "select")
        # a resumed run past this stage reruns only the candidate it kept (deterministic: the same refit)
        chosen = prune_and_refit(model, pruning, calibration=calibration, refit=windows_to_refit,
                                 reconstruction=config.reconstruction, selection=windows_to_select,
                                 state_dir=output / "stages" / "prune", resume=resume,
                                 batch_size=config.evaluation.eval_batch_size,
                                 chosen_before=reports.get("select", {}).get("chosen"))
        result, masks = chosen.result, chosen.result.masks
        if chosen.report is not None:
            reports["select"] = dict(chosen.report)
            if chosen.reconstruction is not None:
                reports["select"]["reconstruction"] = chosen.reconstruction
        finish("select", started, "selected")
        export_stage("selected", masks, {**result.report, "selection": reports["select"]})
    else:
        started = begin(2, "prune")
        chosen = prune_and_refit(model, pruning, calibration=calibration,
                                 state_dir=output / "stages" / "prune", resume=resume)
        result, masks = chosen.result, chosen.result.masks
        finish("prune", started, "pruned")
        export_stage("pruned", masks, result.report)

    if "reconstruct" in names_in_plan:
        started = begin(names_in_plan.index("reconstruct") + 1, "reconstruct")
        reports["reconstruct"] = reconstruct_on(model, masks, windows_to_refit, config.reconstruction,
                                                micro_batch=pruning.micro_batch, bf16=bf16)
        finish("reconstruct", started, "reconstructed")
        export_stage("reconstructed", masks, {**result.report, "reconstruction": reports["reconstruct"]})

    if data is not None:
        started = begin(names_in_plan.index("recover") + 1, "recover")
        torch.manual_seed(pruning.runtime.seed)  # the LoRA initialisation
        peft_model, _ = attach_lora(model, config.recovery.lora)
        peft_model.train()
        recovery_state = Checkpoint(output / "stages" / "recover")
        cached = config.source.recover_teacher == "cached"
        teacher = (CachedTeacher(teacher_cache, next(model.parameters()).device) if cached
                   else live_teacher(peft_model, masks, bf16))
        trained = train(peft_model, teacher, data, pad_id, config.recovery, pruning.runtime, recovery_state, settings,
                        resume=recovery_state.exists(), keep_final_state=True)
        model = peft_model.merge_and_unload().eval()
        reports["recover"] = {**reports.get("recover", {}), "steps": trained["steps"], "tokens": trained["tokens"],
                              "target_tokens": trained["target_tokens"], "first_loss": trained["log"][0]["loss"],
                              "final_loss": trained["log"][-1]["loss"],
                              "teacher": f"cached top-{config.source.recover_top_k} log-probabilities" if cached
                              else "live (same weights, adapters and masks off)"}
        finish("recover", started, "recovered")

    started = begin(names_in_plan.index("evaluate") + 1, "evaluate")
    if names and "tasks" not in reports.get("evaluate", {}):
        reports["evaluate"] = {"tasks": evaluate_tasks(model, tokenizer, task_selection, limit=config.tasks.limit,
                                                       batch_size=config.evaluation.eval_batch_size, bf16=bf16,
                                                       seed=pruning.runtime.seed)}
    finish("evaluate", started)

    begin(len(stages), "export")
    report = {**result.report, "source_model": config.model.model, "compress": to_dict(config),
              "stages": [{"stage": s, **reports.get(s, {})} for s in progress["done"]] + [{"stage": "export"}],
              "evaluation": figures, "plan": stages}

    def extra(directory: Path) -> None:
        if figures:
            plot_stages(figures, directory / "stages.png")
        if (output / STAGE_MODELS).exists():
            (output / STAGE_MODELS).rename(directory / STAGE_MODELS)

    export_pruned(model, tokenizer, masks, output, report=report, overwrite=True, padded=config.export.padded,
                  extra=extra)
    gguf = config.export.gguf.write(output)

    achieved = report["achieved"]
    print(f"\n{config.model.model} -> {output}  (compress: {', '.join(names_in_plan)})")
    print(f"achieved ratio {achieved['ratio']:.4f} of total parameters; parameters {achieved['params_before']:,} -> "
          f"{achieved['params_after']:,}")
    if "select" in reports:
        print(describe_choice(reports["select"]))
    for text in next(iter(figures.values()), {}):
        print(f"perplexity ({text}): " + " -> ".join(f"{stage} {figure[text]['ppl']:.2f}"
                                                     for stage, figure in figures.items()))
    extras = (", stages.png" if figures else "") + (f", {gguf.name}" if gguf else "")
    print(f"wrote {output}/ (pruning.json, README.md, model.safetensors{extras})")
    return report
