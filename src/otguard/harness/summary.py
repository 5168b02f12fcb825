"""From the saved (fold, method) results to a method's summaries in ``results.json``.

Per metric: the per-fold values, their mean (or, for True×Info, the product of the fold means of True
and Info; for "edited heads per flagged position", the ratio of the counts summed over folds) and
std; the paired metrics computed from a method's per-item values and ``none``'s of the same fold
(repair and harm rates); and the paired bootstrap difference to ``none`` (``delta_vs_none``) of every
metric with per-item values (:mod:`otguard.harness.paired`). A few repaired and harmed examples are
picked here too. The fold loop (:mod:`otguard.harness.run`) and tests call these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from otguard.harness.paired import (
    DEFAULT_RESAMPLES,
    Statistic,
    align,
    mean_statistic,
    paired_bootstrap,
    product_statistic,
    rate_statistic,
    repair_harm,
)
from otguard.results import MethodResult, MetricSummary

if TYPE_CHECKING:
    from otguard.harness.resume import PartialResult
    from otguard.harness.task import Task

__all__ = ["BASELINE", "FLAGGED", "HEADS", "N_EXAMPLES", "method_result", "pick_examples"]

#: The unsteered model: evaluated in every fold, the reference of the paired comparisons.
BASELINE = "none"
#: Examples of each kind (repaired, harmed) per method in results.json and the report.
N_EXAMPLES = 3
#: Fold facts of the CE/KL pass: edited heads and flagged positions (counts), so that "edited heads
#: per flagged position" over folds is a ratio of sums, not a mean of per-fold ratios.
HEADS, FLAGGED = "edited_heads_total", "flagged_positions"


def method_result(
    task: Task,
    name: str,
    parts: Sequence[PartialResult],
    bases: Sequence[PartialResult],
    *,
    bootstrap: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> MethodResult:
    """One method's summaries over the folds: per-fold values, the paired metrics (repair/harm)
    from its items and ``none``'s, products of fold means, and the bootstrap ``delta_vs_none``."""
    values: dict[str, list[float]] = {}
    for part in parts:
        for key, value in part.metrics.items():
            values.setdefault(key, []).append(value)
    repairs = task.repair_metrics() if name != BASELINE else {}
    for mid, (item_set, key, kind) in repairs.items():
        fold_values = []
        for part, base in zip(parts, bases, strict=True):
            if item_set not in part.items or item_set not in base.items:
                break
            mine, ref = align(part.items[item_set], base.items[item_set])
            if key not in mine.values or key not in ref.values:
                break
            repair, harm = repair_harm(ref.values[key], mine.values[key])
            fold_values.append(repair if kind == "repair" else harm)
        else:
            values[mid] = fold_values
    summaries = {k: MetricSummary.of(v) for k, v in values.items()}
    for mid, (_, first, second) in task.product_metrics().items():
        if mid in summaries and first in summaries and second in summaries:
            ma, mb = summaries[first].mean, summaries[second].mean
            mean = ma * mb if ma is not None and mb is not None else float("nan")
            summaries[mid] = MetricSummary.of(values[mid], mean=mean)
    records = [part.record for part in parts]
    if "edited_heads" in summaries and all(HEADS in r.meta and FLAGGED in r.meta for r in records):
        flagged = sum(r.meta[FLAGGED] for r in records)
        mean = sum(r.meta[HEADS] for r in records) / flagged if flagged else 0.0
        summaries["edited_heads"] = MetricSummary.of(values["edited_heads"], mean=mean)
    if name != BASELINE and bootstrap > 0:
        _deltas(task, summaries, parts, bases, repairs, bootstrap, seed)
    return MethodResult(summaries, records)


def _deltas(
    task: Task,
    summaries: dict[str, MetricSummary],
    parts: Sequence[PartialResult],
    bases: Sequence[PartialResult],
    repairs: dict[str, tuple[str, str, str]],
    resamples: int,
    seed: int,
) -> None:
    """Attach the paired bootstrap difference to ``none`` to every summary that has per-item values."""
    plans: dict[str, tuple[str, Statistic]] = {}
    for item_set in parts[0].items:
        for key in parts[0].items[item_set].values:
            plans[key] = (item_set, mean_statistic(key))
    for mid, (item_set, a, b) in task.product_metrics().items():
        plans[mid] = (item_set, product_statistic(a, b))
    for mid, (item_set, key, kind) in repairs.items():
        plans[mid] = (item_set, rate_statistic(key, kind))
    for mid, (item_set, statistic) in plans.items():
        if mid not in summaries:
            continue
        try:
            method_items = [p.items[item_set] for p in parts]
            base_items = [b.items[item_set] for b in bases]
        except KeyError:
            continue
        summaries[mid].delta_vs_none = paired_bootstrap(
            method_items, base_items, statistic, resamples=resamples, seed=seed
        )


def pick_examples(
    task: Task, parts: Sequence[PartialResult], bases: Sequence[PartialResult], *, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """A seeded pick of :data:`N_EXAMPLES` repaired and harmed items (the task finds them)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for part, base in zip(parts, bases, strict=True):
        for kind, rows in task.examples(base.rows, part.rows).items():
            found.setdefault(kind, []).extend({"fold": part.fold, **r} for r in rows)
    rng = np.random.default_rng(seed)
    out = {}
    for kind, rows in found.items():
        pick = sorted(rng.choice(len(rows), size=min(N_EXAMPLES, len(rows)), replace=False).tolist())
        out[kind] = [rows[k] for k in pick]
    return out
