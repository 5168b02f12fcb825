"""Hyper-parameter sweeps in results.json: merge_sweep's means, the round trip of ``sweep`` and
``selection``, the load-time checks (a malformed sweep names its path) and older files without them."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from otguard.errors import ResultsError
from otguard.results import (
    MethodResult,
    MetricSpec,
    MetricSummary,
    RunResults,
    Selection,
    SweepFold,
    SweepPoint,
    merge_sweep,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "results_small.json"


def _folds() -> list[list[dict[str, Any]]]:
    """Two folds of a three-point grid; the alpha=10 point exists only on fold 1 (its grid was capped)."""
    fold0: list[dict[str, Any]] = [
        {"params": {"alpha": 1.0}, "validation": {"mc2": 0.4, "kl": 0.02},
         "test": {"mc2": 0.38, "kl": 0.03, "true": 0.5}, "selected": True},
        {"params": {"alpha": 5.0}, "validation": {"mc2": 0.5, "kl": 0.2},
         "test": {"mc2": 0.45, "kl": 0.25, "true": None}, "selected": False},
    ]  # fmt: skip
    fold1: list[dict[str, Any]] = [
        # Grid order differs by fold and 5 (int) is the same point as 5.0: matched by equal params.
        {"params": {"alpha": 5}, "validation": {"mc2": 0.6, "kl": 0.05},
         "test": {"mc2": 0.55, "kl": 0.15, "true": 0.6}, "selected": True, "seconds": 2.0},
        {"params": {"alpha": 1.0}, "validation": {"mc2": 0.3, "kl": 0.04},
         "test": {"mc2": 0.32, "kl": 0.05, "true": float("nan")}, "selected": False},
        {"params": {"alpha": 10.0}, "validation": {"mc2": 0.7}, "test": {"mc2": 0.2, "kl": 1.5}},
    ]  # fmt: skip
    return [fold0, fold1]


def test_merge_sweep_means_selection_and_budget() -> None:
    sweep = merge_sweep(_folds(), kl_budget=0.1)
    assert [p["params"] for p in sweep] == [{"alpha": 1.0}, {"alpha": 5.0}, {"alpha": 10.0}]
    a1, a5, a10 = sweep
    # alpha=1: means of the two folds; True only from fold 0 (fold 1's is NaN).
    assert a1["validation"] == {"mc2": pytest.approx(0.35, abs=1e-15), "kl": pytest.approx(0.03, abs=1e-15)}
    assert a1["test"] == {
        "mc2": pytest.approx(0.35, abs=1e-15),
        "kl": pytest.approx(0.04, abs=1e-15),
        "true": 0.5,
    }
    assert a1["selected_folds"] == [0] and a1["within_budget"] is True  # KL 0.02 and 0.04 <= 0.1
    # alpha=5: fold 0's True is None -> fold 1's 0.6; fold 0's validation KL 0.2 breaks the budget.
    assert a5["validation"] == {"mc2": pytest.approx(0.55, abs=1e-15), "kl": pytest.approx(0.125, abs=1e-15)}
    assert a5["test"] == {
        "mc2": pytest.approx(0.5, abs=1e-15),
        "kl": pytest.approx(0.2, abs=1e-15),
        "true": 0.6,
    }
    assert a5["selected_folds"] == [1] and a5["within_budget"] is False
    # alpha=10: one fold, no validation KL -> budget unknown.
    assert a10["validation"] == {"mc2": 0.7} and a10["test"] == {"mc2": 0.2, "kl": 1.5}
    assert a10["selected_folds"] == [] and a10["within_budget"] is None
    # The per-fold records behind the means, in fold order, extra keys kept.
    assert a5["folds"] == [
        {"fold": 0, "validation": {"mc2": 0.5, "kl": 0.2}, "test": {"mc2": 0.45, "kl": 0.25, "true": None},
         "selected": False, "within_budget": False},
        {"fold": 1, "validation": {"mc2": 0.6, "kl": 0.05}, "test": {"mc2": 0.55, "kl": 0.15, "true": 0.6},
         "selected": True, "within_budget": True, "seconds": 2.0},
    ]  # fmt: skip
    assert a1["folds"][1]["test"]["true"] is None  # NaN stored as null


def test_merge_sweep_fold_ids_flags_and_errors() -> None:
    folds = _folds()
    folds[0][0]["within_budget"] = False  # the fold's own flag wins over kl <= budget
    sweep = merge_sweep(folds, fold_ids=[3, 7])
    assert sweep[0]["selected_folds"] == [3] and sweep[1]["selected_folds"] == [7]
    assert [r["fold"] for r in sweep[0]["folds"]] == [3, 7]
    assert sweep[0]["within_budget"] is False
    assert sweep[1]["within_budget"] is None  # no budget given, no flags
    with pytest.raises(ValueError, match="fold_ids has 1 entries for 2 folds"):
        merge_sweep(_folds(), fold_ids=[0])
    twice = [[{"params": {"alpha": 1}}, {"params": {"alpha": 1.0}}]]
    with pytest.raises(ValueError, match=r"fold 0 lists the grid point \{'alpha': 1.0\} twice"):
        merge_sweep(twice)
    assert merge_sweep([]) == [] and merge_sweep([[], []]) == []


def _run() -> RunResults:
    sweep = [SweepPoint.from_dict(p) for p in merge_sweep(_folds(), kl_budget=0.1)]
    return RunResults(
        config={"dataset": "truthfulqa", "folds": 2, "methods": ["none", "iti", "iti@paper"]},
        methods={
            "none": MethodResult({"mc2": MetricSummary.of([0.3, 0.32])}),
            "iti": MethodResult({"mc2": MetricSummary.of([0.38, 0.55])}, [], sweep),
            "iti@paper": MethodResult({"mc2": MetricSummary.of([0.25, 0.27])}),
        },
        metrics={
            "mc2": MetricSpec("MC2", True, "mc", "%"),
            "kl": MetricSpec("KL", False, "side-effects", "nats"),
            "true": MetricSpec("True", True, "generation", "%"),
        },
        task="truthfulqa",
        selection=Selection(
            metric="mc2",
            rule="Highest validation MC2 among grid points within the KL budget",
            kl_budget=0.1,
            kl_on="validation documents",
            frontier_questions=100,
            extra={"fallback": "lowest validation KL"},
        ),
    )


def test_round_trip_of_sweep_and_selection(tmp_path: Path) -> None:
    run = _run()
    data = run.to_dict()
    assert "sweep" not in data["methods"]["none"] and "sweep" not in data["methods"]["iti@paper"]
    assert data["selection"] == {
        "metric": "mc2", "kl_budget": 0.1, "kl_on": "validation documents", "frontier_questions": 100,
        "rule": "Highest validation MC2 among grid points within the KL budget",
        "fallback": "lowest validation KL",
    }  # fmt: skip
    point = data["methods"]["iti"]["sweep"][1]
    assert set(point) == {"params", "validation", "test", "selected_folds", "within_budget", "folds"}
    assert point["selected_folds"] == [1] and point["within_budget"] is False
    back = RunResults.from_dict(json.loads(json.dumps(data)))
    assert back.to_dict() == data
    assert back.selection == run.selection
    assert back.methods["iti"].sweep == run.methods["iti"].sweep
    assert back.methods["none"].sweep is None
    assert back.swept_methods == ["iti"]
    first = back.methods["iti"].sweep[0]
    assert first.selected and not back.methods["iti"].sweep[2].selected
    assert first.folds[1] == SweepFold(1, {"mc2": 0.3, "kl": 0.04}, {"mc2": 0.32, "kl": 0.05, "true": None},
                                       False, {"within_budget": True})  # fmt: skip
    path = run.write(tmp_path / "results.json")
    assert RunResults.from_json(path).to_dict() == data


def test_older_files_load_without_sweep_or_selection() -> None:
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))
    run = RunResults.from_dict(data)
    assert run.selection is None and run.swept_methods == []
    assert all(m.sweep is None for m in run.methods.values())
    out = run.to_dict()
    assert "selection" not in out and not any("sweep" in m for m in out["methods"].values())


def _broken(edit: Any) -> dict[str, Any]:
    data = copy.deepcopy(_run().to_dict())
    edit(data)
    return data


def _sweep(data: dict[str, Any]) -> list[dict[str, Any]]:
    return data["methods"]["iti"]["sweep"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["methods"]["iti"].update(sweep={"alpha": 1}),
         "methods.iti.sweep must be a list of grid points"),
        (lambda d: _sweep(d)[1].pop("params"), "missing key methods.iti.sweep[1].params"),
        (lambda d: _sweep(d)[1].update(params=[1.0]), "methods.iti.sweep[1].params must be an object"),
        (lambda d: _sweep(d)[2].update(params={"alpha": 1.0}),
         "methods.iti.sweep[2].params repeats methods.iti.sweep[0].params"),
        (lambda d: _sweep(d)[0].pop("test"), "missing key methods.iti.sweep[0].test"),
        (lambda d: _sweep(d)[0]["test"].update(mc2="high"),
         "methods.iti.sweep[0].test.mc2 must be a number or null"),
        (lambda d: _sweep(d)[0].update(validation=[0.4]),
         "methods.iti.sweep[0].validation must be an object of metric values"),
        (lambda d: _sweep(d)[0].update(selected_folds=[0, "1"]),
         "methods.iti.sweep[0].selected_folds must be a list of fold numbers"),
        (lambda d: _sweep(d)[0].update(within_budget="yes"),
         "methods.iti.sweep[0].within_budget must be true, false or null"),
        (lambda d: _sweep(d)[0]["folds"][1].pop("fold"), "missing key methods.iti.sweep[0].folds[1].fold"),
        (lambda d: _sweep(d)[0]["folds"][1]["validation"].update(kl=[0.1]),
         "methods.iti.sweep[0].folds[1].validation.kl must be a number or null"),
        (lambda d: _sweep(d)[0]["folds"].append(3), "methods.iti.sweep[0].folds[2] must be an object"),
        (lambda d: d["selection"].pop("rule"), "missing key selection.rule"),
        (lambda d: d["selection"].update(kl_budget="0.1"), "selection.kl_budget must be a number or null"),
        (lambda d: d["selection"].update(ppl_budget="1.5"), "selection.ppl_budget must be a number or null"),
        (lambda d: d.update(selection=["mc2"]), "selection must be an object or null"),
    ],
)  # fmt: skip
def test_a_malformed_sweep_names_its_path(edit: Any, message: str) -> None:
    data = _broken(edit)
    with pytest.raises(ResultsError) as info:
        RunResults.from_dict(data, source="Results file r.json")
    text = str(info.value)
    assert text.startswith("Results file r.json is not a valid otguard compare result: ")
    assert message in text
    assert text.count(";") == 0  # exactly one problem reported for one defect


def test_write_refuses_a_malformed_sweep(tmp_path: Path) -> None:
    run = _run()
    run.methods["iti"].sweep[0].test["mc2"] = "high"
    with pytest.raises(ResultsError, match=r"methods\.iti\.sweep\[0\]\.test\.mc2 must be a number or null"):
        run.write(tmp_path / "results.json")
    assert not (tmp_path / "results.json").exists()


def test_non_finite_sweep_values_load_as_none() -> None:
    data = _run().to_dict()
    _sweep(data)[0]["test"]["kl"] = math.inf
    run = RunResults.from_dict(data)
    assert run.methods["iti"].sweep[0].test["kl"] is None
