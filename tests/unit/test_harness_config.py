"""The compare configuration: every bad value is one ConfigError before any model work; CLI defaults."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from otguard import cli
from otguard.cli import compare as cli_compare
from otguard.cli import runtime
from otguard.errors import ConfigError, OtguardError
from otguard.harness.config import CompareConfig, default, method_ids
from otguard.harness.truthfulqa import TruthfulQATask
from otguard.methods import METHODS


def test_defaults_are_valid_and_the_methods_are_the_registry() -> None:
    config = CompareConfig()
    assert config.problems() == []
    assert method_ids() == tuple(METHODS)
    assert {m.partition("@")[0] for m in config.methods} <= set(METHODS)
    assert "iti@paper" in config.methods  # the published ITI next to the tuned one


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dataset": "imdb"}, "unknown dataset 'imdb' (choose one of truthfulqa, truthfulqa-mc2, toxigen)"),
        ({"methods": ("none", "foo")},
         "unknown method(s) 'foo'; valid methods: none, iti, mean-shift, radiant, slim"),
        ({"methods": ()}, "no methods given"),
        ({"methods": ("slim", "slim")}, "method(s) listed twice: slim"),
        ({"folds": 1}, "folds must be an integer >= 2; got 1"),
        ({"limit": 0}, "limit must be an integer >= 1, or None for no limit; got 0"),
        ({"transfer_questions": -1}, "transfer_questions must be an integer >= 0; got -1"),
        ({"drift_docs": -3}, "drift_docs must be an integer >= 0; got -3"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1; got 0"),
        ({"samples": 2.5}, "samples must be an integer >= 1; got 2.5"),
        ({"val_ratio": 1.0}, "val_ratio must be in [0, 1); got 1.0"),
        ({"kappa_grid": (5.0, -1.0)}, "kappa_grid must be positive numbers; got [5.0, -1.0]"),
        ({"judge": "gpt"}, "unknown judge 'gpt'"),
        ({"judge_options": {"modle": "x"}}, "unknown judge option(s) modle"),
        ({"method_params": {"radiant": {"epoch": 3}}}, "method 'radiant' has no parameter(s) epoch"),
        ({"method_params": {"foo": {}}}, "method_params names unknown method 'foo'"),
        ({"drift_source": "/nonexistent/docs.txt"}, "drift_source '/nonexistent/docs.txt' does not exist"),
        ({"dataset": "toxigen", "scorer": "vibes"}, "unknown scorer 'vibes'"),
        ({"dataset": "toxigen", "prompts": "/nonexistent.txt"}, "prompts '/nonexistent.txt' is not toxigen"),
        ({"dataset": "toxigen", "top_p": 0.0}, "top_p must be in (0, 1]; got 0.0"),
        ({"transfer": ("nqopen", "/nonexistent/set.csv")},
         "transfer set '/nonexistent/set.csv' is neither 'nqopen' nor an existing CSV file"),
        ({"transfer": ("nqopen", "nqopen")}, "transfer set(s) listed twice: ['nqopen']"),
        ({"bootstrap": 500}, "bootstrap must be 0 (no intervals) or an integer >= 1000; got 500"),
        ({"gate": "yes"}, "gate must be true or false; got 'yes'"),
    ],
)  # fmt: skip
def test_each_bad_value_is_a_config_error(changes, message) -> None:
    with pytest.raises(ConfigError) as info:
        CompareConfig(**changes)
    assert message in str(info.value)
    assert isinstance(info.value, OtguardError) and isinstance(info.value, ValueError)


def test_all_problems_are_named_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        CompareConfig(folds=0, limit=-1, methods=("bar",))
    text = str(info.value)
    assert "folds must be" in text and "limit must be" in text and "'bar'" in text


def test_openai_judge_without_a_model_fails_before_any_request(monkeypatch) -> None:
    monkeypatch.delenv("OTGUARD_JUDGE_MODEL", raising=False)
    with pytest.raises(ConfigError, match="the openai judge cannot work: No judge model"):
        CompareConfig(judge="openai")
    with pytest.raises(ConfigError, match="must start with http"):
        CompareConfig(judge="openai", judge_options={"model": "m", "base_url": "localhost:8000"})
    assert (
        CompareConfig(
            judge="openai", judge_options={"model": "m", "base_url": "http://127.0.0.1:9"}
        ).problems()
        == []
    )


def test_perspective_without_a_key_fails(monkeypatch) -> None:
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="the perspective scorer cannot work: No Perspective API key"):
        CompareConfig(dataset="toxigen", scorer="perspective")


def test_replace_validates_again() -> None:
    with pytest.raises(ConfigError, match="folds must be"):
        dataclasses.replace(CompareConfig(), folds=1)


def test_record_and_key() -> None:
    config = CompareConfig(
        judge="openai", judge_options={"model": "m", "base_url": "http://x", "api_key": "sk-1"}
    )
    data = config.to_dict()
    assert data["judge_options"]["api_key"] == "***" and "sk-1" not in str(data)
    assert data["methods"] == list(config.methods) and data["kappa_grid"] == [5.0, 10.0, 20.0, 40.0]
    assert config.key() == CompareConfig(judge="openai", judge_options=dict(config.judge_options)).key()
    assert CompareConfig(limit=40).key() != CompareConfig(limit=41).key()


def test_side_samples_scale_with_limit_unless_given() -> None:
    from otguard.harness.config import AUTO_SIZES

    full = CompareConfig()
    assert {k: getattr(full, k) for k in AUTO_SIZES} == {
        "transfer_questions": 200, "drift_docs": 100, "gate_questions": 60, "sweep_questions": 40,
        "sweep_docs": 20, "frontier_questions": 40,
    }  # fmt: skip
    quick = CompareConfig(limit=100)  # max(floor, 100 // divisor), never above the full run's value
    assert {k: getattr(quick, k) for k in AUTO_SIZES} == {
        "transfer_questions": 12, "drift_docs": 10, "gate_questions": 10, "sweep_questions": 25,
        "sweep_docs": 10, "frontier_questions": 5,
    }  # fmt: skip
    assert CompareConfig(limit=4).sweep_docs == 2 and CompareConfig(limit=4000).transfer_questions == 200
    given = CompareConfig(limit=100, frontier_questions=40, transfer_questions=0)  # explicit: kept
    assert (given.frontier_questions, given.transfer_questions) == (40, 0)
    assert quick.to_dict()["frontier_questions"] == 5  # the record holds the numbers used
    args = cli.build_parser().parse_args(["compare", "--out", "x", "--limit", "100"])
    assert cli_compare._compare_config(args).frontier_questions == 5


def test_cli_defaults_come_from_the_dataclass() -> None:
    args = cli.build_parser().parse_args(["compare", "--out", "x"])
    config = cli_compare._compare_config(args)
    fresh = CompareConfig()
    for f in dataclasses.fields(CompareConfig):
        if f.name in ("data_dir", "method_params", "judge_options"):
            continue
        assert getattr(config, f.name) == getattr(fresh, f.name), f.name
    assert args.methods == ",".join(default("methods"))
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["compare", "--out", "x", "--dataset", "imdb"])


def test_cli_epochs_go_only_to_methods_that_train_probes() -> None:
    args = cli.build_parser().parse_args(
        ["compare", "--out", "x", "--methods", "none,iti,slim", "--epochs", "3"]
    )
    assert cli_compare._compare_config(args).method_params == {"iti": {"epochs": 3}, "slim": {"epochs": 3}}


def test_cli_unknown_method_fails_before_the_model_and_leaves_no_folder(
    tmp_path, monkeypatch, capsys
) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(runtime, "load", no_model)
    monkeypatch.setattr(TruthfulQATask, "__init__", no_model)  # nor the data
    out = tmp_path / "out"
    rc = cli.main(["compare", "--methods", "none,foo", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == (
        "otguard: error: Invalid compare configuration: unknown method(s) 'foo'; "
        "valid methods: none, iti, mean-shift, radiant, slim (NAME@paper: the published settings, unswept)."
    )
    assert not out.exists()


def test_unknown_method_is_reported_without_importing_torch(tmp_path) -> None:
    """The configuration check runs before torch/transformers are imported (so it answers at once)."""
    script = (
        "import sys\n"
        "from otguard import cli\n"
        f"rc = cli.main(['compare', '--methods', 'none,foo', '--out', {str(tmp_path / 'out')!r}])\n"
        "assert rc == 2, rc\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "unknown method(s) 'foo'; valid methods: none, iti, mean-shift, radiant, slim (" in proc.stderr


def test_cli_refuses_a_foreign_out_folder_before_the_model(tmp_path, monkeypatch, capsys) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(runtime, "load", no_model)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc = cli.main(["compare", "--limit", "4", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "pass --force" in err
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == [
        "notes.txt"
    ]


def test_transfer_takes_nqopen_and_csv_files(tmp_path) -> None:
    csv = tmp_path / "mine.csv"
    csv.write_text("Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n")
    assert CompareConfig(transfer=None).transfer == ()
    assert CompareConfig(transfer="nqopen").transfer == ("nqopen",)
    config = CompareConfig(transfer=["nqopen", str(csv)])
    assert config.transfer == ("nqopen", str(csv)) and config.to_dict()["transfer"] == ["nqopen", str(csv)]
    assert default("transfer") == ("nqopen",) and default("bootstrap") == 2000 and default("gate") is True
    argv = ["compare", "--out", "x", "--transfer", "nqopen", "--transfer", str(csv), "--bootstrap", "1000",
            "--no-gate"]  # fmt: skip
    args = cli.build_parser().parse_args(argv)
    built = cli_compare._compare_config(args)
    assert (built.transfer, built.bootstrap, built.gate) == (("nqopen", str(csv)), 1000, False)
    plain = cli.build_parser().parse_args(["compare", "--out", "x"])
    assert cli_compare._compare_config(plain).transfer == ("nqopen",)
    none = cli.build_parser().parse_args(["compare", "--out", "x", "--transfer", "none"])
    assert cli_compare._compare_config(none).transfer == ()
    zero = cli.build_parser().parse_args(["compare", "--out", "x", "--transfer-questions", "0"])
    assert cli_compare._compare_config(zero).transfer == ()


def test_the_learned_judge_is_refused_cleanly_where_it_is_missing(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    def find_spec(name: str, *args: object) -> object:
        return None if name.endswith("learned_judge") else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ConfigError, match="the learned judge is not available .* use --judge sem"):
        CompareConfig(judge="learned")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"methods": ("none", "none@paper")}, "unknown method(s) 'none@paper'"),
        ({"methods": ("iti@best",)}, "unknown method(s) 'iti@best'"),
        ({"select_by": "mc1"}, "select_by must be one of mc2, true, true_x_info; got 'mc1'"),
        ({"kl_budget": 0.0}, "kl_budget must be a number > 0 (nats per token) or None; got 0.0"),
        ({"max_false_flag_rate": 1.5}, "max_false_flag_rate must be in (0, 1) or None; got 1.5"),
        ({"grids": {"slim": [{"kappa": 5}]}, "methods": ("none", "iti")}, "grids names method 'slim'"),
        ({"grids": {"iti": []}}, "grids['iti'] must be a non-empty list of parameter dicts"),
        ({"grids": {"iti": [{"alpha": 3}]}}, "the grid of 'iti' names unknown parameter(s) alpha"),
        ({"frontier_questions": -1}, "frontier_questions must be an integer >= 0; got -1"),
    ],
)
def test_sweep_settings_are_checked(changes, message) -> None:
    with pytest.raises(ConfigError) as info:
        CompareConfig(**changes)
    assert message in str(info.value)


def test_variants_take_their_base_methods_parameters() -> None:
    config = CompareConfig(methods=("none", "iti@paper"), method_params={"iti@paper": {"epochs": 3}})
    assert config.problems() == []


def test_cli_sweep_options_build_the_configuration() -> None:
    args = cli.build_parser().parse_args(
        ["compare", "--out", "x", "--grid", "iti:head_share=0.05:strength=1,3", "--param", "radiant:margin=4",
         "--kl-budget", "none", "--max-false-flag-rate", "0.2", "--select-by", "true"]
    )  # fmt: skip
    config = cli_compare._compare_config(args)
    assert config.grids == {"iti": [{"head_share": 0.05, "strength": 1}, {"head_share": 0.05, "strength": 3}]}
    assert config.method_params["radiant"] == {"margin": 4}
    assert config.kl_budget is None and config.max_false_flag_rate == 0.2 and config.select_by == "true"
    default = cli_compare._compare_config(cli.build_parser().parse_args(["compare", "--out", "x"]))
    assert default.kl_budget == 0.1 and default.max_false_flag_rate == 0.3 and default.sweep
    toxic = cli.build_parser().parse_args(["compare", "--out", "x", "--dataset", "toxigen"])
    assert cli_compare._compare_config(toxic).max_false_flag_rate is None  # no calibration there yet


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grid", "iti:alpha=3"], "the grid of 'iti' names unknown parameter(s) alpha"),
        (["--grid", "iti"], "--grid 'iti': use METHOD:PARAM=V1,V2"),
        (["--kl-budget", "lots"], "--kl-budget must be a number of nats per token or 'none'; got 'lots'."),
        (["--max-false-flag-rate", "2"], "max_false_flag_rate must be in (0, 1) or None; got 2.0"),
        (["--dataset", "toxigen", "--max-false-flag-rate", "0.3"], "(gate calibration) is TruthfulQA-only"),
        (["--dataset", "toxigen", "--ppl-budget", "lots"],
         "--ppl-budget must be a perplexity ratio > 1, 'none' or 'auto'; got 'lots'."),
        (["--dataset", "toxigen", "--ppl-budget", "0.9"], "ppl_budget must be a ratio > 1"),
        (["--ppl-budget", "1.5"], "ppl_budget applies to toxigen only"),
    ],
)
def test_cli_bad_sweep_options_fail_before_the_model(argv, message, tmp_path, monkeypatch, capsys) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(runtime, "load", no_model)
    out = tmp_path / "out"
    rc = cli.main(["compare", *argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
