"""The selection rule and the sweep options, on hand-made inputs (harness/sweep.py)."""

from __future__ import annotations

import math

import pytest

from otguard.errors import ConfigError
from otguard.harness.sweep import (
    expand_grid,
    parse_grid_option,
    parse_param_option,
    select_point,
    split_variant,
    validation_documents,
)

NAN = math.nan


def test_the_best_validation_score_within_the_budget_wins() -> None:
    rows = [{"mc2": 0.30, "kl": 0.01}, {"mc2": 0.50, "kl": 0.30}, {"mc2": 0.40, "kl": 0.05}]
    assert select_point(rows, "mc2", 0.1) == (2, True)  # 0.50 is over the budget
    assert select_point(rows, "mc2", None) == (1, True)  # no budget: the best score
    assert select_point(rows, "mc2", 0.30) == (1, True)  # the budget is inclusive


def test_ties_go_to_the_lower_kl_then_to_the_earlier_point() -> None:
    rows = [{"mc2": 0.4, "kl": 0.05}, {"mc2": 0.4, "kl": 0.02}, {"mc2": 0.4, "kl": 0.02}]
    assert select_point(rows, "mc2", 0.1) == (1, True)


def test_nothing_within_the_budget_gives_the_gentlest_point_marked_outside() -> None:
    rows = [{"mc2": 0.5, "kl": 0.9}, {"mc2": 0.3, "kl": 0.4}, {"mc2": 0.6, "kl": 2.0}]
    assert select_point(rows, "mc2", 0.1) == (1, False)


def test_unmeasured_values_are_skipped_and_no_kl_means_no_budget() -> None:
    rows = [{"mc2": NAN, "kl": 0.01}, {"mc2": 0.2, "kl": None}, {"mc2": 0.1, "kl": 0.02}]
    assert select_point(rows, "mc2", 0.1) == (2, True)  # point 1 has no KL: not known to be within
    assert select_point([{"true": 0.1}, {"true": 0.3}], "true", 0.1) == (1, True)
    with pytest.raises(ValueError):
        select_point([], "mc2", 0.1)


def test_grid_options_are_the_product_of_their_axes() -> None:
    assert expand_grid({"a": [1, 2], "b": ["x"]}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert expand_grid({}) == [{}]
    name, points = parse_grid_option("iti:head_share=0.02,0.05:strength=2,5")
    assert name == "iti" and points == [
        {"head_share": 0.02, "strength": 2},
        {"head_share": 0.02, "strength": 5},
        {"head_share": 0.05, "strength": 2},
        {"head_share": 0.05, "strength": 5},
    ]
    assert parse_param_option("radiant:threshold_rule=radiant") == ("radiant", "threshold_rule", "radiant")
    assert parse_param_option("slim:kappa=none") == ("slim", "kappa", None)
    for bad in ("iti", "iti:", "iti:strength", "iti:strength="):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid_option(bad)
    with pytest.raises(ConfigError, match="--param"):
        parse_param_option("radiant:margin")
    assert split_variant("iti@paper") == ("iti", "paper") and split_variant("slim") == ("slim", None)


def test_validation_documents_are_seeded_and_disjoint_from_the_test_documents() -> None:
    docs = [f"document {i}" for i in range(30)]
    test = docs[::3]
    val = validation_documents(docs, test, 8, seed=0)
    assert len(val) == 8 and not set(val) & set(test)
    assert val == validation_documents(docs, test, 8, seed=0)
    assert validation_documents(docs, docs, 8, seed=0) == [] and validation_documents(docs, test, 0, 0) == []
