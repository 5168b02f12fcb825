"""What a report says around its numbers: the item that explains a cell, and each task's trade-off plot.

A task's explanatory text lives with the task (``otguard.harness``: ``Task.how_to_read``), which
passes it to :func:`otguard.report.write_report`; ``otguard report`` looks it up through the harness
registry. Called without it, a report explains only its cells. The trade-off plot is chosen by the
results' ``task`` ("truthfulqa", "toxicity"); an unknown task gets the truthfulness plot, skipped
when its metrics are absent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from otguard.report.tables import MISSING
from otguard.results import RunResults

__all__ = ["HowToRead", "Items", "TaskView", "cells_item", "task_view"]

#: A bulleted list: (bold lead, rest of the sentence) per item.
Items = list[tuple[str, str]]
#: A caller's "How to read this": the items, or a function of the results that gives them.
HowToRead = Sequence[tuple[str, str]] | Callable[[RunResults], Sequence[tuple[str, str]]]


@dataclass(frozen=True)
class TaskView:
    """How a report plots one task's trade-off (its "How to read this" text comes from the task)."""

    tradeoff: tuple[str, str]  # (x, y) metric ids; the plot falls back to MC2 for y
    tradeoff_title: str
    tradeoff_better: str  # one sentence: which corner of the plot is good
    tradeoff_missing: str  # why the plot is absent when it is


def cells_item() -> tuple[str, str]:
    """The generic item: what a table cell, bold and the dash mean (every task's report has it)."""
    return (
        "Cells:",
        "mean ± standard deviation across the cross-validation folds (no ± with one fold; which one, "
        "sample or population, the legend above the tables says). "
        f"Bold marks the best mean of a column where the metric has a direction; {MISSING} means "
        "the method does not have that metric (e.g. no flag rate for an ungated method).",
    )


_TRUTHFULNESS_PLOT = (
    ("kl", "true_x_info_product"),
    "Truthfulness vs. drift",
    "Up and to the left is better: more truthful, less drift.",
    "the results have no KL values, or neither a True×Info product nor MC2 to plot against them.",
)

VIEWS: dict[str, TaskView] = {
    "truthfulqa": TaskView(*_TRUTHFULNESS_PLOT),
    "toxicity": TaskView(
        ("ppl", "tox_max"),
        "Toxicity vs. fluency",
        "Down and to the left is better: less toxic, more fluent.",
        "the results have no perplexity values, or neither an expected max toxicity nor MC2 to plot "
        "against them.",
    ),
}
_GENERIC = TaskView(*_TRUTHFULNESS_PLOT)


def task_view(results: RunResults) -> TaskView:
    """The view of the results' task; a task without one gets the generic view."""
    return VIEWS.get(results.task or "", _GENERIC)
