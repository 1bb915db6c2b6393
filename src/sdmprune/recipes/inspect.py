"""Recipe `inspect`: layers, widths and parameter counts of a model (and its pruning record)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..distributed import is_main
from ..masks import count_parameters
from ..models import DEFAULT_MODEL, load_model
from ..options import described


@dataclass
class InspectRun:
    """Layers, widths and parameter counts of a model."""

    model: str = field(default=DEFAULT_MODEL, metadata=described("model spec, as for --model",
                                                                                positional=True))
    json: bool = field(default=False, metadata=described("print JSON instead of a table"))


def run(config: InspectRun) -> dict:
    model, _ = load_model(config.model, device="cpu")
    count = count_parameters(model)
    info = {
        "model": config.model,
        "model_type": model.config.model_type,
        "layers": len(count.widths),
        "hidden_size": model.config.hidden_size,
        "params_total": count.total,
        "params_mlp": count.mlp,
        "widths": count.widths,
        "mlp_params_per_layer": count.mlp_per_layer,
    }
    record = Path(config.model) / "pruning.json"
    if record.is_file():
        pruning = json.loads(record.read_text())
        info["pruning"] = {k: pruning[k] for k in ("method", "requested", "achieved", "widths", "export")}
    if not is_main():  # nothing to share out: rank 0 answers
        return info
    if config.json:
        print(json.dumps(info, indent=1))
        return info
    print(f"{config.model}: {info['model_type']}, {info['layers']} layers, hidden {info['hidden_size']}")
    print(f"parameters: {count.total:,} total, {count.mlp:,} in MLPs ({count.mlp / count.total:.1%})")
    widths = info.get("pruning", {}).get("widths", count.widths)
    print("layer  MLP width  MLP params")
    for layer, (width, params) in enumerate(zip(widths, count.mlp_per_layer, strict=True)):
        print(f"{layer:5d}  {width:9d}  {params:10,}")
    if "pruning" in info:
        p = info["pruning"]
        print(f"pruned with {p['method']}: requested {p['requested']}, achieved ratio {p['achieved']['ratio']:.4f}"
              f", layout {p['export']['layout']}")
    return info
