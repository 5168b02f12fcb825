"""The toxicity scorer's own held-out quality: figures by hand, the sample, and the task's judges record."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from otguard.data import group_kfold, toxigen_statements
from otguard.errors import DataError
from otguard.evaluation.toxicity_scorers import EmbeddingToxicityScorer
from otguard.evaluation.toxicity_validation import (
    ScorerCheck,
    check_scorer,
    judge_record,
    sample_statements,
    scorer_figures,
)
from otguard.harness.config import CompareConfig
from otguard.harness.toxicity import ToxicityTask
from tests.fake_embedder import BagOfWords
from tests.unit.test_toxicity_scorers import _toy_dataset

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def _by_hand(scores: Sequence[float], labels: Sequence[int]) -> dict[str, float]:
    """AUROC by counting pairs, and the rates at score > 0.5, written out without numpy tricks."""
    hate = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neutral = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if h > n else 0.5 if h == n else 0.0 for h in hate for n in neutral)
    correct = sum((s > 0.5) == (y == 1) for s, y in zip(scores, labels, strict=True))
    return {
        "auroc": wins / (len(hate) * len(neutral)),
        "accuracy": correct / len(scores),
        "tpr": sum(h > 0.5 for h in hate) / len(hate),
        "tnr": sum(n <= 0.5 for n in neutral) / len(neutral),
        "mean_score_hate": sum(hate) / len(hate),
        "mean_score_neutral": sum(neutral) / len(neutral),
    }


def test_scorer_figures_match_a_computation_by_hand() -> None:
    scores = [0.9, 0.4, 0.7, 0.5, 0.2, 0.7, 0.6, 0.1]
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    got = scorer_figures(scores, labels)
    # pairs: 0.9 beats 4; 0.4 beats 2 (0.2, 0.1); 0.7 beats 3 (0.2, 0.6, 0.1) and ties 0.7; 0.5 beats 2
    assert got["auroc"] == pytest.approx(11.5 / 16, abs=1e-12)
    # 0.5 is not above the threshold: predicted hate 0.9, 0.7, 0.7, 0.6 -> 2 + 2 correct of 8
    assert got["accuracy"] == pytest.approx(4 / 8) and got["tpr"] == 0.5 and got["tnr"] == 0.5
    assert got["mean_score_hate"] == pytest.approx(2.5 / 4) and got["mean_score_neutral"] == pytest.approx(
        0.4
    )
    assert (got["n"], got["n_hate"], got["n_neutral"], got["unscored"]) == (8, 4, 4, 0)
    for key, want in _by_hand(scores, labels).items():
        assert got[key] == pytest.approx(want, abs=1e-12), key


def test_scorer_figures_leave_out_unscored_texts_and_check_inputs() -> None:
    got = scorer_figures([0.8, float("nan"), 0.3, 0.6], [1, 1, 0, 0], threshold=0.7)
    assert (got["n"], got["unscored"], got["threshold"]) == (3, 1, 0.7)
    assert got["auroc"] == 1.0 and got["accuracy"] == 1.0 and got["tnr"] == 1.0
    only_hate = scorer_figures([0.8], [1])
    assert np.isnan(only_hate["auroc"]) and np.isnan(only_hate["mean_score_neutral"])
    with pytest.raises(ValueError, match="labels"):
        scorer_figures([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="2 scores for 3 labels"):
        scorer_figures([0.1, 0.2], [0, 1, 1])


def test_sample_statements_is_seeded_per_class_and_only_of_the_groups() -> None:
    data = _toy_dataset()  # 3 groups x (4 neutral + 4 hate)
    texts, labels = sample_statements(data, ["alpha", "gamma"], per_class=3, seed=5)
    assert len(texts) == 6 and labels.tolist().count(1) == 3 and labels.tolist().count(0) == 3
    assert all("beta" not in t for t in texts)
    for t, y in zip(texts, labels, strict=True):  # every label is the dataset's label of that text
        assert data.labels[data.texts.index(t)] == y
    again = sample_statements(data, ["alpha", "gamma"], per_class=3, seed=5)
    assert again[0] == texts
    assert sample_statements(data, ["alpha", "gamma"], per_class=3, seed=6)[0] != texts
    every, _ = sample_statements(data, "beta", per_class=100)
    assert every == [t for t, g in zip(data.texts, data.groups, strict=True) if g == 1]
    with pytest.raises(DataError, match="Unknown group"):
        sample_statements(data, ["delta"])


class HashScorer:
    """A fake offline scorer: a fixed pseudo-random score per text, with a count of the texts scored."""

    name = "hash-scorer"
    measure = "hash score"

    def __init__(self) -> None:
        self.scored = 0

    def score(self, texts: Sequence[str]) -> np.ndarray:
        self.scored += len(texts)
        return np.array([zlib.crc32(t.encode()) % 1000 / 1000 for t in texts])


def test_check_scorer_scores_the_sample_and_refuses_groups_an_embedding_scorer_was_trained_on() -> None:
    data = _toy_dataset()
    check = check_scorer(HashScorer(), data, ["gamma"], per_class=10, split="gamma_only")
    texts, labels = sample_statements(data, ["gamma"], per_class=10)
    assert check.labels.tolist() == labels.tolist() and check.groups == ("gamma",)
    np.testing.assert_array_equal(check.scores, HashScorer().score(texts))
    fig = check.figures()
    assert fig["split"] == "gamma_only" and fig["groups"] == ["gamma"] and "n_train" not in fig
    for key, want in _by_hand(HashScorer().score(texts).tolist(), labels.tolist()).items():
        assert fig[key] == pytest.approx(want, abs=1e-12), key
    emb = EmbeddingToxicityScorer(BagOfWords(256), C=10.0).fit(data, exclude_groups=["gamma"])
    assert emb.n_train == 16 and check_scorer(emb, data, ["gamma"]).n_train == 16
    with pytest.raises(DataError, match="disjoint"):
        check_scorer(emb, data, ["beta", "gamma"])


def test_judge_record_has_one_split_per_check_and_the_pooled_figures() -> None:
    a = ScorerCheck("fold0_heldout_groups", ("a",), np.array([0.9, 0.2, 0.6]), np.array([1, 0, 0]), 10)
    b = ScorerCheck("fold1_heldout_groups", ("b",), np.array([0.3, 0.4]), np.array([1, 0]), 12)
    rec = judge_record("s", [a, b], measure="m", per_class=7, seed=3)
    assert rec["name"] == "s" and rec["validated"] is True and rec["validation"]["model"] == "m"
    assert "seed 3" in rec["validation"]["sample"] and "up to 7 hate" in rec["validation"]["sample"]
    splits = rec["validation"]["splits"]
    assert [s["split"] for s in splits] == ["fold0_heldout_groups", "fold1_heldout_groups", "all_folds"]
    assert splits[0]["auroc"] == 1.0 and splits[1]["auroc"] == 0.0 and splits[0]["n_train"] == 10
    pooled = _by_hand([0.9, 0.2, 0.6, 0.3, 0.4], [1, 0, 0, 1, 0])
    for key, want in pooled.items():
        assert splits[2][key] == pytest.approx(want, abs=1e-12), key
    assert splits[2]["n"] == 5
    assert judge_record("s", [a])["validation"]["splits"][0]["split"] == "fold0_heldout_groups"
    assert judge_record("s", [])["validated"] is False


# ------------------------------------------------------------------------------- the task's record


def _task(
    monkeypatch: pytest.MonkeyPatch, scorer: str = "embedding"
) -> tuple[ToxicityTask, list[HashScorer]]:
    built: list[HashScorer] = []

    def fake_make_scorer(spec: str, **kwargs: object) -> HashScorer:
        built.append(HashScorer())
        return built[-1]

    monkeypatch.setattr("otguard.evaluation.factory.make_scorer", fake_make_scorer)
    config = CompareConfig(dataset="toxigen", data_dir=str(FIXTURES), methods=("none",), scorer=scorer,
                           val_ratio=0.0, drift_source=None)  # fmt: skip
    return ToxicityTask(config, progress=False), built


def _expected(fold: int) -> dict[str, float]:
    data = toxigen_statements(FIXTURES, source="both")
    split = group_kfold(data, n_folds=2, fold=fold, val_ratio=0.0, seed=42)
    rows = split.test.tolist()
    scores = HashScorer().score([data.texts[i] for i in rows]).tolist()
    return _by_hand(scores, [int(data.labels[i]) for i in rows])


def test_task_judges_record_carries_each_folds_held_out_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    task, built = _task(monkeypatch)
    for fold in (0, 1):
        split = group_kfold(task.dataset, n_folds=2, fold=fold, val_ratio=0.0, seed=42)
        task.start_fold(fold, split)
        task.start_fold(fold, split)  # a fold started again is not checked again
    assert len(built) == 4 and [s.scored for s in built] == [10, 0, 5, 0]
    record = task.judges()["toxicity"]
    assert task.judges()["toxicity"] == record and sum(s.scored for s in built) == len(task.dataset)
    assert record["name"] == "hash-scorer" and record["validated"] is True
    splits = record["validation"]["splits"]
    assert [s["split"] for s in splits] == ["fold0_heldout_groups", "fold1_heldout_groups", "all_folds"]
    assert splits[0]["groups"] == ["asian"] and splits[1]["groups"] == ["mental_disability"]
    for fold in (0, 1):
        for key, want in _expected(fold).items():
            assert splits[fold][key] == pytest.approx(want, abs=1e-12), (fold, key)
    assert splits[2]["n"] == len(task.dataset) == 15


def test_task_judges_checks_folds_a_resumed_run_did_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    task, built = _task(monkeypatch)
    splits = task.judges()["toxicity"]["validation"]["splits"]  # no fold started: both refitted here
    assert len(built) == 2 and [s["split"] for s in splits][:2] == [
        "fold0_heldout_groups",
        "fold1_heldout_groups",
    ]
    for fold in (0, 1):
        assert splits[fold]["auroc"] == pytest.approx(_expected(fold)["auroc"], abs=1e-12)


def test_task_judges_marks_online_scorers_not_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    task, built = _task(monkeypatch, scorer="detoxify")
    task.start_fold(0, group_kfold(task.dataset, n_folds=2, fold=0, val_ratio=0.0, seed=42))
    record = task.judges()["toxicity"]
    assert record["validated"] is False and "Detoxify" in record["note"] and built[0].scored == 0
