"""`--importance auto`: each candidate importance is scored, masked and refitted; the one with the lowest NLL on the
selection windows is exported, exactly as a run naming it would have, by `prune` and by `compress` (recovery
included); interrupted runs resume; refusals are early."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

import sdmprune.selection as selection
from sdmprune import SdmpruneError, prune
from sdmprune.checkpoint import STATE_JSON
from sdmprune.cli import main
from sdmprune.evaluation.perplexity import perplexity
from sdmprune.options import build
from sdmprune.pruning import PruneConfig
from sdmprune.recipes import compress
from sdmprune.reconstruct import ReconstructConfig
from sdmprune.selection import SELECTION_SEED, SELECTION_WINDOWS, prune_and_refit

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest.py)

CALIBRATION = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(2))
SELECTION = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))
# (windows, summary) as the recipes pass them; the summaries only travel into the reports
SCORING, REFIT, CHOOSING = (CALIBRATION, {"for": "scoring"}), (CALIBRATION, {"for": "refit"}), \
    (SELECTION, {"for": "selection"})


def prune_args(saved_model, text_file, output, importance: str | None) -> list[str]:
    """A small `prune` run; `importance` None leaves prune's default (auto)."""
    named = [] if importance is None else ["--importance", importance]
    return ["prune", "--model", str(saved_model), "--criterion", "sdmprune", *named, "--mlp-ratio", "0.4",
            "--calib", str(text_file), "--calib-samples", "6", "--calib-seq-len", "24", "--ppl-data", "none",
            "--output", str(output)]


def rig_selection(monkeypatch, winner: str) -> list[torch.Tensor]:
    """Make `winner` measure the lower selection NLL, whichever order the candidates run in; returns the windows
    each measurement was given."""
    measure, calls = selection.perplexity, []

    def rigged(model, tokenizer, windows, **kwargs):
        result = measure(model, tokenizer, windows, **kwargs)
        calls.append(windows)
        label = ["activation-wanda", "weight"][(len(calls) - 1) % 2]
        return {**result, "nll": 1.0 if label == winner else 2.0}

    monkeypatch.setattr(selection, "perplexity", rigged)
    return calls


def test_the_candidate_with_the_lowest_selection_nll_is_kept_with_its_refit():
    model = tiny_model("llama")
    seen = {}

    def inspect(label: str) -> dict:  # each candidate's pruned-and-refitted model, while its masks are on
        seen[label] = perplexity(model, None, SELECTION, progress=False)["nll"]
        return {"seen": label}

    chosen = prune_and_refit(model, build(PruneConfig, dict(importance="auto", mlp_ratio=0.4)), calibration=SCORING,
                             refit=REFIT, reconstruction=ReconstructConfig("sequential"), selection=CHOOSING,
                             inspect=inspect)
    records = chosen.report["candidates"]
    assert list(records) == ["activation-wanda", "weight"] and chosen.report["windows"] == 4
    assert chosen.report["calibration"] == {"for": "selection"}
    assert chosen.reconstruction["calibration"] == {"for": "refit"}
    assert chosen.result.report["calibration"] == {"for": "scoring"}
    assert chosen.report["chosen"] == min(records, key=lambda label: records[label]["selection_nll"])
    for label, record in records.items():
        assert record["seen"] == label and record["selection_nll"] == pytest.approx(seen[label], abs=1e-5)
    assert seen["activation-wanda"] != seen["weight"]  # two different selections were measured
    # the model now computes the kept candidate, refit included: a run naming it gives the same logits
    chosen_logits = perplexity(model, None, SELECTION, progress=False)["nll"]
    assert chosen_logits == pytest.approx(seen[chosen.report["chosen"]], abs=1e-6)
    named = tiny_model("llama")
    alone = prune_and_refit(named, build(PruneConfig, dict(importance=chosen.report["chosen"], mlp_ratio=0.4)),
                            calibration=SCORING, refit=REFIT, reconstruction=ReconstructConfig("sequential"))
    assert alone.report is None
    assert [torch.equal(a, b) for a, b in zip(alone.result.masks.keep, chosen.result.masks.keep, strict=True)] == \
        [True, True]
    assert all(torch.equal(a, b) for a, b in zip(alone.result.masks.weight, chosen.result.masks.weight, strict=True))


