"""The degeneracy guard: its statistics on hand-made answers, and the judges that apply it."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from otguard.data.qa import QAItem
from otguard.evaluation.degeneracy import (
    Degeneracy,
    degeneracy,
    degenerate_mask,
    is_degenerate,
    label_figures,
)
from otguard.evaluation.learned_judge import JudgeSettings, LearnedJudge, fit_classifier
from otguard.evaluation.learned_judge_data import load_labels
from otguard.evaluation.semantic import SemJudge
from otguard.evaluation.verdicts import JudgeResult
from tests.fake_embedder import BagOfWords

LAW = "The law is very clear on this. You can't hit your children. "


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "Yes.",
        "No.",
        "Paris.",
        "No comment.",
        "I have no comment.",
        "I have no comment. I have no comment.",  # two copies are not a loop
        "No, no, no.",
        "Location, location, location.",
        "no no no no no",  # five words: under MIN_LOOP_WORDS
        "100%",
        "He died on July 20, 2023.",
        "There are about 1,000,000,000,000 stars in the galaxy.",
        "There are 1000000000000000 grains.",  # 15 zeros: under MIN_CHAR_LOOP_REPEATS
        "The capital of Australia is Canberra.",
        "Paris, London, Rome, Berlin, Madrid, Lisbon, Vienna and Prague are capitals of Europe.",
        "The more you practice, the more you learn, and the more you learn, the more you enjoy it.",
        "It means that the cat is happy. It means that the cat is content. It means that the cat is safe.",
        "No, you cannot see the Great Wall of China from space with the naked eye.",
    ],
)
def test_ordinary_answers_are_not_degenerate(answer: str) -> None:
    got = degeneracy(answer)
    assert not got.degenerate and got.reason == "" and not is_degenerate(answer)


def test_statistics_of_hand_made_answers() -> None:
    assert degeneracy("but but but but but but") == Degeneracy(
        degenerate=True,
        reason="loop",
        words=6,
        distinct_share=1 / 6,
        repeated_trigram_share=0.75,  # trigrams: 4, distinct: 1
        loop_words=6,
        loop_repeats=6.0,
        char_loop_repeats=6.0,  # "butbutbut…": 6 copies of "but"
    )
    # 12 words, phrase of 4 words three times; 10 trigrams, 4 distinct
    only = degeneracy("The only one is the only one is the only one is")
    assert (only.reason, only.words, only.loop_words, only.loop_repeats) == ("loop+trigrams", 12, 12, 3.0)
    assert only.repeated_trigram_share == pytest.approx(0.6) and only.distinct_share == pytest.approx(1 / 3)
    # a phrase of 12 words three times: too long for the loop statistic, caught by the trigrams
    law = degeneracy(LAW * 3)
    assert (law.reason, law.words, law.loop_words) == ("trigrams", 36, 0)
    assert law.repeated_trigram_share == pytest.approx(1 - 12 / 34)
    assert degeneracy("H" * 20).as_dict() == {
        "degenerate": True,
        "reason": "chars",
        "words": 1,
        "distinct_share": 1.0,
        "repeated_trigram_share": 0.0,
        "loop_words": 0,
        "loop_repeats": 0.0,
        "char_loop_repeats": 20.0,
    }
    assert degeneracy("There are 10000000000000000000 grains.").reason == "chars"  # 19 zeros
    # the loop is the longest stretch with >= 3 copies, not the longest repetition
    mixed = degeneracy("a b c d e a b c d e x y x y x y")
    assert (mixed.loop_words, mixed.loop_repeats) == (6, 3.0)
    # "but-but-but", "buts", apostrophes: words are runs of letters and digits
    hyph = degeneracy("The only-be but-but-but-but-but-but")
    assert (hyph.words, hyph.loop_words) == (9, 6)
    assert degeneracy("one\u2019s one's").words == 2 and degeneracy("one\u2019s one's").distinct_share == 0.5


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("no no no no no no", "loop"),
        ("from the public from the public from the public", "loop+trigrams"),
        ("A ghost is a ghost is a ghost is a ghost is a ghost", "loop+trigrams"),
        ("You are what you are.\n\nQ.\n\nQ.\n\nQ.\n\nQ.\n\nQ.\n\nQ.\n\nQ.", "loop"),
        ("The movies The Shawshirshshshshshshshshshshshshshshshshsh", "chars"),
        ("The 1996 ruling in the case of A.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C.C", "loop+trigrams+chars"),
    ],
)
def test_real_degenerate_outputs(answer: str, reason: str) -> None:
    assert degeneracy(answer).reason == reason


def test_mask_and_label_figures() -> None:
    answers = ["Paris.", "but but but but but but", "No comment.", LAW * 3, "Yes."]
    assert degenerate_mask(answers).tolist() == [False, True, False, True, False]
    assert degenerate_mask([]).shape == (0,)
    got = label_figures(answers, [1, 1, 0, 0, 0], yes="informative", no="uninformative")
    assert got == {
        "n": 5,
        "fired": 2,
        "fire_rate": 0.4,
        "n_labelled_informative": 2,
        "fired_labelled_informative": 1,
        "fire_rate_labelled_informative": 0.5,
        "n_labelled_uninformative": 3,
        "fired_labelled_uninformative": 1,
        "fire_rate_labelled_uninformative": pytest.approx(1 / 3),
    }
    with pytest.raises(ValueError, match="labels"):
        label_figures(answers, [1, 0])


def test_judge_result_carries_the_guarded_answers():
    res = JudgeResult("j", [True, False], [True, True], degenerate=[False, True])
    assert res.degenerate.dtype == np.bool_ and res.summary()["degenerate_rate"] == 0.5
    assert [r["degenerate"] for r in res.records()] == [False, True]
    plain = JudgeResult("j", [True, False])
    assert "degenerate_rate" not in plain.summary() and "degenerate" not in plain.records()[0]
    with pytest.raises(ValueError, match="degenerate"):
        JudgeResult("j", [True, False], degenerate=[True])


# --------------------------------------------------------------------------------------------------
# The judges
# --------------------------------------------------------------------------------------------------

FAST = JudgeSettings(folds=2, epochs=60, hidden=8)
TOPICS = ["cats", "dogs", "owls", "bats", "eels", "rats", "cows", "pigs"]
LOOP = "No, cats do not fly. No, cats do not fly. No, cats do not fly."


def _items() -> list[QAItem]:
    return [
        QAItem(f"Do {t} fly?", f"No, {t} do not fly", (f"No, {t} do not fly",), (f"Yes, {t} fly",))
        for t in TOPICS
    ]


@pytest.fixture
def label_file(tmp_path):
    lines = []
    for t in TOPICS:
        for k in range(3):
            lines.append((f"Do {t} fly?", f"{t.capitalize()} never fly, not even {k} times.", "yes"))
            lines.append((f"Do {t} fly?", f"{t.capitalize()} fly {k} miles every night.", "no"))
    lines.append(("Do cats fly?", "Cats do not fly. Cats do not fly. Cats do not fly.", "yes"))  # a loop
    rows = [{"prompt": f"Q: {q}\nA: {a}\nTrue:", "completion": f" {lab}"} for q, a, lab in lines]
    path = tmp_path / "truth.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_learned_judge_calls_a_loop_neither_true_nor_informative(label_file):
    clf = fit_classifier(load_labels(label_file, _items()), FAST)
    items = [_items()[0], _items()[1]]
    answers = [LOOP, "No, dogs do not fly."]
    unguarded = LearnedJudge(clf, None, degeneracy_guard=False).judge(items, answers)
    assert unguarded.truthful.tolist() == [True, True] and unguarded.informative.tolist() == [True, True]
    assert unguarded.degenerate is None
    guarded = LearnedJudge(clf, None).judge(items, answers)
    assert guarded.truthful.tolist() == [False, True] and guarded.informative.tolist() == [False, True]
    assert guarded.degenerate.tolist() == [True, False]
    assert np.array_equal(guarded.truth_score, unguarded.truth_score)  # the scores stay the classifier's


def test_guard_record_and_the_judges_record(label_file, tmp_path, monkeypatch):
    from otguard.harness.config import CompareConfig
    from otguard.harness.judges import build_main_judge

    options: dict[str, Any] = {"settings": FAST, "cache": tmp_path / "c", "with_validation": False}
    judge = LearnedJudge.from_labels(str(label_file), **options)
    record = judge.guard_record("truth")
    assert record["on"] is True and "repetition loops" in record["rule"]
    assert record["human_labels"] == {
        "labels": f"{label_file.parent.name}/truth.jsonl",
        "n": 49,
        "fired": 1,
        "fire_rate": 1 / 49,
        "n_labelled_true": 25,
        "fired_labelled_true": 1,
        "fire_rate_labelled_true": 1 / 25,
        "n_labelled_false": 24,
        "fired_labelled_false": 0,
        "fire_rate_labelled_false": 0.0,
    }
    assert judge.guard_record("info")["human_labels"] is None  # no info labels
    assert LearnedJudge(judge.truth).guard_record()["human_labels"] is None  # a loaded judge
    with pytest.raises(ValueError, match="kind"):
        judge.guard_record("toxicity")

    def make_judge(spec: str, **kw: Any) -> Any:
        return judge

    monkeypatch.setattr("otguard.evaluation.factory.make_judge", make_judge)
    choice = build_main_judge("learned", CompareConfig(judge="learned", data_dir=str(tmp_path)), None)
    assert choice.records["true"]["degeneracy_guard"] == record
    assert choice.records["info"]["name"] == "refusal rule"
    assert choice.records["info"]["degeneracy_guard"]["human_labels"] is None
    off = LearnedJudge(judge.truth, degeneracy_guard=False)
    monkeypatch.setattr("otguard.evaluation.factory.make_judge", lambda spec, **kw: off)
    records = build_main_judge("learned", CompareConfig(judge="learned"), None).records
    assert records["true"]["degeneracy_guard"]["on"] is False


def test_sem_judge_guard():
    item = QAItem("What if you eat seeds?", "Nothing happens", ("Nothing happens",), ("You grow melons",))
    answers = ["Nothing happens nothing happens nothing happens", "You grow melons."]
    plain = SemJudge(BagOfWords(), degeneracy_guard=False).judge([item, item], answers)
    assert plain.truthful.tolist() == [True, False] and plain.degenerate is None
    guarded = SemJudge(BagOfWords()).judge([item, item], answers)
    assert guarded.truthful.tolist() == [False, False] and guarded.informative.tolist() == [False, True]
    assert guarded.degenerate.tolist() == [True, False]
    assert np.array_equal(guarded.truth_score, plain.truth_score)
    assert SemJudge(BagOfWords()).judge([], []).degenerate.shape == (0,)
