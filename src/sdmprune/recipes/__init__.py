"""The recipes: each command is `recipe.run(config)`, and so is the Python API.

A pruning method registers `(name, config class, recipe)` in `METHODS`; `sdmprune prune --method NAME` builds
that config's options (one argument group per nested config) and calls the recipe. The other commands
(`compress`, `finetune`, `eval`, `inspect`, `gguf`) are recipes too (`COMMANDS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import compress, evaluate, finetune, gguf, inspect, nuteprune, prune


def summary(config: type) -> str:
    """The first paragraph of a config's docstring, on one line, without its final period."""
    return " ".join((config.__doc__ or config.__name__).strip().split("\n\n")[0].split()).rstrip(".")


@dataclass(frozen=True)
class Recipe:
    config: type  # the config dataclass (options)
    run: Callable  # run(config) -> report
    description: str


METHODS: dict[str, Recipe] = {}


def register_method(name: str, config: type, run: Callable) -> None:
    """Make `sdmprune prune --method NAME` (and the Python API) run `run(config)`."""
    METHODS[name] = Recipe(config, run, summary(config))


register_method("scoring", prune.PruneRun, prune.run)
register_method("nuteprune", nuteprune.NutePruneRun, nuteprune.run)

COMMANDS: dict[str, Recipe] = {
    name: Recipe(module_config, module_run, summary(module_config))
    for name, module_config, module_run in (
        ("compress", compress.CompressRun, compress.run),
        ("finetune", finetune.FinetuneRun, finetune.run),
        ("eval", evaluate.EvaluateRun, evaluate.run),
        ("inspect", inspect.InspectRun, inspect.run),
        ("gguf", gguf.GgufRun, gguf.run),
    )
}
