"""Hyper-parameter sweeps in a report: the grid points of every swept method, their Pareto front, and
the per-method sweep tables.

A table of methods at one setting each says little about which method is better at a given cost, since
each sits at its own point of the truthfulness / side-effect trade-off; the test metrics of *every* grid
point (:attr:`otguard.results.MethodResult.sweep`) give each method's whole curve. The Pareto front is
taken over the grid points of all swept methods together: a point is on it when no other point is at
least as good on both axes and better on one. Run rows that were not swept (``none``, ``iti@paper``)
are references in the plot, not points of the front: their test metrics may come from other questions
(``selection.frontier_questions``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from otguard.report.tables import MISSING, Cell, Metric, Stat, format_stat, method_label, metrics
from otguard.results import RunResults, SweepPoint

__all__ = [
    "FRONTIER_PANELS",
    "FrontierPoint",
    "frontier_panels",
    "frontier_points",
    "is_finite",
    "pareto_front",
    "pareto_table",
    "params_text",
    "selection_text",
    "sweep_metric",
    "sweep_table",
]

#: The frontier's panels as (y, x) metric ids: truthfulness (TruthfulQA) or mean toxicity (toxicity,
#: lower is better) against the side effect it costs; a run draws the panels its grid points have.
FRONTIER_PANELS: tuple[tuple[str, str], ...] = (("mc2", "kl"), ("true", "kl"), ("tox_mean", "kl"))
_UNITS = {"kl": "nats", "ce": "nats"}
#: Metrics only the sweeps have (no catalogue entry): their label and direction.
_SWEEP_ONLY = {
    "nontoxic": ("Non-toxicity (1 − mean toxicity)", True),
    "ppl": ("Perplexity of the continuations", False),
    "ppl_ratio": ("Perplexity ratio to none", False),
}


@dataclass(frozen=True)
class FrontierPoint:
    """One grid point of a swept method on a (y, x) panel: its test means and whether a fold chose it."""

    method: str
    params: dict[str, Any]
    x: float
    y: float
    selected_folds: tuple[int, ...] = ()
    within_budget: bool | None = None


def sweep_metric(results: RunResults, metric_id: str) -> Metric:
    """The catalogue's metric, or (for an id only the sweeps have) one named by its id."""
    found = next((m for m in metrics(results) if m.id == metric_id), None)
    label, higher = _SWEEP_ONLY.get(metric_id, (metric_id, None))
    return found or Metric(metric_id, label, higher, "other", _UNITS.get(metric_id, ""))


def is_finite(value: float | None) -> bool:
    """Whether a figure was measured: not None and not NaN/inf (the frontier's and the plots' test)."""
    return value is not None and math.isfinite(value)


def frontier_points(results: RunResults, y: str, x: str) -> list[FrontierPoint]:
    """Every swept method's grid points with finite test ``y`` and ``x`` (method order, then grid order)."""
    out = []
    for method in results.swept_methods:
        for point in results.methods[method].sweep or []:
            py, px = point.test.get(y), point.test.get(x)
            if is_finite(py) and is_finite(px):
                assert py is not None and px is not None
                out.append(
                    FrontierPoint(
                        method, point.params, px, py, tuple(point.selected_folds), point.within_budget
                    )
                )
    return out


def frontier_panels(results: RunResults) -> list[tuple[str, str]]:
    """The panels of :data:`FRONTIER_PANELS` that have at least one grid point."""
    return [(y, x) for y, x in FRONTIER_PANELS if frontier_points(results, y, x)]


def pareto_front(
    points: list[FrontierPoint], *, y_higher: bool = True, x_lower: bool = True
) -> list[FrontierPoint]:
    """The points no other point dominates (at least as good on both axes, better on one), by x.

    Equal points are all kept: neither dominates the other.
    """

    def key(p: FrontierPoint) -> tuple[float, float]:
        # Both axes as "larger is better".
        return (p.y if y_higher else -p.y, -p.x if x_lower else p.x)

    front = []
    for p in points:
        py, px = key(p)
        dominated = any(qy >= py and qx >= px and (qy > py or qx > px) for qy, qx in (key(q) for q in points))
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p.x if x_lower else -p.x, -p.y if y_higher else p.y))


def params_text(params: dict[str, Any]) -> str:
    """``head_share=0.02, strength=5``: a grid point's hyper-parameters in one cell."""
    if not params:
        return "(defaults)"

    def value(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(u) for u in v) + "]"
        return str(v)

    return ", ".join(f"{k}={value(v)}" for k, v in params.items())


