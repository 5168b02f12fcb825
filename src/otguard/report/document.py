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
from otguard.report.frontier import FRONTIER_PANELS, pareto_table, selection_text, sweep_metric, sweep_table
from otguard.report.tables import (
    GROUP_TITLES,
    MISSING,
    Cell,
    delta_table,
    method_label,
    metric,
    metrics,
    std_note,
    table,
)
from otguard.results import RunResults

__all__ = [
    "DETECTOR_PNG",
    "FLAGS_PNG",
    "FRONTIER_PNG",
    "REPAIR_PNG",
    "TRADEOFF_PNG",
    "Block",
    "report_blocks",
]

DETECTOR_PNG = "detector.png"
FRONTIER_PNG = "frontier.png"
TRADEOFF_PNG = "tradeoff.png"
FLAGS_PNG = "flags.png"
REPAIR_PNG = "repair.png"

_ALT = {
    DETECTOR_PNG: "Detector FPR and FNR per layer",
    FLAGS_PNG: "Flag rate and edited heads per method",
    REPAIR_PNG: "Repaired and harmed shares per method",
}
_CHANGE = {"repaired": "false → true", "harmed": "true → false"}
_EXAMPLE_CHARS = 300  # an answer longer than this is cut in the report (results.json keeps it whole)


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
        ("Methods:", ", ".join(map(method_label, results.method_ids)) or "none"),
        ("Folds:", str(cfg.get("folds", "unknown"))),
        ("Judge:", str(cfg.get("judge", "unknown"))),
    ]
    if "seed" in cfg:
        items.append(("Seed:", str(cfg["seed"])))
    if results.started:
        items.append(("Started:", results.started))
    selection = selection_text(results)
    if selection:
        items.append(("Selection:", selection))
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
        # A method with none of a group's metrics (no gate for an ungated method) gets no row here.
        rows = [row for row in rows if any(c.text != MISSING for c in row[1:])]
        if header:
            blocks.append(Block("h3", GROUP_TITLES.get(group, group)))
            blocks.append(Block("table", header=tuple(header), rows=tuple(tuple(r) for r in rows)))
            d_header, d_rows = delta_table(results, group)
            if d_header:
                blocks.append(Block("p", "Difference to none, with its 95 % paired bootstrap interval:"))
                blocks.append(Block("table", header=tuple(d_header), rows=tuple(tuple(r) for r in d_rows)))
    if not blocks:
        return [Block("p", "No metric values in the results file.")]
    legend = (
        f"Each cell is the mean ± {std_note(results)}; bold marks the best mean of a column; {MISSING} "
        "means the method does not have that metric. Difference tables: method minus none, in points "
        "(pp) for percentages, [95 % interval of a paired bootstrap over test questions]; * and bold: the "
        'interval excludes 0. More under "How to read this".'
    )
    return [Block("p", legend), *blocks]


def _number(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.3f}" if math.isfinite(value) else "–"


_SHOWN = (("accuracy", "accuracy"), ("auroc", "AUROC"), ("tpr", "TPR"), ("tnr", "TNR"),
          ("mean_score_neutral", "mean score neutral"), ("mean_score_hate", "mean score hate"),
          ("n", "n"))  # fmt: skip


def _split_text(split: Mapping[str, object]) -> str:
    shown = ", ".join(
        f"{label} {_number(split[k]) if k != 'n' else split[k]}" for k, label in _SHOWN if k in split
    )
    return f"{split.get('split', '?')}: {shown}"


