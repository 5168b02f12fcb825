"""Bad inputs through ``otguard collect | fit | generate`` (issue 9), on a tiny model folder.

Every refusal is one line on stderr with exit code 2, and comes before the model is loaded when the
arguments alone show the problem; no user file is ever deleted; outputs get the usual modes.
"""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

import otguard.models
from otguard.cli import main
from tests.tiny_models import WORD_VOCAB, WORDS, save_tiny_model, tiny_gpt2

CONTEXT = 48


def write_data(path: Path, n_groups: int = 16, long_row: int | None = None) -> Path:
    rng = random.Random(0)
    rows = []
    for g in range(n_groups):
        for j in range(4):
            text = " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))
            rows.append({"text": text, "label": j % 2, "group": f"q{g}"})
    if long_row is not None:
        rows[long_row]["text"] = " ".join(["w1"] * (CONTEXT + 10))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    return {
        "model": save_tiny_model(root / "model", context=CONTEXT),
        "other": save_tiny_model(root / "other", seed=1, context=CONTEXT),
        "data": write_data(root / "data.jsonl"),
        "long": write_data(root / "long.jsonl", long_row=5),
        "cache": root / "cache",
    }


def base(env: dict[str, Path], data: str = "data") -> list[str]:
    return ["--model", str(env["model"]), "--dataset", str(env[data]), "--cache-dir", str(env["cache"])]


