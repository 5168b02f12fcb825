"""Learned judges on a tiny synthetic label file: parsing, the two splits, determinism, cache, judging."""

from __future__ import annotations

import json

import numpy as np
import pytest

from otguard.data.qa import QAItem
from otguard.errors import DataError, ModelLoadError
from otguard.evaluation import learned_judge as lj
from otguard.evaluation.factory import make_judge
from otguard.evaluation.learned_judge import (
    INFO_LABEL,
    TRUTH_LABEL,
    JudgeSettings,
    LearnedClassifier,
    LearnedJudge,
    fit_classifier,
    rates,
    train_or_load,
    validate,
)
from otguard.evaluation.learned_judge_data import (
    answer_key,
    load_labels,
    split_seen_questions,
    split_unseen_questions,
)
from otguard.evaluation.verdicts import Judge

FAST = JudgeSettings(folds=2, epochs=60, hidden=8)
TOPICS = ["cats", "dogs", "owls", "bats", "eels", "rats", "cows", "pigs", "ants", "bees", "yaks", "emus"]


def _items() -> list[QAItem]:
    return [
        QAItem(
            question=f"Do {t} fly?",
            best_answer=f"No, {t} do not fly",
            correct_answers=(f"No, {t} do not fly", f"{t} cannot fly"),
            incorrect_answers=(f"Yes, {t} fly",),
        )
        for t in TOPICS
    ]


def _lines() -> list[tuple[str, str, str]]:
    """(question, answer, label): answers that deny flying are true, the others false."""
    out = []
    for t in TOPICS:
        q = f"Do {t} fly?"
        out += [(q, f"No, {t} do not fly.", "yes"), (q, f"Yes, {t} fly.", "no")]  # references
        for k in range(3):
            out.append((q, f"{t.capitalize()} never fly, not even {k} times.", "yes"))
            out.append((q, f"{t.capitalize()} fly {k} miles every night.", "no"))
        out.append((q, f"{t} fly 0 miles every night", "no"))  # the same answer as one above
    return out


def _write(path, lines, tag="True"):
    rows = [{"prompt": f"Q: {q}\nA: {a}\n{tag}:", "completion": f" {lab}"} for q, a, lab in lines]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def labels(tmp_path):
    return _write(tmp_path / "truth.jsonl", _lines())


def test_load_labels_marks_references_and_same_answers(labels):
    data = load_labels(labels, _items())
    assert len(data) == 12 * 9 and len(data.questions) == 12
    assert data.answers[0] == "No, cats do not fly." and data.labels[:2].tolist() == [1, 0]
    assert data.is_reference[:3].tolist() == [True, True, False]
    assert int(data.is_reference.sum()) == 24
    # "Cats fly 0 miles every night." and "cats fly 0 miles every night" are one answer
    assert data.keys[8] == data.keys[3] and len(set(data.keys[:9].tolist())) == 8
    assert answer_key("  The  Sky. ") == "the sky"


def test_load_labels_rejects_bad_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q: q\nA: a\nTrue:", "completion": " maybe"}) + "\n")
    with pytest.raises(DataError, match="line 1"):
        load_labels(bad)
    with pytest.raises(DataError, match="not found"):
        load_labels(tmp_path / "missing.jsonl")


def test_split_seen_questions_shares_no_answer(labels):
    data = load_labels(labels, _items())
    train, test = split_seen_questions(data, seed=3)
    assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == len(data)
    assert not set(data.keys[train].tolist()) & set(data.keys[test].tolist())
    assert not data.is_reference[test].any()
    distinct_model = np.unique(data.keys[~data.is_reference])
    assert len(np.unique(data.keys[test])) == len(distinct_model) // 2
    again, _ = split_seen_questions(data, seed=3)
    other, _ = split_seen_questions(data, seed=4)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_split_unseen_questions_shares_no_question(labels):
    data = load_labels(labels, _items())
    for fold, tested in ((0, range(6)), (1, range(6, 12))):
        train, test = split_unseen_questions(data, fold)
        assert set(data.question_ids[test].tolist()) == set(tested)
        assert set(data.question_ids[train].tolist()) == set(range(12)) - set(tested)
        assert not data.is_reference[test].any()
        assert len(test) == 6 * 7
    with pytest.raises(DataError, match="fold"):
        split_unseen_questions(data, 2)


