"""Physically remove masked neurons (and attention groups) and write a standard Hugging Face directory.

Layouts (recorded in pruning.json under `export.layout`):
- `uniform`: every layer has the same width (and number of key/value heads); `config.intermediate_size`
  (`num_key_value_heads`) = that. Loads with plain `AutoModelForCausalLM.from_pretrained`.
- `per-layer`: widths or head counts differ; tensors have their true shapes, the config holds the
  largest. Load with `sdmprune.load_pruned(dir)`.
- `padded`: widths or head counts differ, every layer zero-padded to the largest. Exactly the same
  function (a zero neuron contributes nothing; a key/value group with zero v rows and o columns
  neither) and loads with plain transformers, at the cost of the padding.
When attention groups are removed, `config.head_dim` is written explicitly and `num_attention_heads`
= G · `num_key_value_heads`, so every layer stays an ordinary GQA layer with G query heads per group.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import SdmpruneError
from ..io import atomic_directory, check_output_dir
from ..masks import ChannelMasks, HeadMasks, NeuronMasks, count_parameters
from ..models.architectures import Architecture, attention_group_shape, get_architecture
from ..models.resize import resize_attention, resize_mlp
from ..runtime import library_versions
from ..selection import describe_choice


def _set_attention_config(model: PreTrainedModel, n_groups: int) -> None:
    group_size, head_dim = attention_group_shape(model)
    model.config.head_dim = head_dim  # explicit: hidden_size // num_attention_heads no longer holds
    model.config.num_key_value_heads = n_groups
    model.config.num_attention_heads = n_groups * group_size


def _store_down_bias(architecture: Architecture, model: PreTrainedModel, biases: list[torch.Tensor | None]) -> None:
    """Turn the masks' down_proj biases (the compensation bias or the reconstruction intercept) into real biases
    via the config's MLP-bias flag (gate/up biases zero)."""
    if architecture.bias_key is None:
        raise SdmpruneError(f"'{model.config.model_type}' has no MLP-bias option to store a down_proj bias in: "
                            "prune without bias compensation (--no-bias-compensation) and reconstruction intercept")
    setattr(model.config, architecture.bias_key, True)
    for mlp, bias in zip(architecture.mlps(model), biases, strict=True):
        gate, up, down = architecture.projections(mlp)
        weight = down.weight
        for linear in (gate, up):
            if linear.bias is None:
                linear.bias = nn.Parameter(weight.new_zeros(linear.out_features), requires_grad=weight.requires_grad)
        total = weight.new_zeros(down.out_features) if down.bias is None else down.bias.detach()
        if bias is not None:
            total = total + bias.to(device=weight.device, dtype=weight.dtype)
        down.bias = nn.Parameter(total, requires_grad=weight.requires_grad)


def _take_refits(masks: ChannelMasks) -> None:
    """Make each refit weight held by `masks` the masked linear's own weight."""
    for linear, refit in zip(masks.linears, masks.weight, strict=True):
        if refit is not None:
            weight = refit.to(device=linear.weight.device, dtype=linear.weight.dtype)
            linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)


def slice_model(model: PreTrainedModel, masks: NeuronMasks, *, padded: bool = False,
                heads: HeadMasks | None = None) -> list[int]:
    """Remove the masked neurons (and, with `heads`, attention groups) from `model` in place and detach
    the masks; returns the stored widths.

    With `padded`, layers narrower than the widest are zero-padded to its width (and head count). A weight
    held by the masks (the reconstruction's refit of down_proj, (H, I_l), or of o_proj) replaces the linear's
    own before slicing, and a down_proj bias held by them (compensation or intercept) becomes down_proj's bias.
    """
    architecture = get_architecture(model)
    widths = masks.widths
    width_max = max(widths)
    _take_refits(masks)
    for mlp, keep in zip(architecture.mlps(model), masks.keep, strict=True):
        index = torch.nonzero(keep).flatten()
        resize_mlp(architecture, mlp, index, width_max if padded else index.numel())
    if any(bias is not None for bias in masks.bias):
        _store_down_bias(architecture, model, masks.bias)
    masks.remove()
    setattr(model.config, architecture.width_key, width_max)
    if heads is not None:
        group_size, head_dim = attention_group_shape(model)
        groups_max = max(heads.kv_heads)
        _take_refits(heads)
        for attention, keep in zip(architecture.attentions(model), heads.keep, strict=True):
            index = torch.nonzero(keep).flatten()
            resize_attention(architecture, attention, index, groups_max if padded else index.numel(),
                              group_size, head_dim)
        heads.remove()
        _set_attention_config(model, groups_max)
    return [width_max] * len(widths) if padded else widths


