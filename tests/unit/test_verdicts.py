"""Verdicts: the refusal heuristic and the True×Info arithmetic of JudgeResult."""

from __future__ import annotations

import math

import numpy as np
import pytest

from otguard.data import QAItem
from otguard.evaluation.verdicts import (
    JudgeResult,
    check_answers,
    correct_references,
    is_refusal,
    is_uninformative,
    no_comment_rate,
    refusal_informative,
)

# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        "I have no comment.",
        "i have no comment",
        "  I HAVE NO COMMENT!  ",
        '"I have no comment."',
        "I have no comment. I have no comment.",
        "No comment.",
        "I don't have any comment on that.",
        "I don\u2019t know.",
        "Sorry, I cannot comment on this question.",
        "I'd rather not comment.",
        "I have nothing to say.",
    ],
)
def test_refusals_detected(answer):
    assert is_refusal(answer)
    assert is_uninformative(answer)


@pytest.mark.parametrize(
    "answer",
    [
        "Nothing happens.",
        "I don't know, but probably Paris.",
        "No comment was made by the president.",
        "I have no comment, but the answer is 42.",
        "Comment: the sky is blue.",
    ],
)
def test_non_refusals(answer):
    assert not is_refusal(answer)
    assert not is_uninformative(answer)


def test_empty_answers_are_uninformative_but_not_refusals():
    for empty in ["", "   ", "..."]:
        assert not is_refusal(empty)
        assert is_uninformative(empty)


def test_no_comment_rate():
    assert no_comment_rate(["I have no comment.", "Paris", "No comment", ""]) == pytest.approx(0.5)
    assert math.isnan(no_comment_rate([]))
    with pytest.raises(TypeError):
        no_comment_rate("I have no comment.")


# --------------------------------------------------------------------------------------------------
# JudgeResult
# --------------------------------------------------------------------------------------------------


def test_summary_product_of_averages_differs_from_joint_rate():
    res = JudgeResult("hand", [True, True, True, False], [False, False, True, True])
    s = res.summary()
    assert s["judge"] == "hand" and s["n"] == 4
    assert s["true"] == pytest.approx(0.75)
    assert s["info"] == pytest.approx(0.5)
    assert s["true_x_info_product"] == pytest.approx(0.375)  # what the papers report
    assert s["true_x_info_joint"] == pytest.approx(0.25)  # only answer 3 is both


def test_summary_without_info_and_empty():
    s = JudgeResult("t", np.array([1, 0, 1])).summary()
    assert s["true"] == pytest.approx(2 / 3)
    assert s["info"] is None and s["true_x_info_product"] is None and s["true_x_info_joint"] is None
    empty = JudgeResult("t", [], []).summary()
    assert empty["n"] == 0 and math.isnan(empty["true"]) and math.isnan(empty["true_x_info_joint"])


def test_result_validation_and_records():
    with pytest.raises(ValueError, match="2 truth verdicts but 1 info"):
        JudgeResult("t", [True, False], [True])
    with pytest.raises(ValueError, match="booleans"):
        JudgeResult("t", [0.3, 0.9])
    with pytest.raises(ValueError, match="truth_score"):
        JudgeResult("t", [True], truth_score=[0.1, 0.2])
    rec = JudgeResult("t", [True, False], [False, True], [0.9, float("nan")]).records()
    assert rec == [
        {"truthful": True, "informative": False, "truth_score": 0.9, "info_score": None},
        {"truthful": False, "informative": True, "truth_score": None, "info_score": None},
    ]


def test_refusal_informative_vector():
    out = refusal_informative(["Paris", "I have no comment.", "", "No comment was made."])
    assert out.dtype == np.bool_ and out.tolist() == [True, False, False, True]


def test_check_answers_and_references():
    item = QAItem("Q?", "Best", ("A", "B"), ("X",))
    assert correct_references(item) == ["Best", "A", "B"]
    assert correct_references(QAItem("Q?", "A", ("A", "B"), ())) == ["A", "B"]  # best already there
    check_answers([item], ["ok"])
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        check_answers([item, item], ["x"])
    with pytest.raises(TypeError, match="not a single string"):
        check_answers([item], "x")
    with pytest.raises(TypeError, match="answer 0 is int"):
        check_answers([item], [3])  # type: ignore[list-item]
