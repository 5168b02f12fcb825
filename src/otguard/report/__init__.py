"""Tables and plots from the ``results.json`` of ``otguard compare``; never runs a model.

The compare job can take hours; this package only re-reads what it wrote (through the typed contract
:class:`otguard.results.RunResults`), so a report can be re-rendered or restyled in a second.
:func:`write_report` writes ``report.md`` (PNGs linked next to it) and a self-contained ``report.html``
(PNGs as base64 data URIs) from the same content blocks, so both always say the same thing.

Modules: :mod:`~otguard.report.tables` (metrics, units, cell text, best values),
:mod:`~otguard.report.plots` (the PNGs), :mod:`~otguard.report.frontier` (hyper-parameter sweeps:
Pareto points and grid tables), :mod:`~otguard.report.explain` (the per-task "How to read
this" text and trade-off plot), :mod:`~otguard.report.document` (the report's content as blocks),
:mod:`~otguard.report.render` (Markdown and HTML), :mod:`~otguard.report.build` (:func:`write_report`),
:mod:`~otguard.report.cli` (``otguard report`` / ``python -m otguard.report``).
"""

from otguard.report.build import write_report
from otguard.report.cli import add_arguments, main, run
from otguard.report.frontier import pareto_front, pareto_table, sweep_table
from otguard.report.plots import (
    plot_detector,
    plot_flag_rates,
    plot_frontier,
    plot_repair_harm,
    plot_tradeoff,
)
from otguard.report.render import markdown_table
from otguard.report.tables import results_table

__all__ = [
    "add_arguments",
    "main",
    "markdown_table",
    "pareto_front",
    "pareto_table",
    "plot_detector",
    "plot_flag_rates",
    "plot_frontier",
    "plot_repair_harm",
    "plot_tradeoff",
    "results_table",
    "run",
    "sweep_table",
    "write_report",
]
