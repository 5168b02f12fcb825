"""Per-question comparisons with the unsteered model: repair and harm, and paired bootstrap intervals.

Every test question is answered by the unsteered model (method ``none``) and by each policy of the
same fold, so the two answers form a pair. This module works on those pairs:

- :func:`repair_harm`: of the questions the unsteered model got wrong, the share the policy gets
  right (*repair*), and of those it got right, the share the policy gets wrong (*harm*);
- :func:`paired_bootstrap`: the 95 % interval of a method's difference to ``none`` on any metric
  that is a function of per-question values (a mean, a product of means, a repair rate...).
  Questions are resampled with replacement *within their fold* (each fold keeps its size and every
  question stays paired with its own fold's ``none`` answer), so the point estimate is exactly the
  difference of the table's values: means over folds of per-fold values, or the product of the fold
  means for True×Info.

Per-question values travel as :class:`ItemValues` (one per fold, method and item set, e.g. the test
questions or one transfer set), saved with each (fold, method) result so a resumed run has them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from otguard.results import Delta

__all__ = [
    "DEFAULT_RESAMPLES",
    "ItemValues",
    "Statistic",
    "align",
    "mean_statistic",
    "paired_bootstrap",
    "product_statistic",
    "rate_statistic",
    "repair_harm",
]

#: Bootstrap resamples of ``compare`` (the issue asks for at least 1,000).
DEFAULT_RESAMPLES = 2000
_CI = (2.5, 97.5)


@dataclass
class ItemValues:
    """Per-item values of one (fold, method) on one item set: ``ids`` name the items (the question
    text), ``values`` maps a metric id to one number per item (its mean over items is the metric)."""

    ids: list[str]
    values: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, vals in self.values.items():
            if len(vals) != len(self.ids):
                raise ValueError(f"ItemValues: {len(self.ids)} items but {len(vals)} values of {key!r}.")

    def to_dict(self) -> dict[str, Any]:
        # JSON has no NaN: stored as null, read back as NaN.
        return {"ids": list(self.ids),
                "values": {k: [None if not np.isfinite(v) else float(v) for v in vals]
                           for k, vals in self.values.items()}}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ItemValues:
        return cls(
            ids=[str(i) for i in data["ids"]],
            values={
                str(k): [float("nan") if v is None else float(v) for v in vals]
                for k, vals in data["values"].items()
            },  # fmt: skip
        )


def align(method: ItemValues, base: ItemValues) -> tuple[ItemValues, ItemValues]:
    """The two item sets restricted to their common items, in ``base``'s order (normally they are the
    same questions in the same order: the fold's test questions)."""
    if method.ids == base.ids:
        return method, base
    where = {i: k for k, i in enumerate(method.ids)}
    keep = [k for k, i in enumerate(base.ids) if i in where]
    pick = [where[base.ids[k]] for k in keep]

    def sub(v: ItemValues, index: list[int]) -> ItemValues:
        return ItemValues(
            [v.ids[k] for k in index], {m: [vals[k] for k in index] for m, vals in v.values.items()}
        )

    return sub(method, pick), sub(base, keep)


