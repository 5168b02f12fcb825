"""The report's content as a list of blocks (headings, paragraphs, lists, tables, images).

The content is built once and rendered twice (:mod:`otguard.report.render`: Markdown and HTML), so both
files always say the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from otguard.report.explain import Items, TaskView
from otguard.report.tables import GROUP_TITLES, MISSING, Cell, metric, metrics, table
from otguard.results import RunResults

__all__ = ["DETECTOR_PNG", "FLAGS_PNG", "TRADEOFF_PNG", "Block", "report_blocks"]

DETECTOR_PNG = "detector.png"
TRADEOFF_PNG = "tradeoff.png"
FLAGS_PNG = "flags.png"

_ALT = {
    DETECTOR_PNG: "Detector FPR and FNR per layer",
    FLAGS_PNG: "Flag rate and edited heads per method",
}


@dataclass(frozen=True)
class Block:
    kind: str  # h1 h2 h3 p ul table img
    text: str = ""  # img: the PNG's file name
    alt: str = ""  # img: the alternative text
    items: tuple[tuple[str, str], ...] = ()  # ul: (bold lead, rest)
    header: tuple[str, ...] = ()
    rows: tuple[tuple[Cell, ...], ...] = ()


def format_seconds(seconds: float | None) -> str:
    """A run time people read at a glance: "12.3 s", "20 min 34 s", "2 h 05 min"."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(round(s % 60)):02d} s"
    return f"{int(s // 3600)} h {int(round(s % 3600 / 60)):02d} min"


def _config_items(results: RunResults, source_name: str) -> Items:
    cfg = results.config
    dataset = str(cfg.get("dataset", "unknown"))
    if cfg.get("limit") is not None:
        dataset += f" (first {cfg['limit']} questions only)"
    items = [
        ("Model:", str(cfg.get("model", "unknown"))),
        ("Data set:", dataset),
        ("Methods:", ", ".join(results.method_ids) or "none"),
        ("Folds:", str(cfg.get("folds", "unknown"))),
        ("Judge:", str(cfg.get("judge", "unknown"))),
    ]
    if "seed" in cfg:
        items.append(("Seed:", str(cfg["seed"])))
    if results.started:
        items.append(("Started:", results.started))
    items.append(("Runtime:", format_seconds(results.seconds)))
    if results.versions:
        items.append(("Versions:", ", ".join(f"{k} {v}" for k, v in results.versions.items())))
    items.append(("Results file:", source_name))
    return items


def _table_blocks(results: RunResults) -> list[Block]:
    groups = list(GROUP_TITLES)
    groups += [g for g in dict.fromkeys(m.group for m in metrics(results)) if g not in groups]
    blocks: list[Block] = []
    for group in groups:
        header, rows = table(results, group)
        if header:
            blocks.append(Block("h3", GROUP_TITLES.get(group, group)))
            blocks.append(Block("table", header=tuple(header), rows=tuple(tuple(r) for r in rows)))
    if not blocks:
        return [Block("p", "No metric values in the results file.")]
    legend = (
        "Each cell is the mean ± standard deviation across the folds; bold marks the best mean of a "
        f'column; {MISSING} means the method does not have that metric. More under "How to read this".'
    )
    return [Block("p", legend), *blocks]


def _plot_blocks(
    results: RunResults, plots: Mapping[str, Path | None], view: TaskView, tradeoff: tuple[str, str] | None
) -> list[Block]:
    blocks = [Block("h2", "Plots"), Block("h3", "Detector error per layer")]
    if plots.get(DETECTOR_PNG) is not None:
        blocks.append(Block("img", DETECTOR_PNG, alt=_ALT[DETECTOR_PNG]))
        blocks.append(
            Block(
                "p",
                "Validation false-positive and false-negative rates of the gated methods' "
                "detectors at every layer, one line per method and fold; the star marks the "
                "layer the method chose.",
            )
        )
    else:
        blocks.append(Block("p", "Skipped: no gated method (RADIANT, SLIM) has per-layer detector data."))
    blocks.append(Block("h3", view.tradeoff_title))
    if plots.get(TRADEOFF_PNG) is not None and tradeoff is not None:
        mx, my = metric(results, tradeoff[0]), metric(results, tradeoff[1])
        assert mx is not None and my is not None
        blocks.append(Block("img", TRADEOFF_PNG, alt=f"{my.label} versus {mx.label} per method"))
        blocks.append(
            Block(
                "p",
                f"{my.label} against {mx.label} per method (error bars: std across folds). "
                f"{view.tradeoff_better}",
            )
        )
    else:
        blocks.append(Block("p", f"Skipped: {view.tradeoff_missing}"))
    blocks.append(Block("h3", "Flag rate and edited heads"))
    if plots.get(FLAGS_PNG) is not None:
        blocks.append(Block("img", FLAGS_PNG, alt=_ALT[FLAGS_PNG]))
        blocks.append(Block("p", "Methods without the metric have no bar."))
    else:
        blocks.append(Block("p", "Skipped: no method reports a flag rate or a number of edited heads."))
    return blocks


def report_blocks(
    results: RunResults,
    source_name: str,
    plots: Mapping[str, Path | None],
    view: TaskView,
    tradeoff: tuple[str, str] | None,
    how_to_read: Items,
) -> list[Block]:
    """The whole report: run facts, one table per metric group, the plots and how to read them."""
    cfg = results.config
    return [
        Block("h1", f"otguard comparison: {cfg.get('model', 'unknown model')} on {cfg.get('dataset', '?')}"),
        Block("h2", "Run"),
        Block("ul", items=tuple(_config_items(results, source_name))),
        Block("h2", "Results"),
        *_table_blocks(results),
        *_plot_blocks(results, plots, view, tradeoff),
        Block("h2", "How to read this"),
        Block("ul", items=tuple(how_to_read)),
    ]
