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
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import __version__
from .errors import SdmpruneError
from .io import atomic_directory, check_output_dir
from .masks import HeadMasks, NeuronMasks, attention_group_shape, count_parameters
from .models.architectures import Architecture, get_architecture
from .models.loading import resolve_device, resolve_dtype


def _take(tensor: torch.Tensor, dim: int, index: torch.Tensor, size: int) -> nn.Parameter:
    """Entries `index` of `tensor` along `dim`, zero-padded to `size` (>= len(index)) there."""
    kept = tensor.detach().index_select(dim, index.to(tensor.device))
    if size > index.numel():
        pad_shape = list(kept.shape)
        pad_shape[dim] = size - index.numel()
        kept = torch.cat([kept, kept.new_zeros(pad_shape)], dim=dim)
    return nn.Parameter(kept.contiguous(), requires_grad=tensor.requires_grad)


def _resize_outputs(linear: nn.Linear, index: torch.Tensor, size: int) -> None:
    linear.weight = _take(linear.weight, 0, index, size)
    if linear.bias is not None:
        linear.bias = _take(linear.bias, 0, index, size)
    linear.out_features = size


def _resize_mlp(architecture: Architecture, mlp: nn.Module, index: torch.Tensor, width: int) -> None:
    """Keep neurons `index` of one MLP, zero-padded to `width` (>= len(index)), in place."""
    gate, up, down = architecture.projections(mlp)
    for linear in (gate, up):
        _resize_outputs(linear, index, width)
    down.weight = _take(down.weight, 1, index, width)
    down.in_features = width


def _resize_attention(architecture: Architecture, attention: nn.Module, index: torch.Tensor, n_groups: int,
                      group_size: int, head_dim: int) -> None:
    """Keep attention groups `index` (key/value heads with their G query heads) of one attention block,
    zero-padded to `n_groups` (>= len(index)) groups, in place."""
    q, k, v, o = architecture.attention_projections(attention)
    index = index.to(q.weight.device)

    def channels(width: int) -> torch.Tensor:  # the rows of each kept group in a (groups·width)-row weight
        return (index[:, None] * width + torch.arange(width, device=index.device)).flatten()

    _resize_outputs(q, channels(group_size * head_dim), n_groups * group_size * head_dim)
    for linear in (k, v):
        _resize_outputs(linear, channels(head_dim), n_groups * head_dim)
    o.weight = _take(o.weight, 1, channels(group_size * head_dim), n_groups * group_size * head_dim)
    o.in_features = n_groups * group_size * head_dim


def _set_attention_config(model: PreTrainedModel, n_groups: int) -> None:
    group_size, head_dim = attention_group_shape(model)
    model.config.head_dim = head_dim  # explicit: hidden_size // num_attention_heads no longer holds
    model.config.num_key_value_heads = n_groups
    model.config.num_attention_heads = n_groups * group_size


def _store_down_bias(architecture: Architecture, model: PreTrainedModel, biases: list[torch.Tensor | None]) -> None:
    """Turn the masks' down_proj biases into real biases via the config's MLP-bias flag (gate/up biases zero)."""
    if architecture.bias_key is None:
        raise SdmpruneError(f"'{model.config.model_type}' has no MLP-bias option to store the compensation bias "
                            "in: prune without bias compensation (--no-bias-compensation)")
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


def slice_model(model: PreTrainedModel, masks: NeuronMasks, *, padded: bool = False,
                heads: HeadMasks | None = None) -> list[int]:
    """Remove the masked neurons (and, with `heads`, attention groups) from `model` in place and detach
    the masks; returns the stored widths.

    With `padded`, layers narrower than the widest are zero-padded to its width (and head count). A
    compensation bias held by the masks becomes down_proj's bias.
    """
    architecture = get_architecture(model)
    widths = masks.widths
    width_max = max(widths)
    for mlp, keep in zip(architecture.mlps(model), masks.keep, strict=True):
        index = torch.nonzero(keep).flatten()
        _resize_mlp(architecture, mlp, index, width_max if padded else index.numel())
    if any(bias is not None for bias in masks.down_bias):
        _store_down_bias(architecture, model, masks.down_bias)
    masks.remove()
    setattr(model.config, architecture.width_key, width_max)
    if heads is not None:
        group_size, head_dim = attention_group_shape(model)
        groups_max = max(heads.kv_heads)
        for attention, keep in zip(architecture.attentions(model), heads.keep, strict=True):
            index = torch.nonzero(keep).flatten()
            _resize_attention(architecture, attention, index, groups_max if padded else index.numel(),
                              group_size, head_dim)
        heads.remove()
        _set_attention_config(model, groups_max)
    return [width_max] * len(widths) if padded else widths


def library_versions() -> dict[str, str]:
    import transformers

    return {
        "sdmprune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


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
    for name, result in record.get("evaluation", {}).items():
        lines.append(f"| perplexity {name} | {result} |")
    lines += ["", "## Loading", "", loading, "", "`pruning.json` lists the kept neuron indices of every layer.", ""]
    return "\n".join(lines)


def _load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(directory / name))
    return state


def load_pruned(directory: str | Path, *, dtype: str = "auto", device: str = "auto"):
    """Load any sdmprune export, including per-layer widths, as `(model, tokenizer)`."""
    directory = Path(directory)
    record_path = directory / "pruning.json"
    if not record_path.is_file():
        raise SdmpruneError(f"{directory} has no pruning.json: it is not an sdmprune export")
    record = json.loads(record_path.read_text())
    torch_device = resolve_device(device)
    config = AutoConfig.from_pretrained(directory)
    architecture = get_architecture(config.model_type)
    per_layer = record["export"]["layout"] == "per-layer"
    stored: Sequence[int] = (
        record["widths"] if per_layer else [record["export"]["intermediate_size"]] * len(record["widths"])
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for mlp, width in zip(architecture.mlps(model), stored, strict=True):
        _resize_mlp(architecture, mlp, torch.arange(width), width)
    if per_layer and "kv_heads" in record:
        group_size, head_dim = attention_group_shape(model)
        for attention, n_groups in zip(architecture.attentions(model), record["kv_heads"], strict=True):
            _resize_attention(architecture, attention, torch.arange(n_groups), n_groups, group_size, head_dim)
    missing, unexpected = model.load_state_dict(_load_state_dict(directory), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise SdmpruneError(f"{directory} does not match its pruning.json (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model = model.to(device=torch_device, dtype=resolve_dtype(dtype, torch_device)).eval()
    return model, AutoTokenizer.from_pretrained(directory)
