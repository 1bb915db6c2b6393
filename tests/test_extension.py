"""Extension points from outside the package: a toy criterion and a toy teacher, each one class and one
registration, run end to end through the Python API and the command line; and the package has no import cycle."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field, is_dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import ClassVar, get_type_hints

import pytest
import torch
from conftest import tiny_model

import sdmprune
from sdmprune import prune
from sdmprune.cli import main
from sdmprune.criteria import CRITERIA, Criterion, ScoringContext, Step
from sdmprune.criteria.sdmprune import SDMPrune
from sdmprune.options import described, flat_names
from sdmprune.recipes import COMMANDS, METHODS
from sdmprune.teachers import TEACHERS, Teacher, forward_logits


@CRITERIA.register("toy-index")
@dataclass
class IndexCriterion(Criterion):
    """keeps the neurons with the highest (or lowest) index"""

    needs_calibration = False
    lowest: bool = field(default=False, metadata=described("keep the lowest indices instead"))

    def score(self, context: ScoringContext, step: Step) -> list[torch.Tensor]:
        order = [torch.arange(keep.numel(), dtype=torch.float32) for keep in context.masks.keep]
        return [-o for o in order] if self.lowest else order


@TEACHERS.register("toy-zero")
@dataclass
class ZeroTeacher(Teacher):
    """a teacher whose logits are all `level` (uniform over the vocabulary)"""

    level: float = field(default=0.0, metadata=described("the constant logit"))
    calls_total: ClassVar[int] = 0

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        type(self).calls_total += 1
        dense = forward_logits(self.model, ids)
        return torch.full_like(dense, self.level)


def test_a_toy_criterion_runs_through_the_api_and_the_cli(saved_model, tmp_path, capsys):
    result = prune(tiny_model("llama"), mlp_ratio=0.5, criterion="toy-index", lowest=True)
    assert result.masks.kept_indices() == [list(range(32))] * 2
    assert result.report["config"]["criterion"] == {"name": "toy-index", "lowest": True}

    argv = ["prune", "--model", str(saved_model), "--mlp-ratio", "0.25", "--criterion", "toy-index", "--ppl-data",
            "none", "--reconstruct", "none", "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    record = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert record["method"] == "toy-index" and record["kept_indices"][0] == list(range(16, 64))
    assert main([*argv[:-1], str(tmp_path / "low"), "--lowest"]) == 0
    assert json.loads((tmp_path / "low" / "pruning.json").read_text())["kept_indices"][0] == list(range(48))
    main(["prune", "--help"])
    assert "--lowest" in capsys.readouterr().out  # the CLI lists a plugin's options too


def test_a_toy_teacher_serves_sdmprune(saved_model, tmp_path):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ZeroTeacher.calls_total = 0
    result = prune(tiny_model("llama"), mlp_ratio=0.4, criterion="sdmprune", teacher="toy-zero", level=1.0,
                   calibration=ids, cold_start=0.1)
    assert ZeroTeacher.calls_total == 2  # one teacher pass per window of the distillation step
    assert result.report["config"]["criterion"]["teacher"] == {"name": "toy-zero", "level": 1.0}
    dense_teacher = prune(tiny_model("llama"), mlp_ratio=0.4, criterion="sdmprune", calibration=ids, cold_start=0.1)
    assert result.masks.kept_indices() != dense_teacher.masks.kept_indices()  # the teacher really mattered


def test_options_of_an_unchosen_class_are_refused_with_one_line():
    with pytest.raises(sdmprune.SdmpruneError, match="--alpha does not apply here: it is an option of criterion "
                                                     "sdmprune, and --criterion is taylor"):
        prune(tiny_model("llama"), ratio=0.2, criterion="taylor", alpha=0.3)
    with pytest.raises(sdmprune.SdmpruneError, match="--teacher-lag does not apply here"):
        prune(tiny_model("llama"), ratio=0.2, teacher_lag=2)
    assert isinstance(sdmprune.PruneConfig().criterion, SDMPrune)


def _imports(path: Path, module: str, package_dir: Path) -> set[str]:
    """The sdmprune modules `path` imports at module level (imports inside functions are deferred)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("sdmprune")}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            if not target.startswith("sdmprune"):
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                candidate = f"{target}.{alias.name}"
                relative = Path(*candidate.split(".")[1:])
                is_module = (package_dir / relative).with_suffix(".py").is_file() or (package_dir / relative).is_dir()
                found.add(candidate if is_module else target)
    return found


def test_the_package_has_no_import_cycle():
    package_dir = Path(sdmprune.__file__).parent
    graph = {}
    for path in package_dir.rglob("*.py"):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[module] = _imports(path, module, package_dir)
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(target):], target]))
            if target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(graph) > 40  # every module was read


def _declared(cls: type, found: dict[str, set[str]]) -> None:
    """Every option field of `cls` and of the configs nested in it (groups, registered classes) -> its class."""
    for f in dataclass_fields(cls):
        kind = get_type_hints(cls)[f.name]
        if "registry" in f.metadata:
            found.setdefault(f.name, set()).add(cls.__qualname__)
            for member in f.metadata["registry"].classes.values():
                _declared(member, found)
        elif isinstance(kind, type) and is_dataclass(kind):
            _declared(kind, found)
        else:
            found.setdefault(f.name, set()).add(cls.__qualname__)


def test_no_option_is_declared_twice():
    """Shared options (bf16, seed, LoRA, learning rate, ratio...) live in one group each; within a command every
    flat name is unique (`flat_names` raises otherwise)."""
    found: dict[str, set[str]] = {}
    for recipe in [*METHODS.values(), *COMMANDS.values()]:
        flat_names(recipe.config)
        _declared(recipe.config, found)
    twice = {name: owners for name, owners in found.items() if len(owners) > 1}
    # `eval --output` is a results path, not a run's output directory; `inspect MODEL` is a positional argument
    assert twice == {"output": {"OutputOptions", "ResultsOptions"}, "model": {"ModelOptions", "InspectRun"}}, twice
