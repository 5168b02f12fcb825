"""Write a report: the plots, ``report.md`` and ``report.html``, from a run's results."""

from __future__ import annotations

import os
from pathlib import Path

from otguard.io import atomic_write_text
from otguard.report.document import (
    DETECTOR_PNG,
    FLAGS_PNG,
    FRONTIER_PNG,
    REPAIR_PNG,
    TRADEOFF_PNG,
    report_blocks,
)
from otguard.report.explain import HowToRead, cells_item, task_view
from otguard.report.plots import (
    plot_detector,
    plot_flag_rates,
    plot_frontier,
    plot_repair_harm,
    plot_tradeoff,
    tradeoff_metrics,
)
from otguard.report.render import render_html, render_markdown
from otguard.report.tables import ResultsLike, as_results
from otguard.results import RunResults, resolve_path

__all__ = ["write_report"]


def write_report(
    results: str | os.PathLike[str] | ResultsLike,
    out_dir: str | os.PathLike[str],
    *,
    how_to_read: HowToRead | None = None,
    source_name: str | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and the PNGs into ``out_dir``; returns (markdown, html) paths.

    ``results`` is a ``results.json`` path (or the run folder holding one) or the results themselves.
    ``how_to_read`` replaces the "How to read this" items the report keeps for the results' task: the
    items, or a function of the results giving them (``otguard.harness.registry.how_to_read``).
    ``source_name`` is the results file named under "Run" (default: the path's name, or ``results.json``).

    A plot whose data is absent is skipped (its stale PNG from an earlier run is removed) and the report
    says so. Every file is written atomically, so a report being regenerated is never seen half-written.
    """
    if isinstance(results, str | os.PathLike):
        path = resolve_path(results)
        res = RunResults.from_json(path)
        name = source_name or path.name
    else:
        res = as_results(results)
        name = source_name or "results.json"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    view = task_view(res)
    x, y = view.tradeoff
    plots: dict[str, Path | None] = {
        DETECTOR_PNG: plot_detector(res, out / DETECTOR_PNG),
        TRADEOFF_PNG: plot_tradeoff(res, out / TRADEOFF_PNG, x, y),
        FLAGS_PNG: plot_flag_rates(res, out / FLAGS_PNG),
        REPAIR_PNG: plot_repair_harm(res, out / REPAIR_PNG),
        FRONTIER_PNG: plot_frontier(res, out / FRONTIER_PNG),
    }
    for png, made in plots.items():
        if made is None:
            (out / png).unlink(missing_ok=True)
    if how_to_read is None:
        items = [cells_item()]
    else:
        items = list(how_to_read(res) if callable(how_to_read) else how_to_read)
    blocks = report_blocks(res, name, plots, view, tradeoff_metrics(res, x, y), items)
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, render_markdown(blocks))
    atomic_write_text(html_path, render_html(blocks, out))
    return md_path, html_path