def _validation_text(validation: object) -> str:
    """The figures of a judge's validation: per held-out split accuracy, AUROC, TPR, TNR and n (the
    learned judge's ``splits``), then the model and its cost; other layouts one key after the other."""
    if not isinstance(validation, Mapping):
        return ""
    splits = validation.get("splits")
    if isinstance(splits, list):
        parts = [_split_text(s) for s in splits if isinstance(s, Mapping)]
        facts = [f"{validation[k]}" for k in ("model",) if validation.get(k)]
        if validation.get("n_train") is not None:
            facts.append(f"{validation['n_train']} training labels")
        if validation.get("train_seconds") is not None:
            seconds = validation["train_seconds"]
            facts.append(f"trained in {seconds:.0f} s" if isinstance(seconds, int | float) else "")
        return "; ".join(p for p in parts + facts if p)
    parts = []
    for split, figures in validation.items():
        if isinstance(figures, Mapping):
            shown = ", ".join(
                f"{k} {_number(v)}" for k, v in figures.items() if isinstance(v, int | float | str)
            )
            parts.append(f"{split}: {shown}")
        elif isinstance(figures, int | float | str):
            parts.append(f"{split}: {_number(figures)}")
    return "; ".join(parts)


def _judge_blocks(results: RunResults) -> list[Block]:
    """Which judge is behind which column, and how it was validated against held-out human labels."""
    if not results.judges:
        return []
    rows = []
    for role, record in results.judges.items():
        validated = bool(record.get("validated"))
        text = _validation_text(record.get("validation")) if validated else str(record.get("note", ""))
        rows.append(
            (Cell(role), Cell(str(record.get("name", "?"))), Cell("yes" if validated else "no"), Cell(text))
        )
    return [
        Block("h3", "Judges"),
        Block(
            "p",
            "The judge behind each column and its held-out validation against human labels (accuracy, "
            "AUROC and per-class rates where it has them); unvalidated judges are marked 'no'.",
        ),
        Block("table", header=("Column", "Judge", "Validated", "Held-out figures / note"), rows=tuple(rows)),
    ]


def _short(text: object) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _EXAMPLE_CHARS else text[: _EXAMPLE_CHARS - 1] + "…"


def _example_blocks(results: RunResults) -> list[Block]:
    """A few repaired and harmed answers per method (question, unsteered answer, steered answer)."""
    blocks: list[Block] = []
    for method in results.method_ids:
        kinds = results.examples.get(method) or {}
        for kind in ("repaired", "harmed"):
            rows = [
                (
                    Cell(_short(e.get("question", ""))),
                    Cell(_short(e.get("before", ""))),
                    Cell(_short(e.get("after", ""))),
                )
                for e in kinds.get(kind) or []
            ]
            if rows:
                blocks.append(
                    Block(
                        "p",
                        f"{method_label(method)}, {kind} (judged {_CHANGE[kind]}):",
                    )
                )
                blocks.append(
                    Block(
                        "table",
                        header=("Question", "Unsteered answer", f"{method_label(method)} answer"),
                        rows=tuple(rows),
                    )
                )
    if not blocks:
        return []
    return [Block("h3", "Examples of repaired and harmed answers"), *blocks]


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _pct(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}"


def _gate_blocks(results: RunResults) -> list[Block]:
    """The gate where it is used next to the bank-level validation of the same detectors (fold means)."""
    rows = []
    for method in results.method_ids:
        entry = results.methods.get(method)
        gates = [f.meta["gate"] for f in entry.folds if isinstance(f.meta.get("gate"), dict)] if entry else []
        if not gates:
            continue
        bank = [g.get("bank") or {} for g in gates]

        def avg(key: str, source: list[dict[str, object]]) -> float | None:
            return _mean([float(x[key]) for x in source if isinstance(x.get(key), int | float)])  # type: ignore[arg-type]

        rows.append(
            (
                Cell(method_label(method)),
                Cell(_pct(avg("false_flag_rate", gates))),
                Cell(_pct(avg("false_flag_rate", bank))),
                Cell(_pct(avg("catch_rate", gates))),
                Cell(_pct(avg("catch_rate", bank))),
                Cell(_pct(avg("guarantee_share", gates))),
                Cell(_pct(avg("guarantee_rate_val_mean", bank))),
                Cell(_pct(avg("nominal_level", gates))),
            )
        )
    if not rows:
        return []
    header = ("Method", "False-flag rate, point of use (%)", "FPR, bank validation (%)",
              "Catch rate, point of use (%)", "1 − FNR, bank validation (%)", "Desirable after edit (%)",
              "Guarantee rate, bank validation (%)", "Nominal level (%)")  # fmt: skip
    return [
        Block("h3", "The gate: point of use vs. bank validation"),
        Block(
            "p",
            "Fold means. Point of use: reference answers teacher-forced in the generation prompt, every "
            "answer token; bank validation: the last token of the validation bank's Q/A texts, as the "
            "method chose its layer and threshold on.",
        ),
        Block("table", header=header, rows=tuple(rows)),
    ]


