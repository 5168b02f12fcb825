"""End to end through the CLI on the packaged SmolLM2 and a slice of the real TruthfulQA data."""

from __future__ import annotations

import json

import pytest

from otguard.cli import main

pytestmark = pytest.mark.slow

LIMIT = ["--limit", "40", "--batch-size", "32"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("otguard-cache"))


def common(data_dir, cache_dir) -> list[str]:
    return ["--model", "smollm2-135m", "--dataset", "truthfulqa", "--data-dir", str(data_dir), "--cache-dir",
            cache_dir, *LIMIT]  # fmt: skip


def test_collect_twice_is_served_from_cache(data_dir, cache_dir, tmp_path, caplog, smollm2) -> None:
    assert main(["collect", *common(data_dir, cache_dir), "--out", str(tmp_path / "acts")]) == 0
    meta = json.loads((tmp_path / "acts" / "meta.json").read_text())
    assert meta["dataset"].startswith("truthfulqa")
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["collect", *common(data_dir, cache_dir)]) == 0
    assert "loaded from cache" in caplog.text


@pytest.mark.parametrize("method", ["radiant", "slim", "iti", "mean-shift"])
def test_fit_then_generate(method, data_dir, cache_dir, tmp_path, capsys, smollm2) -> None:
    out = tmp_path / method
    extra = ["--epochs", "60"]
    if method == "slim":
        extra += ["--stage3-questions", "2", "--kappa-grid", "5,20", "--stage3-max-new-tokens", "8"]
    if method == "iti":
        extra += ["--top-k", "12"]
    assert main(["fit", *common(data_dir, cache_dir), "--method", method, "--fold", "0", *extra,
                 "--out", str(out)]) == 0  # fmt: skip
    spec = json.loads((out / "policy.json").read_text())
    assert spec["method"] == method and spec["meta"]["fold"] == 0
    if method == "slim":
        assert spec["kappa"] in (5.0, 20.0) and len(spec["meta"]["stage3"]["rows"]) == 2
    capsys.readouterr()
    assert main(["generate", "--model", "smollm2-135m", "--policy", str(out), "--qa", "--max-new-tokens", "6",
                 "--prompt", "Are bats blind?"]) == 0  # fmt: skip
    assert "[answer]" in capsys.readouterr().out


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys) -> None:
    assert main(["generate", "--policy", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "not a policy folder" in err and "Traceback" not in err
