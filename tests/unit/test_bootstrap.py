"""The paired bootstrap of a method's difference to none, against an explicit loop on hand-made data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from otguard.harness.paired import (
    ItemValues,
    align,
    mean_statistic,
    paired_bootstrap,
    product_statistic,
    rate_statistic,
)
from otguard.results import Delta

# Two folds of unequal size: the table's value is the mean over folds of the per-fold means.
NONE = [
    ItemValues(["a", "b", "c", "d"], {"true": [0, 1, 0, 1], "info": [1, 1, 1, 0]}),
    ItemValues(["e", "f", "g"], {"true": [0, 0, 1], "info": [1, 1, 1]}),
]
SLIM = [
    ItemValues(["a", "b", "c", "d"], {"true": [1, 1, 0, 1], "info": [1, 0, 1, 1]}),
    ItemValues(["e", "f", "g"], {"true": [1, 0, 1], "info": [1, 1, 0]}),
]


def _reference(method, base, stat, resamples, seed):
    """The same draws as the implementation (one generator, one (R, n) index block per fold, in fold
    order), the statistic computed resample by resample with plain Python."""
    rng = np.random.default_rng(seed)
    index = [rng.integers(0, len(m.ids), size=(resamples, len(m.ids))) for m in method]
    draws = []
    for r in range(resamples):
        ms = [
            {k: [v[i] for i in idx[r]] for k, v in m.values.items()}
            for m, idx in zip(method, index, strict=True)
        ]
        bs = [
            {k: [v[i] for i in idx[r]] for k, v in b.values.items()}
            for b, idx in zip(base, index, strict=True)
        ]
        value = stat(ms, bs)
        if math.isfinite(value):
            draws.append(value)
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def _mean(xs):
    return sum(xs) / len(xs)


def _fold_mean(sample, key):
    return _mean([_mean(f[key]) for f in sample])


def test_point_estimate_is_the_difference_of_the_tables_means() -> None:
    d = paired_bootstrap(SLIM, NONE, mean_statistic("true"), resamples=1000, seed=0)
    # slim: (3/4 + 2/3) / 2; none: (2/4 + 1/3) / 2
    assert d.mean == pytest.approx((0.75 + 2 / 3) / 2 - (0.5 + 1 / 3) / 2, abs=1e-15)
    assert d.n == 7 and d.resamples == 1000


def test_interval_equals_an_explicit_loop_with_the_same_draws() -> None:
    d = paired_bootstrap(SLIM, NONE, mean_statistic("true"), resamples=1000, seed=3)
    lo, hi = _reference(SLIM, NONE, lambda m, b: _fold_mean(m, "true") - _fold_mean(b, "true"), 1000, 3)
    assert d.ci95 == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    assert d.ci95[0] <= d.mean <= d.ci95[1]


def test_product_is_the_product_of_fold_means_with_its_interval() -> None:
    d = paired_bootstrap(SLIM, NONE, product_statistic("true", "info"), resamples=1000, seed=1)

    def product(sample):
        return _fold_mean(sample, "true") * _fold_mean(sample, "info")

    slim = ((0.75 + 2 / 3) / 2) * ((0.75 + 2 / 3) / 2)
    none = ((0.5 + 1 / 3) / 2) * ((0.75 + 1.0) / 2)
    assert d.mean == pytest.approx(slim - none, abs=1e-15)
    lo, hi = _reference(SLIM, NONE, lambda m, b: product(m) - product(b), 1000, 1)
    assert d.ci95 == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))


def test_repair_rate_interval_leaves_out_resamples_without_a_wrong_answer() -> None:
    d = paired_bootstrap(SLIM, NONE, rate_statistic("true", "repair"), resamples=1000, seed=2)
    # fold 0: wrong before a, c -> a repaired: 1/2; fold 1: wrong before e, f -> e repaired: 1/2
    assert d.mean == pytest.approx(0.5, abs=1e-15)

    def repair(m, b):
        rates = []
        for mf, bf in zip(m, b, strict=True):
            wrong = [i for i, v in enumerate(bf["true"]) if v < 0.5]
            if wrong:
                rates.append(sum(mf["true"][i] >= 0.5 for i in wrong) / len(wrong))
        return _mean(rates) if rates else float("nan")

    lo, hi = _reference(SLIM, NONE, repair, 1000, 2)
    assert d.ci95 == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))


def test_seeded_and_identical_answers_give_a_zero_interval() -> None:
    a = paired_bootstrap(SLIM, NONE, mean_statistic("true"), resamples=1000, seed=5)
    assert paired_bootstrap(SLIM, NONE, mean_statistic("true"), resamples=1000, seed=5) == a
    ten = [f"q{i}" for i in range(10)]
    scores = [ItemValues(ten, {"x": [0.13, 0.71, 0.42, 0.05, 0.9, 0.33, 0.27, 0.61, 0.88, 0.19]})]
    zeros = [ItemValues(ten, {"x": [0.0] * 10})]
    one, other = (
        paired_bootstrap(scores, zeros, mean_statistic("x"), resamples=1000, seed=s) for s in (5, 6)
    )
    assert one.mean == other.mean and one.ci95 != other.ci95  # the seed changes the draws only
    same = paired_bootstrap(NONE, NONE, mean_statistic("true"), resamples=1000, seed=5)
    assert same == Delta(0.0, (0.0, 0.0), 7, 1000) and not same.excludes_zero


def test_a_clear_effect_excludes_zero_and_chance_does_not() -> None:
    n = 40
    ids = [f"q{i}" for i in range(n)]
    wrong = [ItemValues(ids, {"true": [0.0] * n})]
    right = [ItemValues(ids, {"true": [1.0] * n})]
    d = paired_bootstrap(right, wrong, mean_statistic("true"), resamples=1000, seed=0)
    assert d == Delta(1.0, (1.0, 1.0), n, 1000) and d.excludes_zero
    flip = [ItemValues(ids, {"true": [float(i % 2) for i in range(n)]})]  # 20 repaired, 20 harmed
    back = [ItemValues(ids, {"true": [float(1 - i % 2) for i in range(n)]})]
    chance = paired_bootstrap(flip, back, mean_statistic("true"), resamples=1000, seed=0)
    assert chance.mean == 0.0 and chance.ci95[0] < 0 < chance.ci95[1] and not chance.excludes_zero


def test_pairs_are_matched_by_question_and_nothing_is_an_empty_delta() -> None:
    shuffled = ItemValues(["c", "a", "d", "b"], {"true": [0, 1, 1, 1]})
    m, b = align(shuffled, NONE[0])
    assert m.ids == b.ids == ["a", "b", "c", "d"] and m.values["true"] == [1, 1, 0, 1]
    d = paired_bootstrap([shuffled], [NONE[0]], mean_statistic("true"), resamples=0)
    assert d == Delta(0.25, (None, None), 4, 0)
    empty = paired_bootstrap([ItemValues([], {"true": []})], [ItemValues([], {"true": []})],
                             mean_statistic("true"))  # fmt: skip
    assert empty == Delta(None, (None, None), 0, 0)
    with pytest.raises(ValueError, match="2 folds of the method but 1 of none"):
        paired_bootstrap(SLIM, NONE[:1], mean_statistic("true"))


def test_item_values_round_trip_through_json_with_nan() -> None:
    iv = ItemValues(["a", "b"], {"dist1": [0.5, float("nan")]})
    data = iv.to_dict()
    assert data == {"ids": ["a", "b"], "values": {"dist1": [0.5, None]}}
    back = ItemValues.from_dict(data)
    assert back.ids == ["a", "b"] and back.values["dist1"][0] == 0.5 and math.isnan(back.values["dist1"][1])
    with pytest.raises(ValueError, match="2 items but 1 values of 'x'"):
        ItemValues(["a", "b"], {"x": [1.0]})