def repair_harm(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """(repair rate, harm rate) of per-question 0/1 correctness ``before`` (unsteered) and ``after``.

    Repair: share of the questions wrong before that are right after; harm: share of the questions
    right before that are wrong after. A value >= 0.5 counts as right. NaN when a side has no question.
    """
    b = np.asarray(before, dtype=np.float64) >= 0.5
    a = np.asarray(after, dtype=np.float64) >= 0.5
    if b.shape != a.shape:
        raise ValueError(f"before and after must have one value per question; got {b.shape} and {a.shape}.")
    wrong, right = ~b, b
    repair = float((wrong & a).sum() / wrong.sum()) if wrong.any() else float("nan")
    harm = float((right & ~a).sum() / right.sum()) if right.any() else float("nan")
    return repair, harm


# A statistic maps the resampled per-fold values of the method and of ``none`` (per fold: metric id
# -> (R, n_fold) array) to R numbers: the method's difference to ``none`` on one metric.
Sample = list[dict[str, np.ndarray]]
Statistic = Callable[[Sample, Sample], np.ndarray]


def _fold_avg(per_fold: list[np.ndarray]) -> np.ndarray:
    """Mean over folds of per-fold values (R each), ignoring folds whose value is NaN."""
    stacked = np.stack(per_fold)
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(stacked)
        total = np.where(finite, stacked, 0.0).sum(0)
        count = finite.sum(0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the finite values (NaN where there is none), as the metrics skip
    items without a value (e.g. dist-n of a prompt whose samples have no words)."""
    finite = np.isfinite(values)
    total = np.where(finite, values, 0.0).sum(-1)
    count = finite.sum(-1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _mean_over_folds(sample: Sample, key: str) -> np.ndarray:
    return _fold_avg([_nanmean(f[key]) for f in sample])


def mean_statistic(key: str) -> Statistic:
    """Difference of a mean metric: (mean over folds of the per-fold mean) method minus ``none``."""

    def stat(method: Sample, base: Sample) -> np.ndarray:
        return _mean_over_folds(method, key) - _mean_over_folds(base, key)

    return stat


def product_statistic(a: str, b: str) -> Statistic:
    """Difference of a product metric: the product of the fold means of ``a`` and ``b`` (True×Info)."""

    def stat(method: Sample, base: Sample) -> np.ndarray:
        return (_mean_over_folds(method, a) * _mean_over_folds(method, b)
                - _mean_over_folds(base, a) * _mean_over_folds(base, b))  # fmt: skip

    return stat


def rate_statistic(key: str, kind: str) -> Statistic:
    """Repair (``kind="repair"``) or harm rate of ``key``'s 0/1 values, mean over folds. ``none``'s own
    rate is 0 by definition, so the rate is its difference to ``none``."""
    if kind not in ("repair", "harm"):
        raise ValueError(f"kind must be 'repair' or 'harm'; got {kind!r}.")

    def stat(method: Sample, base: Sample) -> np.ndarray:
        rates = []
        for m, b in zip(method, base, strict=True):
            before, after = b[key] >= 0.5, m[key] >= 0.5
            pool = ~before if kind == "repair" else before
            moved = pool & (after if kind == "repair" else ~after)
            with np.errstate(invalid="ignore", divide="ignore"):
                rates.append(moved.sum(-1) / pool.sum(-1))
        return _fold_avg(rates)

    return stat


def paired_bootstrap(
    method: Sequence[ItemValues],
    base: Sequence[ItemValues],
    statistic: Statistic,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Delta:
    """The point estimate and 95 % percentile interval of ``statistic`` (method minus ``none``).

    ``method[f]`` and ``base[f]`` are fold ``f``'s per-item values of the method and of ``none``
    (aligned by :func:`align`). Items are resampled with replacement within each fold, the same
    indices for both sides (paired), ``resamples`` times with a generator seeded by ``seed``.
    Resamples whose statistic is undefined (e.g. no wrong answer to repair) are left out.
    """
    if len(method) != len(base):
        raise ValueError(f"{len(method)} folds of the method but {len(base)} of none.")
    pairs = [align(m, b) for m, b in zip(method, base, strict=True)]
    pairs = [(m, b) for m, b in pairs if m.ids]
    n = sum(len(m.ids) for m, _ in pairs)
    if not pairs:
        return Delta(None, (None, None), 0, 0)

    def sample(values: list[ItemValues], index: list[np.ndarray]) -> Sample:
        return [{k: np.asarray(v, dtype=np.float64)[idx] for k, v in iv.values.items()}
                for iv, idx in zip(values, index, strict=True)]  # fmt: skip

    ms, bs = [m for m, _ in pairs], [b for _, b in pairs]
    full = [np.arange(len(m.ids))[None, :] for m in ms]
    try:
        point = float(statistic(sample(ms, full), sample(bs, full))[0])
    except KeyError:
        return Delta(None, (None, None), n, 0)
    if resamples < 1:
        return Delta(point if np.isfinite(point) else None, (None, None), n, 0)
    rng = np.random.default_rng(seed)
    index = [rng.integers(0, len(m.ids), size=(resamples, len(m.ids))) for m in ms]
    draws = np.asarray(statistic(sample(ms, index), sample(bs, index)), dtype=np.float64)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0 or not np.isfinite(point):
        return Delta(point if np.isfinite(point) else None, (None, None), n, resamples)
    lo, hi = np.percentile(draws, _CI)
    return Delta(point, (float(lo), float(hi)), n, resamples)
