"""Same command, same kept neurons; a run SIGKILLed mid-distillation and resumed ends exactly as an
uninterrupted one; the CLI refuses to mix interrupted runs and fresh ones."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sigkill_at_loss_script

from sdmprune.checkpoint import STATE_JSON, Checkpoint
from sdmprune.cli import main

# Kill the process at the 10th loss evaluation: 4 windows of cold start and 4 per distillation step,
# so the cold start and the first of three distillation steps are saved and the second is half done.
KILL_SCRIPT = sigkill_at_loss_script("calls == 10")


def prune_args(model: Path, calib: Path, output: Path) -> list[str]:
    return ["prune", "--model", str(model), "--criterion", "sdmprune", "--importance", "activation-wanda",
            "--cold-start", "0.1", "--mlp-ratio", "0.5", "--steps", "3", "--calib", str(calib), "--calib-samples", "4",
            "--calib-seq-len", "32", "--seed", "3", "--ppl-data", "none", "--output", str(output)]


def kept(output: Path) -> list[list[int]]:
    return json.loads((output / "pruning.json").read_text())["kept_indices"]


def test_same_command_same_neurons_and_kill_resume_matches(saved_model, text_file, tmp_path, capsys):
    reference, again, killed = tmp_path / "reference", tmp_path / "again", tmp_path / "killed"
    assert main(prune_args(saved_model, text_file, reference)) == 0
    assert main(prune_args(saved_model, text_file, again)) == 0
    assert kept(again) == kept(reference)

    process = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *prune_args(saved_model, text_file, killed)],
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr
    state = json.loads((killed / STATE_JSON).read_text())
    progress = state["progress"]
    assert progress["steps_done"] == 2 and [s["stage"] for s in progress["log"]] == ["cold-start", "prune"]
    assert not (killed / "pruning.json").exists()

    capsys.readouterr()
    assert main(prune_args(saved_model, text_file, killed)) == 2  # neither --resume nor --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main([*prune_args(saved_model, text_file, killed), "--resume"]) == 0
    assert kept(killed) == kept(reference)
    record = json.loads((killed / "pruning.json").read_text())
    assert [s["step"] for s in record["steps"]] == [1, 2, 3, 4]
    assert not (killed / STATE_JSON).exists()  # the export replaced the run state


def test_resume_refuses_other_settings_and_missing_state(saved_model, text_file, tmp_path, capsys):
    output = tmp_path / "out"
    assert main([*prune_args(saved_model, text_file, output), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    # an interrupted run's state recorded with other settings
    output.mkdir()
    (output / STATE_JSON).write_text(json.dumps({"settings": {"criterion": "taylor"},
                                                 "progress": {"steps_done": 1, "log": []}}))
    assert main([*prune_args(saved_model, text_file, output), "--resume"]) == 2
    assert "settings differ" in capsys.readouterr().err
    assert Checkpoint(output).exists()


@pytest.mark.parametrize(("criterion", "options"), [
    ("taylor", ["--allocation", "layer-range"]),
    ("wanda-sp", ["--allocation", "global"]),
    ("flap", ["--allocation", "global"]),
    ("sdmprune", ["--teacher", "copy", "--importance", "weight"]),
])
def test_every_calibration_criterion_from_the_cli(criterion, options, saved_model, text_file, tmp_path, capsys):
    output = tmp_path / criterion
    args = prune_args(saved_model, text_file, output)
    args[args.index("sdmprune")] = criterion
    if criterion != "sdmprune":  # --importance and --cold-start are options of sdmprune only
        del args[args.index("--importance"):args.index("--cold-start") + 2]
    assert main([*args, *options]) == 0
    record = json.loads((output / "pruning.json").read_text())
    assert record["method"] == criterion and record["calibration"]["tokens"] == 4 * 32
    assert record["achieved"]["mlp_ratio"] >= 0.5