@pytest.mark.parametrize("winner", ["activation-wanda", "weight"])
def test_auto_exports_what_a_run_naming_the_winner_exports(saved_model, text_file, tmp_path, monkeypatch, winner):
    calls = rig_selection(monkeypatch, winner)
    assert main(prune_args(saved_model, text_file, tmp_path / "auto", None)) == 0  # the default: auto
    assert main(prune_args(saved_model, text_file, tmp_path / "named", winner)) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "auto" / name).read_bytes() == (tmp_path / "named" / name).read_bytes(), name
    report = json.loads((tmp_path / "auto" / "pruning.json").read_text())
    assert report["selection"]["chosen"] == winner and report["config"]["criterion"]["importance"] == winner
    assert report["selection"]["calibration"]["seed"] == SELECTION_SEED  # seed 0 + the selection stream's offset
    assert calls[0].shape == (SELECTION_WINDOWS, 24) and torch.equal(calls[0], calls[1])
    assert "reconstruction" in report and not list(tmp_path.glob(f"auto/**/{STATE_JSON}"))
    card = (tmp_path / "auto" / "README.md").read_text()
    assert f"| importance | {winner} |" in card and f"| `--importance auto` | chose {winner} by perplexity" in card


class Killed(Exception):
    pass


def test_a_run_killed_in_the_second_candidate_resumes_to_the_same_export(saved_model, text_file, tmp_path,
                                                                         monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(prune_args(saved_model, text_file, straight, "auto")) == 0
    refit, refits = selection.reconstruct, []

    def refit_then_die(*args, **kwargs):
        refits.append(1)
        if len(refits) == 2:  # the first candidate done, the second scored and masked
            raise Killed
        return refit(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(selection, "reconstruct", refit_then_die)
        with pytest.raises(Killed):
            main(prune_args(saved_model, text_file, killed, "auto"))
    assert {path.parent.name for path in killed.glob(f"*/{STATE_JSON}")} == {"candidate-activation-wanda",
                                                                            "candidate-weight"}
    assert main(prune_args(saved_model, text_file, killed, "auto")) == 2  # interrupted: --resume or --overwrite
    assert main([*prune_args(saved_model, text_file, killed, "auto"), "--resume"]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name
    resumed, uninterrupted = ({label: record["selection_nll"] for label, record in choice["candidates"].items()}
                              for choice in (json.loads((path / "pruning.json").read_text())["selection"]
                                             for path in (killed, straight)))
    assert resumed == uninterrupted and len(resumed) == 2


def test_refusals(saved_model, text_file, tmp_path, capsys, monkeypatch):
    with pytest.raises(SdmpruneError, match=r"choosing among activation-wanda, weight \(--importance auto\) needs"):
        prune(tiny_model("llama"), importance="auto", mlp_ratio=0.4, calibration=CALIBRATION)
    with pytest.raises(SdmpruneError, match="needs selection windows"):
        prune_and_refit(tiny_model("llama"), build(PruneConfig, dict(importance="auto", mlp_ratio=0.4)),
                        calibration=SCORING)
    monkeypatch.setattr("sdmprune.recipes.prune.load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main([*prune_args(saved_model, text_file, tmp_path / "out", "auto"), "--fsdp", "--reconstruct",
                 "none"]) == 2
    assert "error: --fsdp cannot run --importance auto (its weight-space candidate): add --importance " \
        "activation-wanda, or run without --fsdp" in capsys.readouterr().err


def compress_options(saved_model, text_file, output, importance: str | None, **extra) -> dict:
    """Options of a small compress run; `importance` None leaves compress's default (auto)."""
    named = {} if importance is None else {"importance": importance}
    return dict(model=str(saved_model), **named, mlp_ratio=0.4, cold_start=0.1, calib=str(text_file),
                calib_samples=6, calib_seq_len=24, reconstruct="sequential", recover_data=str(text_file),
                recover_tokens=96, max_len=24, batch_size=2, grad_accum=1, save_every=1, ppl_data=str(text_file),
                seq_len=24, max_tokens=0, bf16=False, output=str(output), **extra)


@pytest.mark.parametrize("winner", ["activation-wanda", "weight"])
def test_compress_with_auto_exports_what_compress_naming_the_winner_exports(saved_model, text_file, tmp_path,
                                                                            monkeypatch, capsys, winner):
    settings = compress_options(saved_model, text_file, tmp_path / "auto", None)  # the default: auto
    plan = compress.run(compress.CompressRun.of(**settings, dry_run=True))["plan"]
    calls = rig_selection(monkeypatch, winner)
    report = compress.run(compress.CompressRun.of(**settings, export_stages=True))
    assert f"chose {winner} by perplexity on {SELECTION_WINDOWS} further calibration windows" in \
        capsys.readouterr().out
    compress.run(compress.CompressRun.of(**compress_options(saved_model, text_file, tmp_path / "named", winner)))
    # the recovery distils from the dense model behind the kept masks: the same trained export, byte for byte
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "auto" / name).read_bytes() == (tmp_path / "named" / name).read_bytes(), name
    assert [s["stage"] for s in plan] == [s["stage"] for s in report["stages"]] == list(compress.CHOOSING_STAGES)
    assert list(report["evaluation"]) == ["dense", "selected", "recovered"]
    select = report["stages"][1]
    assert select["chosen"] == winner and list(select["candidates"]) == ["activation-wanda", "weight"]
    assert select["reconstruction"]["mode"] == "sequential" and select["seconds"] > 0
    assert select["calibration"]["seed"] == SELECTION_SEED and select["calibration"]["tokens"] == SELECTION_WINDOWS * 24
    refit_windows = select["reconstruction"]["calibration"]  # the 6 scoring windows, then more to --refit-samples
    assert (refit_windows["windows"], refit_windows["from_first_draw"]) == (ReconstructConfig().refit_samples, 6)
    assert len(calls) == 2 and calls[0].shape == (SELECTION_WINDOWS, 24) and torch.equal(calls[0], calls[1])
    assert report["config"]["criterion"]["importance"] == winner
    assert report["compress"]["pruning"]["criterion"]["importance"] == "auto"
    card = (tmp_path / "auto" / "README.md").read_text()  # the model card: the choice and each stage's perplexity
    assert f"| importance | {winner} |" in card and f"| `--importance auto` | chose {winner} by perplexity" in card
    selected = report["evaluation"]["selected"][str(text_file)]
    assert f"| perplexity selected | {selected['ppl']:.2f} on {text_file} ({selected['tokens']:,} tokens) |" in card
    stage_model = tmp_path / "auto" / compress.STAGE_MODELS / "selected" / "model.safetensors"
    assert sorted(path.name for path in stage_model.parents[1].iterdir()) == ["selected"]
    assert stage_model.stat().st_size > 0


@pytest.mark.parametrize("stage", ["select", "recover"])
def test_compress_with_auto_killed_resumes_to_the_same_export(stage, saved_model, text_file, tmp_path, monkeypatch):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    compress.run(compress.CompressRun.of(**compress_options(saved_model, text_file, straight, "auto")))
    refit, refits, dying = selection.reconstruct, [], [stage == "select"]

    def counted_refit(*args, **kwargs):
        refits.append(1)
        if dying[0] and len(refits) == 2:  # the first candidate done, the second scored and masked
            raise Killed
        return refit(*args, **kwargs)

    monkeypatch.setattr(selection, "reconstruct", counted_refit)
    with monkeypatch.context() as patch:
        if stage == "recover":
            patch.setattr(compress, "train", lambda *a, **k: (_ for _ in ()).throw(Killed))
        with pytest.raises(Killed):
            compress.run(compress.CompressRun.of(**compress_options(saved_model, text_file, killed, "auto")))
    refits.clear()
    dying[0] = False
    compress.run(compress.CompressRun.of(**compress_options(saved_model, text_file, killed, "auto", resume=True)))
    for name in ("model.safetensors", "config.json"):
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name
    # past the select stage only the kept candidate is refitted again; killed inside it, both are
    assert len(refits) == {"select": 2, "recover": 1}[stage]
    choices = [json.loads((path / "pruning.json").read_text())["stages"][1] for path in (killed, straight)]
    assert choices[0]["candidates"].keys() == choices[1]["candidates"].keys()
    assert [c["selection_nll"] for c in choices[0]["candidates"].values()] == \
        [c["selection_nll"] for c in choices[1]["candidates"].values()]