def _sweep_blocks(results: RunResults, plots: Mapping[str, Path | None]) -> list[Block]:
    """The swept methods: the frontier plot, the Pareto points and each method's grid (none without)."""
    swept = results.swept_methods
    if not swept:
        return []
    intro = (
        "Every swept method was fitted at each point of its grid; per fold, one rule chose one point on "
        "the fold's validation questions and documents only, and every grid point was also scored on the "
        "test split, which gives each method's trade-off curve."
    )
    rule = selection_text(results)
    blocks = [
        Block("h2", "Hyper-parameter sweeps"),
        Block("p", intro + (f" Selection rule: {rule}" if rule else "")),
    ]
    blocks.append(Block("h3", "Trade-off frontier"))
    toxicity = results.task == "toxicity"
    if plots.get(FRONTIER_PNG) is not None:
        what = "mean toxicity" if toxicity else "truthfulness"
        blocks.append(Block("img", FRONTIER_PNG, alt=f"Test {what} versus test KL for every grid point"))
        blocks.append(
            Block(
                "p",
                "One curve per swept method through its grid points (sorted by KL); a star marks a point "
                "chosen on validation in some fold, a hollow marker a point over the KL budget; none is "
                "the dashed line, the paper-default rows are crosses and other methods run at one setting "
                f"diamonds. {'Down' if toxicity else 'Up'} and to the left is better.",
            )
        )
    else:
        needed = "a test mean toxicity" if toxicity else "a test MC2 (or True)"
        blocks.append(Block("p", f"Skipped: no grid point has both {needed} and a test KL."))
    for y, x in FRONTIER_PANELS:
        header, rows = pareto_table(results, y, x)
        if not header:
            continue
        my, mx = sweep_metric(results, y), sweep_metric(results, x)
        blocks.append(Block("h3", f"Pareto points: test {my.label} vs. test {mx.label}"))
        blocks.append(
            Block(
                "p",
                f"The grid points of all swept methods that no other grid point beats on both test "
                f"{my.label} and test {mx.label}, by increasing {mx.label}. Reference rows (none, paper "
                "defaults) are not grid points and are not in the table.",
            )
        )
        blocks.append(Block("table", header=tuple(header), rows=tuple(tuple(r) for r in rows)))
    for method in swept:
        header, rows = sweep_table(results, method)
        blocks.append(Block("h3", f"Grid of {method_label(method)}"))
        blocks.append(
            Block(
                "p",
                "Means over the folds; bold parameters: chosen on validation in at least one fold; "
                "within KL budget: the validation KL kept the budget in every fold.",
            )
        )
        blocks.append(Block("table", header=tuple(header), rows=tuple(tuple(r) for r in rows)))
    return blocks


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
    if plots.get(REPAIR_PNG) is not None:
        blocks.append(Block("h3", "Repaired and harmed"))
        blocks.append(Block("img", REPAIR_PNG, alt=_ALT[REPAIR_PNG]))
        blocks.append(
            Block(
                "p",
                "Per method, the share of the unsteered model's false answers it repairs and of its true "
                "answers it breaks (error bars: 95 % paired bootstrap intervals). A policy helps only where "
                "the repair bar clearly exceeds the harm bar.",
            )
        )
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
        *_judge_blocks(results),
        *_gate_blocks(results),
        *_example_blocks(results),
        *_sweep_blocks(results, plots),
        *_plot_blocks(results, plots, view, tradeoff),
        Block("h2", "How to read this"),
        Block("ul", items=tuple(how_to_read)),
    ]