def fit(env: dict[str, Path], out: Path | str, *extra: str) -> list[str]:
    return ["fit", *base(env), "--method", "mean-shift", "--out", str(out), *extra]


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command gets as far as loading the model."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(otguard.models, "load_model", refuse)


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("otguard: error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def user_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    (root / "sub" / "data.csv").write_text("a,b\n")
    return root


# ------------------------------------------------------------------------------ --out
@pytest.mark.parametrize("command", ["fit", "collect"])
def test_out_refuses_a_user_folder_before_any_work(
    command: str,
    env: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model_load: None,
) -> None:
    out = user_folder(tmp_path / "mine")
    before = tree(out)
    argv = fit(env, out) if command == "fit" else ["collect", *base(env), "--out", str(out)]
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert "is not empty" in line and "--force" in line and "notes.txt" in line
    assert tree(out) == before


def test_fit_out_refuses_an_activation_folder(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    acts = tmp_path / "acts"
    assert main(["collect", *base(env), "--out", str(acts)]) == 0
    before = tree(acts)
    assert main(["collect", *base(env), "--out", str(acts)]) == 0  # the same kind is updated
    capsys.readouterr()
    assert main(fit(env, acts)) == 2
    assert "is an otguard activations output" in one_line_error(capsys)
    assert sorted(tree(acts)) == sorted(before)


def test_fit_out_dot_and_force(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(fit(env, ".")) == 0
    assert sorted(p.name for p in work.iterdir()) == [".otguard-output", "policy.json", "tensors.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no ..tmp-* left next to it
    assert main(fit(env, ".")) == 0  # a policy folder is updated
    mine = user_folder(tmp_path / "mine")
    before = tree(mine)
    monkeypatch.chdir(mine)
    assert main(fit(env, ".")) == 2
    assert "is not empty" in one_line_error(capsys)
    assert main(fit(env, ".", "--force")) == 0
    after = tree(mine)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {".otguard-output", "policy.json", "tensors.safetensors"}


def test_outputs_get_the_usual_modes(env: dict[str, Path], tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert main(fit(env, tmp_path / "policy")) == 0
        assert main(["collect", *base(env), "--out", str(tmp_path / "acts")]) == 0
    finally:
        os.umask(old)
    for folder in (tmp_path / "policy", tmp_path / "acts"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


# ------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["collect", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
        (["collect", "--limit", "-3"], "argument --limit: must be >= 1, got -3"),
        (["collect", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["collect", "--max-length", "0"], "argument --max-length: must be >= 1, got 0"),
        (["collect", "--max-batch-tokens", "-1"], "argument --max-batch-tokens: must be >= 1"),
        (["collect", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
        (["collect", "--act-dtype", "int8"], "argument --act-dtype: invalid choice"),
        (["generate", "--prompt", ""], "argument --prompt: must not be empty"),
        (["generate", "--prompt", "   "], "argument --prompt: must not be empty"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1"),
        (["generate", "--prompt", "hi", "--kappa", "nan"], "argument --kappa: must be a number in [0, inf)"),
        (["fit", "--out", "x", "--folds", "1"], "argument --folds: must be >= 2, got 1"),
        (["fit", "--out", "x", "--fold", "-1"], "argument --fold: must be >= 0, got -1"),
        (
            ["fit", "--out", "x", "--val-ratio", "1"],
            "argument --val-ratio: must be a number in (0, 1), got 1",
        ),
        (["fit", "--out", "x", "--gamma", "0.7"], "argument --gamma: must be a number in (0, 0.5), got 0.7"),
        (["fit", "--out", "x", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        (["fit", "--out", "x", "--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
        (
            ["fit", "--out", "x", "--kappa-grid", "5,x"],
            "argument --kappa-grid: expected comma-separated numbers",
        ),
        (["fit", "--out", "x", "--kappa-grid", "5,-1"], "argument --kappa-grid: every value must be"),
        (["fit", "--out", "x", "--stage3-questions", "-1"], "argument --stage3-questions: must be >= 0"),
    ],
)
def test_argument_values_are_checked_by_the_parser(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], no_model_load: None
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fold", "2", "--folds", "2"], "--fold 2 does not exist with --folds 2; use 0..1."),
        (["--dtype", "float8"], "Unknown dtype 'float8'"),
        (["--device", "gpu"], "Unknown device 'gpu'"),
        (["--limit", "1"], "has 1 group(s) but n_folds=2 needs at least one per fold"),
        (["--text-column", "txt", "--dataset", "truthfulqa"], "only for data files"),
    ],
)
def test_fit_checks_every_argument_before_loading_the_model(
    env: dict[str, Path],
    tmp_path: Path,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    no_model_load: None,
) -> None:
    assert main([*fit(env, tmp_path / "p"), *extra]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "p").exists()


def test_missing_gpu_is_found_before_loading(
    env: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_model_load: None,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["collect", *base(env), "--device", "cuda"]) == 2
    assert "Device 'cuda' is not available" in one_line_error(capsys)


def test_model_paths_are_checked_before_loading(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    no_model_load: None,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    cases = {
        str(env["model"] / "model.safetensors"): "is a weights file of a model, not a model; give its folder",
        "./modles/x": "No such local model folder or file",
        "runs/nothere": "No such local model folder or file",
    }
    for model, message in cases.items():
        assert main(["collect", "--model", model, "--dataset", str(env["data"])]) == 2
        assert message in one_line_error(capsys)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no records"),
        ('{"txt": "w1", "label": 1}\n', "missing column 'text'"),
        ('{"text": "w1", "label": "yes"}\n', "it must be 0 or 1"),
    ],
)
def test_data_errors_come_before_the_model(
    env: dict[str, Path], tmp_path: Path, content: str, message: str, capsys: pytest.CaptureFixture[str],
    no_model_load: None,
) -> None:  # fmt: skip
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    assert main(["collect", "--model", str(env["model"]), "--dataset", str(path)]) == 2
    line = one_line_error(capsys)
    assert message in line
    if "column" in message:
        assert "--text-column" in line


def test_column_options_read_other_column_names(env: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    rows = [json.loads(line) for line in env["data"].read_text().splitlines()]
    path.write_text("comment,toxic\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    argv = ["collect", "--model", str(env["model"]), "--dataset", str(path), "--no-cache"]
    assert main([*argv, "--text-column", "comment", "--label-column", "toxic"]) == 0


# ------------------------------------------------------------------------------ long texts, the cache
def test_overlong_text_is_refused_or_cut_with_a_warning(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["collect", *base(env, "long"), "--no-cache"]) == 2
    line = one_line_error(capsys)
    assert f"longer than the model's context of {CONTEXT} tokens" in line and "--max-length" in line
    with caplog.at_level("WARNING"):
        assert main(["collect", *base(env, "long"), "--no-cache", "--max-length", "20"]) == 0
    assert "Cut 1 of 64 texts to their first 20 tokens" in caplog.text
    assert main(["collect", *base(env, "long"), "--no-cache", "--max-length", str(CONTEXT + 1)]) == 2
    assert f"use at most {CONTEXT}" in one_line_error(capsys)


def test_truncated_cache_is_recomputed(
    env: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["collect", *base(env)[:4], "--cache-dir", str(tmp_path)]
    assert main(argv) == 0
    (entry,) = (tmp_path / "activations").iterdir()
    blob = (entry / "activations.safetensors").read_bytes()
    (entry / "activations.safetensors").write_bytes(blob[:100])
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    assert "are unusable" in caplog.text
    assert (entry / "activations.safetensors").read_bytes() == blob


# ------------------------------------------------------------------------------ policies
def test_generate_refuses_a_corrupted_policy_before_loading(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "p"
    assert main(fit(env, policy)) == 0
    data = bytearray((policy / "tensors.safetensors").read_bytes())
    data[-3] ^= 0x40
    (policy / "tensors.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(otguard.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    capsys.readouterr()
    assert main(["generate", "--model", str(env["model"]), "--policy", str(policy), "--prompt", "w1"]) == 2
    assert "does not match the checksum" in one_line_error(capsys)
    spec = json.loads((policy / "policy.json").read_text())
    spec["layers"][0]["threshold"] = "four"
    (policy / "policy.json").write_text(json.dumps(spec))
    assert main(["generate", "--model", str(env["model"]), "--policy", str(policy), "--prompt", "w1"]) == 2
    assert "policy.json is corrupted: layers[0].threshold is 'four'" in one_line_error(capsys)


def test_generate_weight_check_hint_names_an_existing_flag(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p"
    assert main(fit(env, policy)) == 0
    capsys.readouterr()
    argv = ["generate", "--model", str(env["other"]), "--policy", str(policy), "--prompt", "w1 w2",
            "--max-new-tokens", "3"]  # fmt: skip
    assert main(argv) == 2
    assert "--no-check-weights" in one_line_error(capsys)
    assert main([*argv, "--no-check-weights"]) == 0
    assert ">>> w1 w2" in capsys.readouterr().out


def test_generate_refuses_a_prompt_past_the_context(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--model", str(env["model"]), "--prompt", "w1 w2", "--max-new-tokens", str(CONTEXT)]
    assert main(argv) == 2
    assert f"exceeds the model's context of {CONTEXT} tokens" in one_line_error(capsys)


# ------------------------------------------------------------------------------ more bad inputs
def test_more_bad_inputs_are_one_line_errors_before_the_model(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model_load: None
) -> None:
    rows = [json.loads(line) for line in env["data"].read_text().splitlines()]
    one_class = tmp_path / "one.jsonl"
    one_class.write_text("".join(json.dumps({**r, "label": 0}) + "\n" for r in rows))
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    acts = tmp_path / "acts"
    acts.mkdir()
    (acts / "meta.json").write_text("{}")
    cases = [
        (fit(env, tmp_path / "o") + ["--data-dir", str(tmp_path / "nowhere")],
         "does not exist or is not a folder"),
        (["fit", "--model", str(env["model"]), "--dataset", str(one_class), "--out", str(tmp_path / "o")],
         "has only label 0 (desirable)"),
        (["collect", *base(env)[:4], "--cache-dir", str(a_file)], "--cache-dir"),
        (["collect", *base(env), "--out", str(a_file)], "is a file, not a folder"),
        (["collect", *base(env), "--out", str(a_file / "sub")], "is a file, so the folder cannot be made"),
        (["collect", "--model", str(env["model"]), "--dataset", str(tmp_path)],
         "is a folder; --dataset takes"),
        (["collect", "--model", str(env["model"]), "--dataset", str(tmp_path / "d.txt")], "Unknown data set"),
        (["generate", "--model", str(env["model"]), "--policy", str(acts), "--prompt", "w1"],
         "is not a policy folder"),
        (["generate", "--model", "", "--prompt", "w1"], "The model name is empty"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in one_line_error(capsys), argv
    assert not (tmp_path / "o").exists()


def test_flags_a_method_does_not_use_are_reported(
    env: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        assert main(fit(env, tmp_path / "p", "--margin", "3", "--top-k", "2")) == 0
    assert "Not used by --method mean-shift (ignored): --margin, --top-k" in caplog.text
    caplog.clear()
    argv = ["generate", "--model", str(env["model"]), "--policy", str(tmp_path / "p"), "--prompt", "w1",
            "--max-new-tokens", "2", "--kappa", "3"]  # fmt: skip
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    assert "--kappa changes only SLIM (kappa-p) policies" in caplog.text


def test_policy_of_another_architecture(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p"
    assert main(fit(env, policy)) == 0
    gpt2 = save_tiny_model(tmp_path / "gpt2", tiny_gpt2(vocab_size=WORD_VOCAB))
    capsys.readouterr()
    assert main(["generate", "--model", str(gpt2), "--policy", str(policy), "--prompt", "w1"]) == 2
    assert "Fit a policy for this model" in one_line_error(capsys)
