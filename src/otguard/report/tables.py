"""The numbers of a report: which metrics to show, in which unit, how a cell reads and which is best.

Everything here reads the results through :class:`~otguard.results.RunResults`; Markdown and HTML
rendering of the tables live in :mod:`otguard.report.render`, so this module has no markup in it except
the ``**`` of :func:`results_table` (its documented plain-text form).

Formatting rules: a cell is ``mean ± std`` over the cross-validation folds (the std is left out when
there is one fold; :func:`std_note` says whether it is the sample or the population std); fractions
are shown as percentages with one decimal when the metric's unit is
``"%"`` (the default for the groups mc / generation / transfer / detector); the best mean of a column is
bold when the metric says which direction is better; a metric a method does not have is shown as "–".
:func:`delta_table` gives each method's difference to the unsteered model with its 95 % paired
bootstrap interval, a star marking the intervals that exclude 0; percentages differ in points (pp).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from otguard.results import Delta, MetricSummary, RunResults

__all__ = [
    "GROUP_TITLES",
    "MISSING",
    "Cell",
    "Metric",
    "Stat",
    "ResultsLike",
    "as_results",
    "base_method",
    "delta_table",
    "format_delta",
    "format_stat",
    "has",
    "metric",
    "method_label",
    "metrics",
    "results_table",
    "stat",
    "std_note",
    "table",
]

#: What the report functions accept: the typed results, or a decoded ``results.json`` (checked on the way in).
ResultsLike: TypeAlias = RunResults | Mapping[str, Any]

MISSING = "–"  # shown for a metric a method does not have (not applicable or not measured)

GROUP_TITLES: dict[str, str] = {
    "mc": "Multiple choice",
    "generation": "Generation (judged answers)",
    "transfer": "Transfer to other data",
    "toxicity": "Toxicity of sampled continuations",
    "fluency": "Fluency and diversity of the continuations",
    "repair": "Repaired and harmed answers (against the unsteered answer to the same question)",
    "side-effects": "Side effects on natural text",
    "gate": "The gate at the point of use (reference answers in the generation prompt)",
    "detector": "Detector and edits",
    "other": "Other metrics",
}
_PERCENT_GROUPS = frozenset({"mc", "generation", "transfer", "detector", "repair", "gate"})
#: The unsteered model: differences are taken to it and it has no row in a difference table.
BASELINE = "none"
# Metrics that are never fractions: their unit defaults by id, so a results file that leaves out
# "unit" does not show 48 edited heads as "4800.0 %".
_UNIT_BY_ID: dict[str, str] = {"ce": "nats", "kl": "nats", "edited_heads": ""}


#: Method names for the label of a variant row ("iti@paper" -> "ITI (paper defaults)").
METHOD_NAMES: dict[str, str] = {
    "iti": "ITI",
    "mean-shift": "Mean shift",
    "radiant": "RADIANT",
    "slim": "SLIM",
}
#: What a variant after "@" means, in the report's words.
VARIANT_NAMES: dict[str, str] = {"paper": "paper defaults"}


def method_label(method_id: str) -> str:
    """How the report names a method: its id, or for a variant id ``"base@variant"`` the method's name
    and the variant in brackets ("iti@paper" -> "ITI (paper defaults)"), so the extra row reads as the
    same method at other settings rather than as a method of its own."""
    base, sep, variant = method_id.partition("@")
    if not sep:
        return method_id
    return f"{METHOD_NAMES.get(base, base)} ({VARIANT_NAMES.get(variant, variant)})"


def base_method(method_id: str) -> str:
    """The method a variant id belongs to ("iti@paper" -> "iti"); an id without a variant itself."""
    return method_id.partition("@")[0]


def as_results(results: ResultsLike) -> RunResults:
    """The typed results; a plain dict is checked and parsed by :meth:`RunResults.from_dict`."""
    if isinstance(results, RunResults):
        return results
    return RunResults.from_dict(dict(results))


@dataclass(frozen=True)
class Metric:
    """A metric as the report shows it: the file's spec with the unit resolved."""

    id: str
    label: str
    higher_is_better: bool | None
    group: str
    unit: str

    @property
    def heading(self) -> str:
        """``"MC1 (%)"``; a label that already ends in brackets takes the unit inside them:
        ``"True (learned judge, %)"``."""
        if not self.unit:
            return self.label
        if self.label.endswith(")") and "(" in self.label:
            return f"{self.label[:-1]}, {self.unit})"
        return f"{self.label} ({self.unit})"


@dataclass(frozen=True)
class Stat:
    """A cell's numbers: mean and std over ``n`` folds (None where the file has no finite value)."""

    mean: float | None
    std: float | None
    n: int


@dataclass(frozen=True)
class Cell:
    text: str
    bold: bool = False


def metrics(results: RunResults) -> list[Metric]:
    """Declared metrics in file order, then undeclared ones found in summaries (group "other")."""
    out: list[Metric] = []
    for mid, spec in results.metrics.items():
        unit = spec.unit
        if unit is None:
            unit = _UNIT_BY_ID.get(mid, "%" if spec.group in _PERCENT_GROUPS else "")
        out.append(Metric(mid, spec.label, spec.higher_is_better, spec.group, unit))
    known = {m.id for m in out}
    for method in results.methods.values():
        for mid in method.metrics:
            if mid not in known:
                known.add(mid)
                out.append(Metric(mid, mid, None, "other", _UNIT_BY_ID.get(mid, "")))
    return out


def metric(results: RunResults, metric_id: str) -> Metric | None:
    return next((m for m in metrics(results) if m.id == metric_id), None)