def _cell(value: float | None, spec: Metric) -> Cell:
    return Cell(format_stat(Stat(value, None, 1), spec.unit) if is_finite(value) else MISSING)


def _folds_text(folds: tuple[int, ...] | list[int]) -> str:
    return ", ".join(str(k) for k in folds) if folds else MISSING


def _within_text(within: bool | None) -> str:
    return MISSING if within is None else ("yes" if within else "no")


def pareto_table(results: RunResults, y: str, x: str) -> tuple[list[str], list[list[Cell]]]:
    """Header and rows of the grid points on the Pareto front of test ``y`` against test ``x`` (empty
    without points). The catalogue's directions apply; without one, higher y and lower x are better."""
    points = frontier_points(results, y, x)
    if not points:
        return [], []
    my, mx = sweep_metric(results, y), sweep_metric(results, x)
    front = pareto_front(
        points,
        y_higher=my.higher_is_better is not False,
        x_lower=mx.higher_is_better is not True,
    )
    header = ["Method", "Params", f"Test {my.heading}", f"Test {mx.heading}", "Selected in folds"]
    rows = [
        [
            Cell(method_label(p.method)),
            Cell(params_text(p.params)),
            _cell(p.y, my),
            _cell(p.x, mx),
            Cell(_folds_text(p.selected_folds)),
        ]
        for p in front
    ]
    return header, rows


def _ordered_ids(results: RunResults, keys: list[str]) -> list[str]:
    """Metric ids in catalogue order, then the ones the catalogue lacks in the order found."""
    order = [m.id for m in metrics(results)]
    return [k for k in order if k in keys] + [k for k in keys if k not in order]


def sweep_table(results: RunResults, method: str) -> tuple[list[str], list[list[Cell]]]:
    """Header and rows of one method's grid: params, validation and test means, the folds that chose the
    point and whether it kept the budgets (KL; perplexity where the run has one; empty when the method has
    no sweep). Bold params: chosen."""
    entry = results.methods.get(method)
    sweep: list[SweepPoint] = (entry.sweep or []) if entry is not None else []
    if not sweep:
        return [], []
    val_ids = _ordered_ids(results, list(dict.fromkeys(k for p in sweep for k in p.validation)))
    test_ids = _ordered_ids(results, list(dict.fromkeys(k for p in sweep for k in p.test)))
    specs = {k: sweep_metric(results, k) for k in val_ids + test_ids}
    header = ["Params"]
    header += [f"Validation {specs[k].heading}" for k in val_ids]
    header += [f"Test {specs[k].heading}" for k in test_ids]
    header += ["Selected in folds", "Within budgets" if results.selection and results.selection.ppl_budget
               else "Within KL budget"]
    rows = []
    for point in sweep:
        row = [Cell(params_text(point.params), point.selected)]
        row += [_cell(point.validation.get(k), specs[k]) for k in val_ids]
        row += [_cell(point.test.get(k), specs[k]) for k in test_ids]
        row += [Cell(_folds_text(point.selected_folds)), Cell(_within_text(point.within_budget))]
        rows.append(row)
    return header, rows


def selection_text(results: RunResults) -> str:
    """The selection rule, its metric and budget in a sentence or three ("" when the run records none)."""
    sel = results.selection
    if sel is None:
        return ""
    rule = sel.rule.strip()
    if rule and not rule.endswith("."):
        rule += "."
    parts = [rule or "(rule not described)."]
    facts = [f"validation metric {sweep_metric(results, sel.metric).label}"]
    if sel.kl_budget is not None:
        budget = f"KL budget {sel.kl_budget:g} nats"
        facts.append(budget + (f" (KL on {sel.kl_on})" if sel.kl_on else ""))
    else:
        facts.append("no KL budget")
    if sel.ppl_budget is not None:
        facts.append(f"perplexity budget {sel.ppl_budget:g}× the unsteered model's on the validation "
                     "continuations")  # fmt: skip
    text = "; ".join(facts)
    parts.append(text[0].upper() + text[1:] + ".")
    if sel.frontier_questions is not None:
        items = "test prompts" if results.task == "toxicity" else "test questions"
        parts.append(f"Test metrics of the grid points: {sel.frontier_questions} {items}.")
    return " ".join(parts)
