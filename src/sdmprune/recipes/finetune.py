"""Recipe `finetune`: LoRA recovery of a (pruned) model on instruction data, optionally distilling from the
dense original; DDP or FSDP2 over several processes.

    from sdmprune.recipes import finetune
    record = finetune.run(finetune.FinetuneRun.of(model="runs/p20", data="alpaca.json", output="runs/p20-lora"))

Steps: check every input → load the student (and teacher) → tokenise the data → attach LoRA (shard) →
train (resumable) → write the adapter, loss.json/.png, recovery.json and with --merge a merged/ model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, clear_for_new_run, prepare_output
from ..distributed import barrier, is_main, shard_model
from ..errors import SdmpruneError
from ..export import unshard_lora
from ..io import atomic_directory
from ..lora import attach_lora
from ..models import load_model
from ..options import FromOptions, to_dict, validate
from ..recovery.adapter import model_ref
from ..recovery.data import load_instructions, tokenize_dataset
from ..recovery.finetune import FinetuneConfig, model_teacher, train
from ..runtime import context_length, library_versions
from .options import GgufOptions, ModelOptions, OutputOptions, ParallelOptions
from .steps import load

FINISHED = "recovery.json"


@dataclass
class FinetuneRun(FromOptions):
    """LoRA recovery of a (pruned) model on instruction data, optionally distilling from the dense original."""

    output: OutputOptions
    finetune: FinetuneConfig
    model: ModelOptions = field(default_factory=ModelOptions)
    parallel: ParallelOptions = field(default_factory=ParallelOptions)
    gguf: GgufOptions = field(default_factory=GgufOptions)

    def validate(self) -> None:
        if self.gguf.gguf is not None and not self.finetune.merge:
            raise SdmpruneError("--gguf writes the merged model: pass --merge too")


def source_record(spec: str) -> dict | None:
    """The pruning.json of a local model directory, if it has one."""
    path = Path(spec).expanduser() / "pruning.json"
    return json.loads(path.read_text()) if path.is_file() else None


def teacher_spec(config: FinetuneConfig, source: dict | None) -> str:
    if config.teacher_model:
        return config.teacher_model
    if source and source.get("source_model"):
        return source["source_model"]
    raise SdmpruneError("--kd needs a teacher: the model has no pruning.json naming its source_model, so pass "
                        "--teacher-model (the dense original)")


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


def write_output(output: Path, model, tokenizer, log: list, record: dict, source: dict | None, merge: bool) -> None:
    with atomic_directory(output, overwrite=True) as tmp:  # replaces the run state
        model.save_pretrained(tmp)
        (tmp / "loss.json").write_text(json.dumps(log, indent=1))
        plot_loss(log, tmp / "loss.png")
        (tmp / FINISHED).write_text(json.dumps(record, indent=1))
        if merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(tmp / "merged")
            tokenizer.save_pretrained(tmp / "merged")
            if source is not None:  # the pruning record travels with the weights, extended by the recovery
                (tmp / "merged" / "pruning.json").write_text(json.dumps({**source, "recovery": record}, indent=1))


def run(config: FinetuneRun, *, progress: bool = True) -> dict:
    """Train the adapter and write the output; returns the recovery record."""
    validate(config)
    settings, spec, output = config.finetune, config.model.model, Path(config.output.output)
    fsdp = config.parallel.fsdp
    resume = prepare_output(output, overwrite=config.output.overwrite, resume=config.output.resume, finished=FINISHED)
    examples = load_instructions(settings.data, settings.max_samples)
    recovery = settings.recovery
    source = source_record(spec)
    teacher_name = teacher_spec(settings, source) if settings.kd else None

    torch.manual_seed(settings.runtime.seed)  # the same LoRA initialisation in every process
    student, tokenizer = load(config.model, device="cpu" if fsdp else None)
    context = context_length(student)
    if context is not None and recovery.max_len > context:
        raise SdmpruneError(f"--max-len {recovery.max_len} is longer than the model's context ({context} tokens): "
                            "lower it")
    data = tokenize_dataset(tokenizer, examples, recovery.max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    teacher = None
    if settings.kd:
        device = str(next(student.parameters()).device)
        teacher, _ = load_model(teacher_name, dtype=config.model.dtype, device=device,
                                trust_remote_code=config.model.trust_remote_code)
        teacher.requires_grad_(False)
        if teacher.config.vocab_size != student.config.vocab_size:
            raise SdmpruneError(f"teacher {teacher_name} has a different vocabulary ({teacher.config.vocab_size} vs "
                                f"{student.config.vocab_size}): pass the dense model the student was pruned from")
        if fsdp:
            shard_model(teacher)
    peft_model, lora = attach_lora(student, recovery.lora, task_type="CAUSAL_LM",
                                   base_model_name_or_path=model_ref(spec))
    if fsdp:  # LoRA weights are sharded with the decoder layer they sit in
        shard_model(student)
    peft_model.train()
    clear_for_new_run(output, resume)
    run_settings = {"model": spec, **to_dict(settings), "fsdp": fsdp}  # what a resumed run must match
    teacher_logits = model_teacher(teacher, settings.runtime.bf16) if teacher is not None else None
    trained = train(peft_model, teacher_logits, data, pad_id, recovery, settings.runtime, Checkpoint(output),
                    run_settings, resume=resume, progress=progress)
    peft_model.eval()
    log = trained["log"]
    record = {
        "base_model": spec,
        "data": settings.data,
        "examples": len(data),
        "examples_dropped": data.dropped,
        "steps": trained["steps"],
        "epochs": trained["epochs"],
        "tokens": trained["tokens"],
        "target_tokens": trained["target_tokens"],
        "lr": recovery.training.lr,
        "final_loss": log[-1]["loss"],
        "seconds": round(trained["seconds"], 2),
        "tokens_per_s": trained["tokens"] / trained["seconds"],
        "teacher": teacher_name,
        "config": to_dict(settings),
        "versions": library_versions(),
    }
    weights_dtype = str(next(student.parameters()).dtype).removeprefix("torch.")
    plain = (unshard_lora(peft_model, spec, lora, weights_dtype, config.model.trust_remote_code) if fsdp
             else peft_model)
    if is_main():
        write_output(output, plain, tokenizer, log, record, source, settings.merge)
        config.gguf.write(output / "merged")
        teacher_note = f", KD from {teacher_name}" if settings.kd else ""
        print(f"\n{spec} -> {output}  (LoRA r={recovery.lora.lora_r}{teacher_note})")
        print(f"{record['steps']} steps ({record['epochs']:.2f} epochs of {record['examples']} examples), "
              f"{record['tokens']:,} tokens in {record['seconds']:.0f} s ({record['tokens_per_s']:.0f} tokens/s); "
              f"final loss {record['final_loss']:.4f}")
        print(f"wrote {output}/ (adapter, loss.json, loss.png, recovery.json{', merged/' if settings.merge else ''})")
    barrier()
    return record


def finetune(model: str, output: str | Path, *, progress: bool = True, **options) -> dict:
    """`run` from flat option names: `finetune("runs/p20", "runs/p20-lora", data="alpaca.json", max_steps=10)`."""
    return run(FinetuneRun.of(model=str(model), output=str(output), **options), progress=progress)
