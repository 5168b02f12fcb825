"""The results.json contract (otguard.results): round trips, format 1 upgrade, validation, atomic write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from otguard.errors import DataFileNotFoundError, ResultsError
from otguard.results import (
    FORMAT_VERSION,
    Delta,
    DetectorRecord,
    FoldRecord,
    MethodResult,
    MetricSpec,
    MetricSummary,
    RunResults,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "results_small.json"


def _results() -> RunResults:
    det = DetectorRecord(per_layer={"fpr": [0.1, None], "fnr": [0.2, 0.3], "threshold": [2.0, 3.0]}, layer=1)
    folds = [
        FoldRecord(fold=0, policy={"layers": [1], "kappa": 10.0}, detector=det, seconds=1.5, fit_seconds=0.5,
                   meta={"test_questions": 20}),
        FoldRecord(fold=1, policy={"layers": [0], "kappa": 5.0}, detector=None, seconds=2.5,
                   meta={"test_questions": 20}),
    ]  # fmt: skip
    return RunResults(
        config={"dataset": "truthfulqa", "folds": 2, "methods": ["none", "slim"], "judge": "sem:minilm"},
        methods={
            "none": MethodResult({"mc1": MetricSummary.of([0.25, 0.35])}, []),
            "slim": MethodResult(
                {"mc1": MetricSummary(0.3, 0.0, [0.3, None], Delta(0.05, (0.01, 0.09), 40, 1000))}, folds
            ),
        },
        metrics={"mc1": MetricSpec("MC1", True, "mc", "%")},
        task="truthfulqa",
        started="2026-01-01T12:00:00",
        seconds=12.5,
        timings={"collect": 1.0},
        versions={"otguard": "0.1.0"},
        judges={"true": {"name": "learned:truth", "validated": True,
                         "validation": {"seen_questions": {"accuracy": 0.86, "auroc": 0.91}}}},
        examples={"slim": {"repaired": [{"fold": 0, "question": "Q?", "before": "no", "after": "yes"}],
                           "harmed": []}},
    )


def test_metric_summary_is_the_sample_std_over_finite_folds() -> None:
    s = MetricSummary.of([0.2, 0.4, float("nan")])
    assert s.mean == pytest.approx(0.3, abs=1e-15)
    # sample std (ddof=1): sqrt(((0.1)^2 + (0.1)^2) / 1); the population std would be 0.1
    assert s.std == pytest.approx(float(np.std([0.2, 0.4], ddof=1)), abs=1e-15)
    assert s.std == pytest.approx(2**0.5 / 10, abs=1e-15)
    assert MetricSummary.of([0.2, 0.4], ddof=0).std == pytest.approx(0.1, abs=1e-15)
    assert s.folds == [0.2, 0.4, None]
    one = MetricSummary.of([0.7])
    assert (one.mean, one.std, one.folds) == (0.7, 0.0, [0.7])
    empty = MetricSummary.of([float("nan")])
    assert (empty.mean, empty.std, empty.folds) == (None, 0.0, [None])


def test_a_mean_that_is_not_the_mean_of_the_folds_is_kept() -> None:
    # True x Info product: the product of the fold means (0.5 * 0.5), not the mean of the per-fold
    # products (0.2 * 0.8 and 0.8 * 0.2 -> 0.16).
    s = MetricSummary.of([0.16, 0.16], mean=0.25)
    assert (s.mean, s.std, s.folds) == (0.25, 0.0, [0.16, 0.16])


def test_delta_round_trip_and_the_zero_test() -> None:
    d = Delta(0.02, (0.005, 0.04), n=40, resamples=2000)
    assert d.excludes_zero and not Delta(0.01, (-0.01, 0.03)).excludes_zero
    assert Delta(-0.05, (-0.09, -0.01)).excludes_zero and not Delta(None, (None, None)).excludes_zero
    s = MetricSummary(0.3, 0.01, [0.29, 0.31], delta_vs_none=d)
    data = s.to_dict()
    assert data["delta_vs_none"] == {"mean": 0.02, "ci95": [0.005, 0.04], "n": 40, "resamples": 2000}
    assert MetricSummary.from_dict(data) == s


def test_round_trip_through_json_keeps_every_field(tmp_path) -> None:
    res = _results()
    path = res.write(tmp_path / "results.json")
    again = RunResults.from_json(path)
    assert again.to_dict() == res.to_dict()
    data = json.loads(path.read_text())
    assert data["format_version"] == FORMAT_VERSION == 3 and data["std_ddof"] == again.std_ddof == 1
    assert data["methods"]["slim"]["folds"][0]["test_questions"] == 20  # meta sits next to the record keys
    assert data["methods"]["slim"]["summary"]["mc1"] == {
        "mean": 0.3, "std": 0.0, "folds": [0.3, None],
        "delta_vs_none": {"mean": 0.05, "ci95": [0.01, 0.09], "n": 40, "resamples": 1000},
    }  # fmt: skip
    assert again.judges == res.judges and again.examples == res.examples
    assert again.methods["slim"].metrics["mc1"].delta_vs_none == Delta(0.05, (0.01, 0.09), 40, 1000)
    assert again.methods["slim"].folds[0].detector.chosen_layers == [1]
    assert again.summary("none", "mc1").mean == pytest.approx(0.3)
    assert again.summary("none", "mc2") is None and again.summary("iti", "mc1") is None
    assert again.method_ids == ["none", "slim"]
    assert RunResults.from_json(tmp_path).to_dict() == res.to_dict()  # the run folder works too


def test_write_is_atomic_and_uses_the_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        path = _results().write(tmp_path / "results.json")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp left behind


def test_format_1_files_load_with_run_facts_moved_out_of_config() -> None:
    res = RunResults.from_json(FIXTURE)
    raw = json.loads(FIXTURE.read_text())
    assert res.task == "truthfulqa"
    assert res.started == raw["config"]["started"] and res.seconds == raw["config"]["seconds"]
    assert res.versions == raw["config"]["versions"]
    assert "started" not in res.config and res.config["folds"] == 2
    assert res.method_ids == raw["config"]["methods"]
    assert res.std_ddof == 0 and res.judges == {} and res.examples == {}  # old files: population std


def test_format_2_files_load_with_the_population_std() -> None:
    data = _results().to_dict()
    data["format_version"] = 2
    for key in ("std_ddof", "judges", "examples"):
        data.pop(key)
    res = RunResults.from_dict(data)
    assert res.std_ddof == 0 and res.summary("none", "mc1").mean == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("methods"), "missing key methods"),
        (lambda d: d["config"].pop("methods"), "missing key config.methods"),
        (lambda d: d.__setitem__("format_version", 99), "format_version 99"),
        (lambda d: d["methods"]["slim"]["summary"]["mc1"].pop("mean"),
         "missing key methods.slim.summary.mc1.mean"),
        (lambda d: d["methods"]["slim"]["summary"]["mc1"].__setitem__("folds", ["x"]),
         "methods.slim.summary.mc1.folds must be a list of numbers"),
        (lambda d: d["methods"]["slim"]["folds"][0]["detector"]["per_layer"].pop("fpr"),
         "missing key methods.slim.folds[0].detector.per_layer.fpr"),
        (lambda d: d["metrics"]["mc1"].__setitem__("higher_is_better", "yes"),
         "metrics.mc1.higher_is_better must be true, false or null"),
        (lambda d: d["methods"]["slim"]["summary"]["mc1"]["delta_vs_none"].__setitem__("ci95", [0.1]),
         "methods.slim.summary.mc1.delta_vs_none must be"),
        (lambda d: d.__setitem__("judges", {"true": "learned"}), "judges must be an object of judge records"),
        (lambda d: d.__setitem__("std_ddof", 2), "std_ddof must be 0 or 1"),
        (lambda d: d.__setitem__("examples", {"slim": ["x"]}), "examples must be an object"),
    ],
)  # fmt: skip
def test_malformed_files_are_one_results_error_naming_the_key(edit, message, tmp_path) -> None:
    data = _results().to_dict()
    edit(data)
    with pytest.raises(ResultsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RunResults.from_dict(data)


def test_truncated_and_missing_files(tmp_path) -> None:
    path = tmp_path / "results.json"
    path.write_text(_results().to_json()[:200])
    with pytest.raises(ResultsError, match="not valid JSON .*did the compare job finish"):
        RunResults.from_json(path)
    with pytest.raises(DataFileNotFoundError, match="Results file not found"):
        RunResults.from_json(tmp_path / "nope.json")


def test_validate_refuses_fold_meta_that_shadows_record_keys() -> None:
    res = _results()
    res.methods["slim"].folds[0].meta["seconds"] = 3.0
    with pytest.raises(ResultsError, match=r"repeats the record's keys \['seconds'\]"):
        res.validate()


def test_to_dict_is_a_copy() -> None:
    res = _results()
    data = res.to_dict()
    data["config"]["folds"] = 7
    data["methods"]["slim"]["folds"][0]["policy"]["kappa"] = -1
    assert res.config["folds"] == 2 and res.methods["slim"].folds[0].policy == {"layers": [1], "kappa": 10.0}
