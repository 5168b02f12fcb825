"""Toxicity metrics: expected max, probability, mean, summaries, distinct-n and the perplexity summary."""

from __future__ import annotations

import math

import numpy as np
import pytest

from otguard.evaluation.toxicity_metrics import (
    PPL_DROP_THRESHOLD,
    distinct_n,
    expected_max_toxicity,
    mean_perplexity,
    mean_toxicity,
    summarize_toxicity,
    toxicity_probability,
)
from otguard.evaluation.toxicity_scorers import ProfanityScorer

SCORES = [[0.1, 0.7, 0.2], [0.4, 0.5], [0.9]]  # ragged: prompts may have different counts


def test_expected_max_and_probability_hand_computed():
    assert expected_max_toxicity(SCORES) == pytest.approx((0.7 + 0.5 + 0.9) / 3)
    # strictly above 0.5: prompts 1 and 3 (0.5 is not > 0.5)
    assert toxicity_probability(SCORES) == pytest.approx(2 / 3)
    assert toxicity_probability(SCORES, threshold=0.8) == pytest.approx(1 / 3)
    assert mean_toxicity(SCORES) == pytest.approx((0.1 + 0.7 + 0.2 + 0.4 + 0.5 + 0.9) / 6)
    arr = np.array([[0.1, 0.6], [0.3, 0.2]])
    assert expected_max_toxicity(arr) == pytest.approx(0.45)
    assert toxicity_probability(arr) == pytest.approx(0.5)


def test_metrics_skip_nan_and_empty():
    scores = [[np.nan, 0.8], [np.nan], [], [0.2]]
    assert expected_max_toxicity(scores) == pytest.approx(0.5)  # prompts 2, 3 have no score
    assert toxicity_probability(scores) == pytest.approx(0.5)
    assert mean_toxicity(scores) == pytest.approx(0.5)
    assert math.isnan(expected_max_toxicity([]))
    assert math.isnan(toxicity_probability([[np.nan]]))


def test_summary_names_the_scorer():
    s = summarize_toxicity(ProfanityScorer(), SCORES)
    assert s.scorer == "profanity-check"
    assert s.measure == "offensive-language probability (alt-profanity-check)"
    d = s.as_dict()
    assert d["n_prompts"] == 3 and d["n_continuations"] == 6
    assert d["expected_max_toxicity"] == pytest.approx(0.7)
    s2 = summarize_toxicity("custom", SCORES, extra={"mean_INSULT": 0.1})
    assert s2.as_dict()["mean_INSULT"] == 0.1 and s2.scorer == "custom"


def test_distinct_n_hand_computed():
    conts = [["a b a", "a b"], ["x y z"]]
    # prompt 1: 5 words; unigrams {a, b} -> 2/5; bigrams {ab, ba} (ab twice) -> 2/5; trigrams {aba} -> 1/5
    # prompt 2: 3 words; 3/3, 2/3, 1/3
    assert distinct_n(conts, 1) == pytest.approx((2 / 5 + 1) / 2)
    assert distinct_n(conts, 2) == pytest.approx((2 / 5 + 2 / 3) / 2)
    assert distinct_n(conts, 3) == pytest.approx((1 / 5 + 1 / 3) / 2)
    # n-grams do not span continuations; word count is the denominator even for n > length
    assert distinct_n([["a", "b"]], 2) == 0.0
    # prompts without words are skipped; whitespace of any kind splits
    assert distinct_n([["", "  "], ["a\tb  a"]], 1) == pytest.approx(2 / 3)
    assert math.isnan(distinct_n([[""]], 1))
    with pytest.raises(ValueError):
        distinct_n(conts, 0)
    with pytest.raises(TypeError):
        distinct_n(["a b"], 1)


def test_mean_perplexity_drops_nan_and_huge_values():
    ppl = np.array([[10.0, np.nan], [30.0, PPL_DROP_THRESHOLD], [np.inf, 2e4]])
    mean, dropped = mean_perplexity(ppl)
    assert mean == pytest.approx(20.0) and dropped == 2  # 1e4 and 2e4; NaN and inf are not counted
    assert mean_perplexity(ppl, drop_at=25.0) == (10.0, 3)
    nan_mean, none = mean_perplexity(np.array([np.nan]))
    assert math.isnan(nan_mean) and none == 0
