"""The CLI end to end on a tiny model, and one clear line for every kind of bad input."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from sdmprune.allocation import ALLOCATIONS
from sdmprune.cli import main
from sdmprune.criteria import CRITERIA
from sdmprune.teachers import TEACHERS


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_eval_inspect(capsys, saved_model, text_file, tmp_path):
    out_dir = tmp_path / "pruned"
    # the default sequential reconstruction refits on the 4 calibration windows and 124 more (the tiny model's
    # context is 128)
    code, out, _ = run(capsys, "prune", "--model", saved_model, "--ratio", "0.2", "--criterion", "magnitude",
                       "--calib", text_file, "--calib-samples", "4", "--calib-seq-len", "32",
                       "--ppl-data", text_file, "--seq-len", "64", "--output", out_dir)
    assert code == 0
    assert "achieved ratio 0.2" in out and "perplexity" in out
    record = json.loads((out_dir / "pruning.json").read_text())
    assert record["requested"]["ratio"] == 0.2 and record["achieved"]["ratio"] >= 0.2
    assert record["reconstruction"]["mode"] == "sequential" and record["reconstruction"]["tokens"] == 128 * 32
    assert record["evaluation"]["after"]["tokens"] == record["evaluation"]["before"]["tokens"] > 0
    after = record["evaluation"]["after"]
    assert f"| perplexity after | {after['ppl']:.2f} on {text_file} ({after['tokens']:,} tokens) |" in \
        (out_dir / "README.md").read_text()
    plain = AutoModelForCausalLM.from_pretrained(out_dir)
    assert plain.config.intermediate_size == record["widths"][0]

    code, out, _ = run(capsys, "eval", "--model", out_dir, "--ppl-data", text_file, "--seq-len", "64")
    assert code == 0
    result = json.loads((out_dir / "eval-text.json").read_text())
    # The exported model's perplexity is the masked model's.
    assert result["perplexity"]["ppl"] == pytest.approx(record["evaluation"]["after"]["ppl"], rel=1e-4)

    code, out, _ = run(capsys, "inspect", out_dir, "--json")
    info = json.loads(out)
    assert info["widths"] == record["widths"] and info["params_total"] == record["achieved"]["params_after"]
    assert info["pruning"]["export"]["layout"] == "uniform"


def test_help_is_generated_from_the_configs_and_registries(capsys, monkeypatch):
    """Every registered criterion and teacher, with its description and its options' defaults, appears in
    `prune --help`; `--method nuteprune --help` shows that method's options instead."""
    monkeypatch.setenv("COLUMNS", "2000")  # no line wrapping inside the descriptions
    assert main(["prune", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for registry in (CRITERIA, TEACHERS, ALLOCATIONS):
        for name in registry:
            assert f"{name}: {' '.join(registry.description(name).split())}" in out
            for f in fields(registry.get(name)):
                assert "--" + f.name.replace("_", "-") in out
    assert ("--cold-start COLD_START fraction of MLP width pruned by the cross-entropy cold start (0: none, the "
            "distillation loss scores the dense model itself) (default: 0.025)" in out)
    assert "--train-steps" not in out
    assert main(["prune", "--method", "nuteprune", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--train-steps TRAIN_STEPS optimizer steps (default: 500)" in out and "--criterion" not in out
    assert "--lora-dropout LORA_DROPOUT dropout on the LoRA input (default: 0.0)" in out  # nuteprune's own default


def bad_inputs(tmp_path, saved_model, text_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00garbage" * 10)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    ok = ["--ppl-data", str(text_file), "--seq-len", "32"]
    return {
        "missing model path": (["--model", str(tmp_path / "nope"), *ok], "does not exist"),
        "unsupported architecture": (["--model", str(gpt2), *ok], "unsupported architecture 'gpt2'"),
        "ratio zero": (["--model", str(saved_model), "--ratio", "0", *ok], "must be in (0, 1)"),
        "ratio too large": (["--model", str(saved_model), "--ratio", "0.95", *ok], "cannot be reached"),
        "empty text": (["--model", str(saved_model), "--ppl-data", str(empty)], "is empty"),
        "text shorter than a window": (["--model", str(saved_model), "--ppl-data", str(short), "--seq-len", "64"],
                                       "fewer than one window"),
        "seq-len above context": (["--model", str(saved_model), "--ppl-data", str(text_file), "--seq-len", "4096"],
                                  "longer than the model's context"),
        "corrupt gguf": (["--model", str(corrupt), *ok], "could not read GGUF file"),
    }


@pytest.mark.parametrize("case", [
    "missing model path", "unsupported architecture", "ratio zero", "ratio too large", "empty text",
    "text shorter than a window", "seq-len above context", "corrupt gguf",
])
def test_bad_input_fails_with_one_line_and_no_output(case, capsys, tmp_path, saved_model, text_file, monkeypatch):
    monkeypatch.setenv("SDMPRUNE_CACHE", str(tmp_path / "cache"))
    cases = bad_inputs(tmp_path, saved_model, text_file)
    argv, message = cases[case]
    output = tmp_path / "out"
    code, _, err = run(capsys, "prune", *argv, "--output", output)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not output.exists()
    assert not list(tmp_path.glob(".out.*"))


def test_existing_output_directory(capsys, tmp_path, saved_model, text_file):
    existing = tmp_path / "existing"
    (existing / "keep.txt").parent.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "prune", "--model", saved_model, "--ppl-data", text_file, "--seq-len", "32",
                       "--output", existing)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (existing / "keep.txt").read_text() == "mine"
    code, _, _ = run(capsys, "prune", "--model", saved_model, "--ppl-data", "none", "--output", existing,
                     "--overwrite", "--criterion", "magnitude", "--reconstruct", "none")
    assert code == 0 and not (existing / "keep.txt").exists() and (existing / "pruning.json").is_file()


def test_hub_id_offline_gives_a_clear_error(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch the value
    code, _, err = run(capsys, "inspect", "no-such-org/no-such-model")
    assert code == 2 and "could not load model 'no-such-org/no-such-model'" in err


def test_mlp_ratio_and_width_multiple(capsys, saved_model, tmp_path):
    code, out, _ = run(capsys, "prune", "--model", saved_model, "--mlp-ratio", "0.3", "--width-multiple", "8",
                       "--criterion", "magnitude", "--reconstruct", "none", "--ppl-data", "none", "--output",
                       tmp_path / "o")
    assert code == 0
    record = json.loads((tmp_path / "o" / "pruning.json").read_text())
    assert record["widths"] == [40, 40]  # 64 * 0.7 = 44.8 -> 40


def test_prune_offline_without_evaluation_data_skips_perplexity_with_a_note(capsys, saved_model, tmp_path,
                                                                             monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("SDMPRUNE_DATA_DIR", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # a data-free criterion prunes without data when nothing is refitted; the default refit needs calibration
    code, _, err = run(capsys, "prune", "--model", saved_model, "--criterion", "magnitude", "--calib-seq-len", "32",
                       "--output", tmp_path / "refit")
    assert code == 2 and "could not load 'c4'" in err and "--reconstruct none prunes without data" in err
    code, out, err = run(capsys, "prune", "--model", saved_model, "--criterion", "magnitude", "--reconstruct", "none",
                         "--output", tmp_path / "o")
    assert code == 0 and "note: perplexity skipped" in err and "perplexity: not measured" in out
    assert json.loads((tmp_path / "o" / "pruning.json").read_text())["evaluation"] == {}
    # asked for explicitly, missing evaluation data is an error, before any work
    code, _, err = run(capsys, "prune", "--model", saved_model, "--ppl-data", "wikitext2", "--output", tmp_path / "p")
    assert code == 2 and "could not load 'wikitext2'" in err


def test_global_widths_within_a_band_and_none_for_unbounded(capsys, saved_model, tmp_path):
    common = ["--model", saved_model, "--mlp-ratio", "0.5", "--criterion", "magnitude", "--allocation", "global",
              "--reconstruct", "none", "--ppl-data", "none"]
    code, _, _ = run(capsys, "prune", *common, "--width-band", "0.1", "--output", tmp_path / "band")
    assert code == 0
    record = json.loads((tmp_path / "band" / "pruning.json").read_text())
    assert record["config"]["allocation"] == {"name": "global", "width_band": 0.1}
    assert sum(record["widths"]) == 64 and all(28 <= w <= 36 for w in record["widths"])  # 32 ± 10%, rounded
    code, _, _ = run(capsys, "prune", *common, "--width-band", "none", "--output", tmp_path / "free")
    assert code == 0
    assert json.loads((tmp_path / "free" / "pruning.json").read_text())["config"]["allocation"]["width_band"] is None
    code, _, err = run(capsys, "prune", *common, "--width-band", "wide", "--output", tmp_path / "bad")
    assert code == 2 and "argument --width-band: invalid float value: 'wide'" in err