def test_rates_on_hand_made_scores():
    got = rates(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1]))
    assert got == {"accuracy": 0.5, "auroc": 0.75, "tpr": 0.5, "tnr": 0.5, "n": 4}


def test_training_is_deterministic_and_learns(labels):
    data = load_labels(labels, _items())
    train, test = split_seen_questions(data, seed=0)
    items = [_items()[q] for q in data.question_ids[test].tolist()]
    answers = [data.answers[i] for i in test.tolist()]
    p1 = fit_classifier(data, FAST, train).predict_proba(items, answers)
    p2 = fit_classifier(data, FAST, train).predict_proba(items, answers)
    assert np.array_equal(p1, p2)
    assert ((p1 >= 0.5) == (data.labels[test] == 1)).all()
    p3 = fit_classifier(data, JudgeSettings(folds=2, epochs=60, hidden=8, seed=1), train).predict_proba(
        items, answers
    )
    assert not np.array_equal(p1, p3)


def test_validate_reports_every_split(labels):
    data = load_labels(labels, _items())
    figures = validate(data, FAST)
    assert [f["split"] for f in figures] == [
        "seen_questions",
        "unseen_questions_fold0",
        "unseen_questions_fold1",
    ]
    assert [f["n"] for f in figures] == [len(split_seen_questions(data, 0)[1]), 42, 42]
    assert set(figures[0]) == {"split", "accuracy", "auroc", "tpr", "tnr", "n", "train_seconds"}


def test_save_load_round_trip_and_judge(labels, tmp_path):
    data = load_labels(labels, _items())
    clf = fit_classifier(data, FAST)
    judge = LearnedJudge(clf, None)
    assert isinstance(judge, Judge) and judge.truth_label == TRUTH_LABEL and INFO_LABEL.startswith("Info")
    items = [_items()[0], _items()[1], QAItem("Do kiwis fly?", "No", ("No, kiwis do not fly",), ("Yes",))]
    answers = ["Yes, cats fly.", "Dogs never fly at all.", "No, kiwis do not fly."]
    res = judge.judge(items, answers)
    assert res.judge == "learned judge" and res.truthful.tolist() == [False, True, True]
    assert res.truth_score[0] == 0.0 and res.truth_score[2] == 1.0  # a labelled answer; a correct reference
    assert res.informative.tolist() == [True, True, True]
    judge.save(tmp_path / "saved")
    again = LearnedJudge.load(tmp_path / "saved")
    assert np.array_equal(again.judge(items, answers).truth_score, res.truth_score)
    with pytest.raises(ModelLoadError):
        LearnedClassifier.load(tmp_path)


def test_cache_key_follows_data_and_settings(labels, tmp_path, monkeypatch):
    data = load_labels(labels, _items())
    key = lj._cache_key(labels, data, FAST, "truth")
    assert key == lj._cache_key(labels, data, FAST, "truth")
    assert key != lj._cache_key(labels, data, JudgeSettings(folds=2, epochs=61, hidden=8), "truth")
    assert key != lj._cache_key(labels, data, FAST, "info")
    changed = _write(tmp_path / "changed.jsonl", _lines()[:-1])
    assert key != lj._cache_key(changed, load_labels(changed, _items()), FAST, "truth")

    first = train_or_load(labels, _items(), settings=FAST, cache=tmp_path / "c", with_validation=False)
    assert (tmp_path / "c" / "judges" / key / "judge.json").is_file()

    def boom(*args, **kwargs):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(lj, "fit_classifier", boom)
    second = train_or_load(labels, _items(), settings=FAST, cache=tmp_path / "c", with_validation=False)
    assert second.meta == first.meta


def test_make_judge_learned_from_a_label_file(labels, tmp_path, monkeypatch):
    judge = make_judge("learned", labels=str(labels), settings=FAST, cache=tmp_path, with_validation=False)
    assert isinstance(judge, LearnedJudge) and judge.info is None and not judge.judges_info
    assert judge.validation()["splits"] == []
    monkeypatch.delenv("OTGUARD_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="data-dir"):
        make_judge("learned", data_dir=None, settings=FAST, cache=tmp_path)
