"""Repair and harm on hand-made answers, and the aggregation fixes of issue 11: True×Info from the fold
means, edited heads per flagged position as a ratio of summed counts, examples, a seeded Stage-3
sample from all validation questions, stage timings not counted twice."""

from __future__ import annotations

import math
from typing import Any

import pytest

from otguard.harness.paired import ItemValues, repair_harm
from otguard.harness.resume import PartialResult
from otguard.harness.summary import FLAGGED, HEADS, method_result, pick_examples
from otguard.harness.task import StageTimer
from otguard.harness.truthfulqa import TruthfulQATask
from otguard.methods.stage3 import sample_questions
from otguard.results import FoldRecord


def test_repair_and_harm_by_hand() -> None:
    before = [1, 1, 0, 0, 0]  # right, right, wrong, wrong, wrong
    after = [1, 0, 1, 1, 0]
    assert repair_harm(before, after) == (2 / 3, 1 / 2)
    assert repair_harm([1, 1], [1, 0]) == (pytest.approx(math.nan, nan_ok=True), 0.5)  # nothing to repair
    assert repair_harm([0.4, 0.6], [0.6, 0.4]) == (1.0, 1.0)  # MC1-style values: >= 0.5 is right
    with pytest.raises(ValueError, match="one value per question"):
        repair_harm([1, 0], [1])


class _Task:
    """The paired-metric part of the TruthfulQA task, on a made-up item set."""

    def repair_metrics(self) -> dict[str, tuple[str, str, str]]:
        return {"repair_rate": ("test", "true", "repair"), "harm_rate": ("test", "true", "harm")}

    def product_metrics(self) -> dict[str, tuple[str, str, str]]:
        return {"true_x_info_product": ("test", "true", "info")}

    examples = TruthfulQATask.examples


def _part(fold: int, method: str, true: list[int], info: list[int], meta: dict[str, Any] | None = None,
          answers: list[str] | None = None) -> PartialResult:  # fmt: skip
    ids = [f"q{fold}{i}" for i in range(len(true))]
    t, i = sum(true) / len(true), sum(info) / len(info)
    metrics = {"true": t, "info": i, "true_x_info_product": t * i, "edited_heads": 0.0}
    texts = answers or ids
    rows = [{"fold": fold, "method": method, "question": q, "answer": texts[k], "true": bool(true[k])}
            for k, q in enumerate(ids)]  # fmt: skip
    return PartialResult(fold, method, metrics, FoldRecord(fold, meta=dict(meta or {})), rows,
                         items={"test": ItemValues(ids, {"true": true, "info": info})})  # fmt: skip


def test_product_of_fold_means_repair_harm_and_edited_heads_ratio_of_sums() -> None:
    # fold 0: True 1/5 (0.2), Info 4/5 (0.8); fold 1: True 4/5, Info 1/5. Per-fold products 0.16 each:
    # their mean is 0.16, the product of the fold means 0.5 x 0.5 = 0.25.
    bases = [
        _part(0, "none", [0, 0, 0, 0, 1], [1, 1, 1, 1, 0]),
        _part(1, "none", [0, 1, 0, 0, 1], [1, 1, 1, 1, 1]),
    ]
    parts = [
        _part(0, "slim", [1, 0, 0, 0, 0], [1, 1, 1, 1, 0], {HEADS: 10.0, FLAGGED: 5.0}),
        _part(1, "slim", [1, 1, 1, 1, 0], [0, 0, 0, 0, 1], {HEADS: 90.0, FLAGGED: 10.0}),
    ]
    res = method_result(_Task(), "slim", parts, bases, bootstrap=1000, seed=0)  # type: ignore[arg-type]
    product = res.metrics["true_x_info_product"]
    assert product.folds == [pytest.approx(0.16), pytest.approx(0.16)]
    assert product.mean == pytest.approx(0.25, abs=1e-15)
    # fold 0: wrong before q00..q03, repaired q00 -> 1/4; right before q04, harmed -> 1/1
    # fold 1: wrong before q10, q12, q13, all repaired -> 3/3; right before q11, q14: q14 harmed -> 1/2
    assert res.metrics["repair_rate"].folds == [0.25, 1.0] and res.metrics["repair_rate"].mean == 0.625
    assert res.metrics["harm_rate"].folds == [1.0, 0.5] and res.metrics["harm_rate"].mean == 0.75
    assert res.metrics["repair_rate"].delta_vs_none.mean == 0.625  # none repairs nothing: the rate itself
    # edited heads per flagged position: (10 + 90) / (5 + 10), not the mean of 2 and 9
    assert res.metrics["edited_heads"].mean == pytest.approx(100 / 15)
    true = res.metrics["true"]
    assert true.delta_vs_none.mean == pytest.approx((0.2 + 0.8) / 2 - (0.2 + 0.4) / 2, abs=1e-15)
    base = method_result(_Task(), "none", bases, bases, bootstrap=1000)  # type: ignore[arg-type]
    assert "repair_rate" not in base.metrics and base.metrics["true"].delta_vs_none is None
    no_ci = method_result(_Task(), "slim", parts, bases, bootstrap=0)  # type: ignore[arg-type]
    assert no_ci.metrics["true"].delta_vs_none is None and no_ci.metrics["repair_rate"].mean == 0.625