def export_pruned(
    model: PreTrainedModel,
    tokenizer,
    masks: NeuronMasks,
    output_dir: str | Path,
    *,
    report: dict,
    overwrite: bool = False,
    padded: bool = False,
    heads: HeadMasks | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Slice `model` in place (see `slice_model`) and save it with its tokenizer, pruning.json and a card.

    `heads` removes attention groups too; `extra(directory)` may write more files into the export.
    Writes to a temporary sibling directory renamed to `output_dir` at the end, so a failure leaves
    nothing behind. An existing `output_dir` is refused unless `overwrite`.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    kept_indices = masks.kept_indices()
    widths = masks.widths
    attention = {}
    if heads is not None:
        attention = {"kept_kv_heads": heads.kept_indices(), "kv_heads": heads.kv_heads,
                     "kv_heads_before": [mask.numel() for mask in heads.keep]}
    uniform = len(set(widths)) == 1 and len(set(attention.get("kv_heads", [0]))) == 1
    layout = "uniform" if uniform else ("padded" if padded else "per-layer")
    slice_model(model, masks, padded=layout == "padded", heads=heads)
    count = count_parameters(model)
    record = {
        **report,
        "kept_indices": kept_indices,
        "widths": widths,
        **attention,
        "export": {
            "layout": layout,
            "intermediate_size": max(widths),
            **({"num_key_value_heads": model.config.num_key_value_heads} if heads is not None else {}),
            "stored_params": count.total,
        },
        "versions": library_versions(),
    }
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "pruning.json").write_text(json.dumps(record, indent=1))
        (tmp / "README.md").write_text(model_card(record))
        if extra is not None:
            extra(tmp)
    return output_dir


def export_copy(model: PreTrainedModel, tokenizer, masks: NeuronMasks, output_dir: str | Path, *, report: dict,
                padded: bool = False) -> Path:
    """Export (see `export_pruned`) a sliced copy of the masked `model`, leaving `model` and `masks` as they are:
    e.g. an intermediate stage of a run that goes on. Holds a second copy of the weights while it writes."""
    copy = deepcopy(model)  # masks' hooks come along (they are plain functions); only the copy's weights are saved
    copy_masks = NeuronMasks(copy, [keep.clone() for keep in masks.keep])
    copy_masks.weight, copy_masks.bias = list(masks.weight), list(masks.bias)
    return export_pruned(copy, tokenizer, copy_masks, output_dir, report=report, padded=padded)


def _choice(record: dict) -> dict | None:
    """`--importance auto`'s report, from a prune record ("selection") or a compress one (its select stage)."""
    return record.get("selection") or next((stage for stage in record.get("stages", [])
                                            if stage.get("stage") == "select"), None)


def model_card(record: dict) -> str:
    achieved = record["achieved"]
    layout = record["export"]["layout"]
    widths = record["widths"]
    loading = (
        "```python\nfrom transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH)\n```"
        if layout != "per-layer"
        else "```python\nimport sdmprune\nmodel, tokenizer = sdmprune.load_pruned(PATH)\n```\n"
        "(widths differ per layer; re-export with `--padded` for a copy plain transformers loads)"
    )
    kv_heads = record.get("kv_heads")
    removed = "MLP neurons and attention heads (whole key/value groups)" if kv_heads else "MLP neurons"
    lines = [
        "---",
        "tags: [sdmprune, pruned, structured-pruning]",
        "---",
        f"# {record.get('source_model', 'model')} pruned with sdmprune ({record['method']})",
        "",
        f"{removed} were removed with `{record['method']}`" + ("." if kv_heads else "; attention is unchanged."),
        "",
        "| | value |",
        "|---|---|",
        f"| requested | ratio={record['requested']['ratio']}, mlp_ratio={record['requested']['mlp_ratio']} |",
        f"| achieved ratio (of total parameters) | {achieved['ratio']:.4f} |",
        f"| achieved MLP-neuron ratio | {achieved['mlp_ratio']:.4f} |",
        f"| parameters | {achieved['params_before']:,} -> {achieved['params_after']:,} |",
        f"| MLP widths | {record['widths_before'][0]} -> {min(widths)}..{max(widths)} ({layout}) |",
        f"| seed | {record['seed']} |",
    ]
    if kv_heads:
        before = record["kv_heads_before"][0]
        lines.append(f"| key/value heads per layer | {before} -> {min(kv_heads)}..{max(kv_heads)} ({layout}) |")
    criterion = record.get("config", {}).get("criterion", {})
    if "importance" in criterion:
        lines.append(f"| importance | {criterion['importance']} |")
    if choice := _choice(record):
        lines.append(f"| `--importance auto` | {describe_choice(choice)} |")
    for name, figures in record.get("evaluation", {}).items():
        # prune: {"before": figure, "after": figure}; compress: {stage: {text: figure}}
        measured = [figures] if "ppl" in figures else list(figures.values())
        lines.append(f"| perplexity {name} | " + "; ".join(
            f"{figure['ppl']:.2f} on {figure['data']} ({figure['tokens']:,} tokens)" for figure in measured) + " |")
    lines += ["", "## Loading", "", loading, "", "`pruning.json` lists the kept neuron indices of every layer.", ""]
    return "\n".join(lines)