def stat(results: RunResults, method: str, metric_id: str) -> Stat | None:
    """A method's summary of one metric, or None when the method does not have it."""
    summary: MetricSummary | None = results.summary(method, metric_id)
    if summary is None:
        return None
    return Stat(summary.mean, summary.std, results.n_folds(summary))


def has(results: RunResults, metric_id: str) -> bool:
    """Whether some method has a value (not None) for the metric."""
    return any(
        (s := stat(results, m, metric_id)) is not None and s.mean is not None for m in results.method_ids
    )


def _decimals(mean: float, std: float | None, unit: str) -> int | None:
    """Decimals shared by mean and std (None = scientific notation, for tiny non-zero values)."""
    if unit == "%":
        return 1
    if unit == "" and mean.is_integer() and (std is None or std.is_integer()):
        return 0  # counts, e.g. edited heads
    a = abs(mean)
    if a >= 100:
        return 1
    if a >= 1e-3 or a == 0:
        return 3
    return None


def format_stat(value: Stat, unit: str) -> str:
    """``mean ± std`` in the metric's unit; std left out for one fold (it would be a meaningless 0)."""
    if value.mean is None:
        return MISSING
    if not math.isfinite(value.mean):
        return str(value.mean)
    scale = 100.0 if unit == "%" else 1.0
    show_std = value.n > 1 and value.std is not None and math.isfinite(value.std)
    std = value.std if show_std else None
    d = _decimals(value.mean, std, unit)
    if d is None:
        text = f"{value.mean * scale:.2e}"
        return f"{text} ± {std * scale:.1e}" if std is not None else text
    text = f"{value.mean * scale:.{d}f}"
    return f"{text} ± {std * scale:.{d}f}" if std is not None else text


def table(results: RunResults, group: str | None = None) -> tuple[list[str], list[list[Cell]]]:
    """Header and cell rows for the metrics of ``group`` (all when None) that some method has."""
    columns = [m for m in metrics(results) if (group is None or m.group == group) and has(results, m.id)]
    methods = results.method_ids
    if not columns:
        return [], []
    header = ["Method"] + [m.heading for m in columns]
    rows: list[list[Cell]] = [[Cell(method_label(method))] for method in methods]
    for column in columns:
        stats = [stat(results, method, column.id) for method in methods]
        means = [s.mean for s in stats if s is not None and s.mean is not None and math.isfinite(s.mean)]
        best: float | None = None
        if column.higher_is_better is not None and means:
            best = max(means) if column.higher_is_better else min(means)
        for row, value in zip(rows, stats, strict=True):
            if value is None:
                row.append(Cell(MISSING))
                continue
            bold = (
                best is not None
                and value.mean is not None
                and math.isfinite(value.mean)
                and math.isclose(value.mean, best, rel_tol=1e-9, abs_tol=1e-12)
            )
            row.append(Cell(format_stat(value, column.unit), bold))
    return header, rows


def std_note(results: RunResults) -> str:
    """Which standard deviation the cells print (the file records it; old files hold the population one)."""
    if results.std_ddof == 1:
        return "sample standard deviation (ddof = 1) across the folds"
    return "population standard deviation (ddof = 0, half the range with two folds) across the folds"


def _signed(value: float, d: int | None) -> str:
    if d is None:
        return f"{value:+.2e}"
    return f"{value:+.{d}f}"


def format_delta(delta: Delta, unit: str) -> str:
    """``+3.2 [+1.0, +5.4]*`` (pp for percentages; the star: the interval excludes 0); "–" without value."""
    if delta.mean is None or not math.isfinite(delta.mean):
        return MISSING
    scale = 100.0 if unit == "%" else 1.0
    d = _decimals(delta.mean, None, unit if unit != "" else "x")
    text = _signed(delta.mean * scale, d)
    lo, hi = delta.ci95
    if lo is not None and hi is not None:
        text += f" [{_signed(lo * scale, d)}, {_signed(hi * scale, d)}]"
        if delta.excludes_zero:
            text += "*"
    return text


def delta_table(results: RunResults, group: str | None = None) -> tuple[list[str], list[list[Cell]]]:
    """Header and rows of each method's difference to ``none`` (metrics of ``group`` with a difference);
    empty when no method has one. Bold: intervals that exclude 0."""
    methods = [m for m in results.method_ids if m != BASELINE]
    columns = [
        m
        for m in metrics(results)
        if (group is None or m.group == group)
        and any(
            (s := results.summary(meth, m.id)) is not None and s.delta_vs_none is not None for meth in methods
        )
    ]
    if not columns:
        return [], []
    unit = {"%": "pp"}
    header = ["Method"] + [
        Metric(m.id, m.label, m.higher_is_better, m.group, unit.get(m.unit, m.unit)).heading for m in columns
    ]
    rows: list[list[Cell]] = []
    for method in methods:
        row = [Cell(method_label(method))]
        for column in columns:
            summary = results.summary(method, column.id)
            delta = summary.delta_vs_none if summary is not None else None
            if delta is None:
                row.append(Cell(MISSING))
            else:
                row.append(Cell(format_delta(delta, column.unit), delta.excludes_zero))
        rows.append(row)
    return header, rows


def results_table(results: ResultsLike, group: str | None = None) -> list[list[str]]:
    """Header row + one row per method (config order); best cells wrapped in ``**`` (markdown bold).

    ``group`` selects one metric group ("mc", "generation", "transfer", "side-effects", "detector");
    None gives every metric. Columns no method has are dropped; an empty list means nothing to show.
    """
    header, rows = table(as_results(results), group)
    if not header:
        return []
    return [header] + [[f"**{c.text}**" if c.bold else c.text for c in row] for row in rows]