def test_examples_are_the_changed_verdicts_picked_with_a_seed() -> None:
    bases = [_part(0, "none", [0, 0, 1], [1, 1, 1], answers=["Sydney.", "Yes.", "No, it is not visible."])]
    parts = [_part(0, "slim", [1, 0, 0], [1, 1, 1], answers=["Canberra.", "Yes.", "It is visible."])]
    got = pick_examples(_Task(), parts, bases, seed=0)  # type: ignore[arg-type]
    assert got == {
        "repaired": [{"fold": 0, "question": "q00", "before": "Sydney.", "after": "Canberra."}],
        "harmed": [
            {"fold": 0, "question": "q02", "before": "No, it is not visible.", "after": "It is visible."}
        ],
    }
    # after a round trip through the CSV the verdicts are text
    text_rows = [{**r, "true": str(r["true"])} for r in parts[0].rows]
    assert TruthfulQATask.examples(None, bases[0].rows, text_rows)["repaired"][0]["question"] == "q00"  # type: ignore[arg-type]
    many = [_part(0, "slim", [1] * 10, [1] * 10)]
    few = [_part(0, "none", [0] * 10, [1] * 10)]
    picked = pick_examples(_Task(), many, few, seed=4)  # type: ignore[arg-type]
    assert len(picked["repaired"]) == 3 and picked == pick_examples(_Task(), many, few, seed=4)  # type: ignore[arg-type]


def test_stage3_sample_is_seeded_and_drawn_from_all_validation_questions() -> None:
    items = list(range(100))  # sorted "by category": the first 24 would be categories 0..2 only
    pick = sample_questions(items, 24, seed=0)
    assert len(pick) == 24 and pick == sorted(pick) and pick == sample_questions(items, 24, seed=0)
    assert pick != items[:24] and max(pick) > 50
    assert sample_questions(items, 24, seed=1) != pick
    assert sample_questions(items[:5], 24, seed=0) == items[:5] and sample_questions(items, 0, seed=0) == []


def test_nested_stages_are_not_counted_twice(monkeypatch) -> None:
    clock = iter([0.0, 2.0, 7.0, 10.0])  # fit starts 0, stage3 2..7 inside it, fit ends 10
    monkeypatch.setattr("otguard.harness.task.time.time", lambda: next(clock))
    timer = StageTimer()
    with timer("fit"), timer("stage3"):
        pass
    assert timer.seconds == {"stage3": 5.0, "fit": 5.0}  # adds up to the 10 s of wall time


def test_fit_seconds_exclude_stage3(monkeypatch) -> None:
    from otguard.harness import run
    from otguard.harness.config import CompareConfig

    clock = iter([0.0, 3.0, 3.0, 11.0])  # fit 0..3, Stage 3 3..11

    class Policy:
        def __init__(self) -> None:
            self.meta: dict[str, Any] = {}

    class Method:
        def get_params(self) -> dict[str, Any]:
            return {}

        def set_params(self, **kw: Any) -> Method:
            return self

        def fit_grid(self, acts: Any, train: Any, val: Any, grid: list[dict[str, Any]]) -> list[Policy]:
            return [Policy() for _ in grid]

    class Task:
        supports_sweep = False

        def stage3(self, policy: Any) -> Any:
            return policy

    monkeypatch.setattr("otguard.methods.get_method", lambda name: Method())
    monkeypatch.setattr(run.time, "time", lambda: next(clock))
    split = type("S", (), {"train": [], "val": []})()
    acts = type("A", (), {"n_layers": 2, "n_heads": 2})()
    fitted = run.fit_policies(CompareConfig(methods=("slim",)), ["slim"], acts, split, Task(), False)  # type: ignore[arg-type]
    assert fitted["slim"].policy.meta == {"fit_seconds": 3.0, "stage3_seconds": 8.0}
