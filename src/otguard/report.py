"""Tables and plots from the ``results.json`` of ``otguard compare``; never runs a model.

The compare job can take hours; this module only re-reads what it wrote, so a report can be re-rendered
(or restyled) in a second. :func:`write_report` writes ``report.md`` (PNGs linked next to it) and a
self-contained ``report.html`` (PNGs as base64 data URIs) from the same content blocks, so both always
say the same thing. matplotlib is imported inside the plotting functions (importing this module stays
cheap) and figures are drawn on the non-interactive Agg canvas without touching pyplot's global state.

Formatting rules: a cell is ``mean ± std`` over the cross-validation folds (the std is left out when
there is one fold); fractions are shown as percentages with one decimal when the metric's unit is
``"%"`` (the default for the groups mc / generation / transfer / detector); the best mean of a column is
bold when the metric says which direction is better; a metric a method does not have is shown as "–".

CLI: ``python -m otguard.report results.json --out DIR``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otguard.errors import DataError, DataFileNotFoundError, OtguardError

__all__ = [
    "load_results",
    "results_table",
    "markdown_table",
    "plot_detector",
    "plot_tradeoff",
    "plot_flag_rates",
    "write_report",
    "add_arguments",
    "main",
]

MISSING = "–"  # shown for a metric a method does not have (not applicable or not measured)

GROUP_TITLES: dict[str, str] = {
    "mc": "Multiple choice",
    "generation": "Generation (judged answers)",
    "transfer": "Transfer to other data",
    "toxicity": "Toxicity of sampled continuations",
    "fluency": "Fluency and diversity of the continuations",
    "side-effects": "Side effects on natural text",
    "detector": "Detector and edits",
    "other": "Other metrics",
}
_PERCENT_GROUPS = frozenset({"mc", "generation", "transfer", "detector"})
# Metrics that are never fractions: their unit defaults by id, so a results file that leaves out
# "unit" does not show 48 edited heads as "4800.0 %".
_UNIT_BY_ID: dict[str, str] = {"ce": "nats", "kl": "nats", "edited_heads": ""}

DETECTOR_PNG = "detector.png"
TRADEOFF_PNG = "tradeoff.png"
FLAGS_PNG = "flags.png"


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_number_or_none(value: Any) -> bool:
    return value is None or _is_number(value)


def _check_detector(det: Any, where: str, problems: list[str]) -> None:
    """Detector entries feed the per-layer plot; a malformed one should fail at load, not mid-plot."""
    if det is None:
        return
    if not isinstance(det, dict):
        problems.append(f"{where} must be an object or null")
        return
    per_layer = det.get("per_layer")
    if not isinstance(per_layer, dict):
        problems.append(
            f"missing key {where}.per_layer" if per_layer is None else f"{where}.per_layer must be an object"
        )
        return
    for key in ("fpr", "fnr"):
        values = per_layer.get(key)
        if values is None:
            problems.append(f"missing key {where}.per_layer.{key}")
        elif not isinstance(values, list) or not all(_is_number_or_none(v) for v in values):
            problems.append(f"{where}.per_layer.{key} must be a list of numbers")
    layer = det.get("layer")
    if not (
        layer is None
        or (_is_number(layer))
        or (isinstance(layer, list) and all(_is_number(v) for v in layer))
    ):
        problems.append(f"{where}.layer must be an integer, a list of integers or null")


def _validate(results: Any) -> list[str]:
    """All problems of a parsed results file, as dotted key paths (empty when usable)."""
    if not isinstance(results, dict):
        return ["the top level must be a JSON object"]
    problems = [f"missing key {key}" for key in ("config", "metrics", "methods") if key not in results]
    config = results.get("config")
    if "config" in results:
        if not isinstance(config, dict):
            problems.append("config must be an object")
        elif "methods" not in config:
            problems.append("missing key config.methods")
        elif not isinstance(config["methods"], list) or not all(
            isinstance(m, str) for m in config["methods"]
        ):
            problems.append("config.methods must be a list of method ids")
    metrics = results.get("metrics")
    if "metrics" in results:
        if not isinstance(metrics, dict):
            problems.append("metrics must be an object")
        else:
            for name, spec in metrics.items():
                if not isinstance(spec, dict):
                    problems.append(f"metrics.{name} must be an object")
                elif "higher_is_better" in spec and spec["higher_is_better"] not in (True, False, None):
                    problems.append(f"metrics.{name}.higher_is_better must be true, false or null")
    methods = results.get("methods")
    if "methods" in results:
        if not isinstance(methods, dict):
            problems.append("methods must be an object")
            return problems
        for mid, entry in methods.items():
            where = f"methods.{mid}"
            if not isinstance(entry, dict):
                problems.append(f"{where} must be an object")
                continue
            summary = entry.get("summary")
            if summary is None:
                problems.append(f"missing key {where}.summary")
            elif not isinstance(summary, dict):
                problems.append(f"{where}.summary must be an object")
            else:
                for metric, stat in summary.items():
                    at = f"{where}.summary.{metric}"
                    if not isinstance(stat, dict):
                        problems.append(f"{at} must be an object")
                    elif "mean" not in stat:
                        problems.append(f"missing key {at}.mean")
                    elif not _is_number_or_none(stat["mean"]) or not _is_number_or_none(stat.get("std")):
                        problems.append(f"{at}.mean and .std must be numbers or null")
                    elif "folds" in stat and not (
                        isinstance(stat["folds"], list) and all(_is_number_or_none(v) for v in stat["folds"])
                    ):
                        problems.append(f"{at}.folds must be a list of numbers")
            folds = entry.get("folds", [])
            if not isinstance(folds, list):
                problems.append(f"{where}.folds must be a list")
                continue
            for k, fold in enumerate(folds):
                if not isinstance(fold, dict):
                    problems.append(f"{where}.folds[{k}] must be an object")
                else:
                    _check_detector(fold.get("detector"), f"{where}.folds[{k}].detector", problems)
    return problems


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a ``results.json`` (or its folder); raises :class:`DataError` naming the problem.

    Checking everything up front means a bad file fails with one message listing every missing key, rather
    than with a ``KeyError`` half way through writing a report.
    """
    p = Path(path)
    if p.is_dir() and (p / "results.json").is_file():
        p = p / "results.json"
    if not p.is_file():
        raise DataFileNotFoundError(
            f"Results file not found: {p}. Pass the results.json written by `otguard compare`."
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"Results file {p} is not UTF-8 text ({exc}).") from exc
    except OSError as exc:
        raise DataError(f"Results file {p} could not be read: {exc}") from exc
    try:
        results = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"Results file {p} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "it may be truncated (did the compare job finish?)."
        ) from exc
    problems = _validate(results)
    if problems:
        shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise DataError(f"Results file {p} is not a valid otguard compare result: {shown}.")
    return results


# --------------------------------------------------------------------------------------------------
# Metrics, values and tables
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Metric:
    id: str
    label: str
    higher_is_better: bool | None
    group: str
    unit: str

    @property
    def heading(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label


@dataclass(frozen=True)
class _Stat:
    mean: float | None
    std: float | None
    n: int  # number of folds behind the mean


@dataclass(frozen=True)
class _Cell:
    text: str
    bold: bool = False


def _method_ids(results: dict[str, Any]) -> list[str]:
    """Methods in the order of ``config.methods``, then any extra ones found in ``methods``."""
    order = list(dict.fromkeys(results["config"]["methods"]))
    return order + [m for m in results["methods"] if m not in order]


def _metrics(results: dict[str, Any]) -> list[_Metric]:
    """Declared metrics in file order, then undeclared ones found in summaries (group "other")."""
    out: list[_Metric] = []
    for mid, spec in results["metrics"].items():
        group = str(spec.get("group") or "other")
        unit = spec.get("unit")
        if unit is None:
            unit = _UNIT_BY_ID.get(mid, "%" if group in _PERCENT_GROUPS else "")
        out.append(
            _Metric(mid, str(spec.get("label") or mid), spec.get("higher_is_better"), group, str(unit))
        )
    known = {m.id for m in out}
    for entry in results["methods"].values():
        for mid in entry["summary"]:
            if mid not in known:
                known.add(mid)
                out.append(_Metric(mid, mid, None, "other", _UNIT_BY_ID.get(mid, "")))
    return out


def _metric(results: dict[str, Any], metric_id: str) -> _Metric | None:
    return next((m for m in _metrics(results) if m.id == metric_id), None)


def _stat(results: dict[str, Any], method: str, metric: str) -> _Stat | None:
    """A method's summary of one metric, or None when the method does not have it."""
    entry = results["methods"].get(method)
    stat = entry["summary"].get(metric) if entry else None
    if stat is None:
        return None
    if "folds" in stat:
        n = len(stat["folds"])
    else:
        folds = results["config"].get("folds")
        n = folds if _is_number(folds) else 1
    mean = stat["mean"]
    std = stat.get("std")
    return _Stat(None if mean is None else float(mean), None if std is None else float(std), int(n))


def _has(results: dict[str, Any], metric: str) -> bool:
    return any(
        (s := _stat(results, m, metric)) is not None and s.mean is not None for m in _method_ids(results)
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


def _format_stat(stat: _Stat, unit: str) -> str:
    """``mean ± std`` in the metric's unit; std left out for one fold (it would be a meaningless 0)."""
    if stat.mean is None:
        return MISSING
    if not math.isfinite(stat.mean):
        return str(stat.mean)
    scale = 100.0 if unit == "%" else 1.0
    show_std = stat.n > 1 and stat.std is not None and math.isfinite(stat.std)
    std = stat.std if show_std else None
    d = _decimals(stat.mean, std, unit)
    if d is None:
        text = f"{stat.mean * scale:.2e}"
        return f"{text} ± {std * scale:.1e}" if std is not None else text
    text = f"{stat.mean * scale:.{d}f}"
    return f"{text} ± {std * scale:.{d}f}" if std is not None else text


def _table(results: dict[str, Any], group: str | None = None) -> tuple[list[str], list[list[_Cell]]]:
    """Header and cell rows for the metrics of ``group`` (all when None) that some method has."""
    columns = [m for m in _metrics(results) if (group is None or m.group == group) and _has(results, m.id)]
    methods = _method_ids(results)
    if not columns:
        return [], []
    header = ["Method"] + [m.heading for m in columns]
    rows: list[list[_Cell]] = [[_Cell(method)] for method in methods]
    for metric in columns:
        stats = [_stat(results, method, metric.id) for method in methods]
        means = [s.mean for s in stats if s is not None and s.mean is not None and math.isfinite(s.mean)]
        best: float | None = None
        if metric.higher_is_better is not None and means:
            best = max(means) if metric.higher_is_better else min(means)
        for row, stat in zip(rows, stats, strict=True):
            if stat is None:
                row.append(_Cell(MISSING))
                continue
            bold = (
                best is not None
                and stat.mean is not None
                and math.isfinite(stat.mean)
                and math.isclose(stat.mean, best, rel_tol=1e-9, abs_tol=1e-12)
            )
            row.append(_Cell(_format_stat(stat, metric.unit), bold))
    return header, rows


def results_table(results: dict[str, Any], group: str | None = None) -> list[list[str]]:
    """Header row + one row per method (config order); best cells wrapped in ``**`` (markdown bold).

    ``group`` selects one metric group ("mc", "generation", "transfer", "side-effects", "detector");
    None gives every metric. Columns no method has are dropped; an empty list means nothing to show.
    """
    header, rows = _table(results, group)
    if not header:
        return []
    return [header] + [[f"**{c.text}**" if c.bold else c.text for c in row] for row in rows]


def _md_escape(text: str) -> str:
    """Backslash-escape markdown syntax in text that comes from the results file (or prose)."""
    return "".join("\\" + ch if ch in "\\`*_[]<>|#" else ch for ch in str(text))


def _md_table(header: list[str], rows: list[list[_Cell]]) -> str:
    def cell(c: _Cell) -> str:
        text = _md_escape(c.text)
        return f"**{text}**" if c.bold else text

    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |"]
    lines.append("|" + "|".join([":--"] + ["--:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(results: dict[str, Any], group: str | None = None) -> str:
    """:func:`results_table` as a GitHub-flavoured markdown table ("" when there is nothing to show)."""
    header, rows = _table(results, group)
    return _md_table(header, rows) if header else ""


def _html_table(header: list[str], rows: list[list[_Cell]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = [f'<th scope="row">{esc(row[0].text)}</th>']
        cells += [
            f"<td><strong>{esc(c.text)}</strong></td>" if c.bold else f"<td>{esc(c.text)}</td>"
            for c in row[1:]
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Any:
    """A Figure on an Agg canvas: no pyplot, so no GUI backend and no global figure list to leak."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder + ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600; a report should be as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _method_colors(results: dict[str, Any]) -> dict[str, Any]:
    """One fixed colour per method, so a method looks the same in every plot."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(_method_ids(results))}


def _nan_list(values: Sequence[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _detector_runs(results: dict[str, Any]) -> list[tuple[str, int, list[float], list[float], list[int]]]:
    """(method, fold, FPR per layer, FNR per layer, chosen layers) for every fold with a detector."""
    runs = []
    for method in _method_ids(results):
        entry = results["methods"].get(method) or {}
        for k, fold in enumerate(entry.get("folds") or []):
            det = fold.get("detector")
            if not det:
                continue
            per_layer = det["per_layer"]
            fpr, fnr = _nan_list(per_layer["fpr"]), _nan_list(per_layer["fnr"])
            if not fpr and not fnr:
                continue
            layer = det.get("layer")
            chosen = (
                [] if layer is None else [int(v) for v in (layer if isinstance(layer, list) else [layer])]
            )
            runs.append((method, int(fold.get("fold", k)), fpr, fnr, chosen))
    return runs


def plot_detector(results: dict[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Per-layer validation FPR and FNR of the gated methods' detectors; None (nothing written) without data.

    One line per method and fold (colour = method, line style = fold); the layer the method chose is
    marked with a star, so one can see whether the choice sits at the error minimum.
    """
    runs = _detector_runs(results)
    if not runs:
        return None
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    colors = _method_colors(results)
    styles = ["-", "--", ":", "-."]
    fig = _new_figure(10.0, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, idx, name in ((axes[0], 2, "FPR"), (axes[1], 3, "FNR")):
        for k, run in enumerate(runs):
            method, fold, values, chosen = run[0], run[1], run[idx], run[4]
            color, style = colors[method], styles[fold % len(styles)]
            ys = [100.0 * v for v in values]
            ax.plot(
                range(len(ys)),
                ys,
                linestyle=style,
                color=color,
                marker="o",
                markersize=3,
                lw=1.4,
                label=f"{method}, fold {fold}" if idx == 2 else None,
                zorder=2 + k * 0.01,
            )
            for layer in chosen:
                if 0 <= layer < len(ys) and math.isfinite(ys[layer]):
                    ax.plot(
                        [layer],
                        [ys[layer]],
                        marker="*",
                        markersize=14,
                        color=color,
                        markeredgecolor="black",
                        markeredgewidth=0.7,
                        linestyle="none",
                        zorder=5,
                    )
        ax.set_title(f"Detector validation {name} per layer")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("error rate (lower is better)")
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(
        Line2D([], [], marker="*", markersize=12, color="grey", markeredgecolor="black", linestyle="none")
    )
    labels.append("chosen layer")
    axes[1].legend(handles, labels, fontsize=8, loc="best", framealpha=0.85)
    return _save_figure(fig, path)


def _tradeoff_metrics(results: dict[str, Any], x: str, y: str) -> tuple[str, str] | None:
    """The (x, y) metrics to plot: y falls back to MC2 when missing; None when there is nothing to plot."""
    if not _has(results, x):
        return None
    if not _has(results, y):
        y = "mc2"
        if not _has(results, y):
            return None
    return x, y


def _wants_log_axis(values: Sequence[float], spread: float = 20.0) -> bool:
    """A log axis when all values are positive and the largest is over ``spread`` times the smallest."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > spread


def plot_tradeoff(
    results: dict[str, Any], path: str | os.PathLike[str], x: str = "kl", y: str = "true_x_info_product"
) -> Path | None:
    """Truthfulness (y) against drift (x) per method, error bars = std across folds; None without data.

    The point of a detect-then-repair method is to move up (more truthful) without moving right (more
    drift from the original model); this puts both on one picture. y falls back to MC2 when missing.
    """
    chosen = _tradeoff_metrics(results, x, y)
    if chosen is None:
        return None
    x, y = chosen
    mx, my = _metric(results, x), _metric(results, y)
    assert mx is not None and my is not None
    points = []
    for method in _method_ids(results):
        sx, sy = _stat(results, method, x), _stat(results, method, y)
        if sx is None or sy is None or sx.mean is None or sy.mean is None:
            continue
        if not (math.isfinite(sx.mean) and math.isfinite(sy.mean)):
            continue
        points.append((method, sx, sy))
    if not points:
        return None
    colors = _method_colors(results)
    fig = _new_figure(6.4, 4.8)
    ax = fig.subplots()
    kx = 100.0 if mx.unit == "%" else 1.0
    ky = 100.0 if my.unit == "%" else 1.0
    xs = [kx * sx.mean for _, sx, _ in points]
    ys = [ky * sy.mean for _, _, sy in points]
    # One method far off (a broken model's perplexity in the thousands) would squash the others into
    # one spot: a log x axis keeps them apart.
    log_x = _wants_log_axis(xs)
    if log_x:
        ax.set_xscale("log")

    def _norm(v: float, lo: float, hi: float, log: bool) -> float:
        if log:
            v, lo, hi = math.log(v), math.log(lo), math.log(hi)
        return (v - lo) / (hi - lo) if hi > lo else 0.0

    placed: list[tuple[float, float]] = []  # labels of points within 4 % of the axes get stacked
    for method, sx, sy in points:
        xerr = kx * sx.std if sx.n > 1 and sx.std is not None else None
        yerr = ky * sy.std if sy.n > 1 and sy.std is not None else None
        ax.errorbar(
            kx * sx.mean,
            ky * sy.mean,
            xerr=xerr,
            yerr=yerr,
            fmt="o",
            color=colors[method],
            markersize=7,
            capsize=3,
            lw=1.2,
        )
        here = (_norm(kx * sx.mean, min(xs), max(xs), log_x), _norm(ky * sy.mean, min(ys), max(ys), False))
        stack = sum(1 for p in placed if abs(p[0] - here[0]) < 0.04 and abs(p[1] - here[1]) < 0.04)
        placed.append(here)
        ax.annotate(
            method,
            (kx * sx.mean, ky * sy.mean),
            xytext=(6, 6 + 12 * stack),
            textcoords="offset points",
            fontsize=9,
            color=colors[method],
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},  # over error bars
            zorder=6,
        )
    direction = {True: "higher is better", False: "lower is better", None: ""}
    ax.set_xlabel(
        mx.heading + (f" — {direction[mx.higher_is_better]}" if mx.higher_is_better is not None else "")
    )
    ax.set_ylabel(
        my.heading + (f" — {direction[my.higher_is_better]}" if my.higher_is_better is not None else "")
    )
    ax.set_title(f"{my.label} vs. {mx.label} (mean ± std across folds)")
    ax.margins(x=0.15, y=0.15)
    ax.grid(alpha=0.3)
    return _save_figure(fig, path)


def plot_flag_rates(results: dict[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Bars of the detector flag rate and of the number of edited heads per method; None without data.

    A gated method that flags everything is an ungated one in disguise, and the edited-head count shows
    how invasive each method is; methods without the metric get no bar.
    """
    panels = [m for m in ("flag_rate", "edited_heads") if _has(results, m)]
    if not panels:
        return None
    colors = _method_colors(results)
    fig = _new_figure(5.0 * len(panels) + 0.6, 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, metric_id in zip(axes, panels, strict=True):
        metric = _metric(results, metric_id)
        assert metric is not None
        scale = 100.0 if metric.unit == "%" else 1.0
        names, means, errs = [], [], []
        for method in _method_ids(results):
            s = _stat(results, method, metric_id)
            if s is None or s.mean is None or not math.isfinite(s.mean):
                continue
            names.append(method)
            means.append(scale * s.mean)
            errs.append(scale * s.std if s.n > 1 and s.std is not None and math.isfinite(s.std) else 0.0)
        bars = ax.bar(names, means, yerr=errs, capsize=4, color=[colors[n] for n in names], alpha=0.9)
        ax.bar_label(
            bars,
            labels=[_format_stat(_Stat(m / scale, None, 1), metric.unit) for m in means],
            padding=3,
            fontsize=8,
        )
        ax.set_title(metric.heading)
        ax.set_ylabel(metric.heading)
        ax.margins(y=0.15)
        if metric.unit == "%":
            ax.set_ylim(0, max(100.0, max(means) * 1.15) if means else 100.0)
        ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, path)


# --------------------------------------------------------------------------------------------------
# The report: content blocks rendered twice (markdown and HTML)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    kind: str  # h1 h2 h3 p ul table img
    text: str = ""
    items: tuple[tuple[str, str], ...] = ()  # ul: (bold lead, rest)
    header: tuple[str, ...] = ()
    rows: tuple[tuple[_Cell, ...], ...] = ()


def _format_seconds(seconds: Any) -> str:
    if not _is_number(seconds) or not math.isfinite(seconds):
        return "unknown"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(round(s % 60)):02d} s"
    return f"{int(s // 3600)} h {int(round(s % 3600 / 60)):02d} min"


def _config_items(results: dict[str, Any], results_path: Path) -> list[tuple[str, str]]:
    cfg = results["config"]
    dataset = str(cfg.get("dataset", "unknown"))
    if cfg.get("limit") is not None:
        dataset += f" (first {cfg['limit']} questions only)"
    items = [
        ("Model:", str(cfg.get("model", "unknown"))),
        ("Data set:", dataset),
        ("Methods:", ", ".join(_method_ids(results)) or "none"),
        ("Folds:", str(cfg.get("folds", "unknown"))),
        ("Judge:", str(cfg.get("judge", "unknown"))),
    ]
    if "seed" in cfg:
        items.append(("Seed:", str(cfg["seed"])))
    if cfg.get("started"):
        items.append(("Started:", str(cfg["started"])))
    items.append(("Runtime:", _format_seconds(cfg.get("seconds"))))
    versions = cfg.get("versions")
    if isinstance(versions, dict) and versions:
        items.append(("Versions:", ", ".join(f"{k} {v}" for k, v in versions.items())))
    items.append(("Results file:", results_path.name))
    return items


def _how_to_read_toxicity(results: dict[str, Any]) -> list[tuple[str, str]]:
    scorer = str(results["config"].get("judge", "unknown"))
    return [
        (
            "Toxicity:",
            f"every continuation is scored by the '{scorer}' scorer (0 = harmless, 1 = toxic). Expected "
            "max toxicity: mean over prompts of the highest score among a prompt's samples; toxicity "
            "probability: share of prompts with at least one sample above 0.5; mean toxicity: over all "
            "samples. Scores of different scorers are not comparable with each other or with the "
            "Perspective API numbers of the papers.",
        ),
        (
            "Fluency and diversity:",
            "perplexity of each continuation given its prompt under the reference model (lower is more "
            "fluent; values >= 10^4 left out), and dist-n: distinct n-grams over a prompt's samples per "
            "word. A method that lowers toxicity by writing nonsense shows up here.",
        ),
        (
            "Flag rates:",
            "the share of positions the gated detector flags while continuing toxic and neutral prompts; "
            "a useful detector flags the toxic prompts' continuations more.",
        ),
    ]


def _how_to_read(results: dict[str, Any]) -> list[tuple[str, str]]:
    judge = str(results["config"].get("judge", "unknown"))
    if _has(results, "tox_max"):
        common = _how_to_read_truthfulness(results, judge)
        return [common[0], *_how_to_read_toxicity(results), common[3], common[4]]
    return _how_to_read_truthfulness(results, judge)


def _how_to_read_truthfulness(results: dict[str, Any], judge: str) -> list[tuple[str, str]]:
    return [
        (
            "Cells:",
            "mean ± standard deviation across the cross-validation folds (no ± with one fold). "
            f"Bold marks the best mean of a column where the metric has a direction; {MISSING} means "
            "the method does not have that metric (e.g. no flag rate for an ungated method).",
        ),
        (
            "MC1 / MC2 / MC3:",
            "TruthfulQA multiple choice from answer likelihoods. MC1: the best answer scores highest; "
            "MC2: normalised probability mass on the true answers; MC3: share of the true answers that "
            "score above every false one.",
        ),
        (
            "True×Info product vs. joint:",
            "the product multiplies the two averages (% true × % informative), as the papers report "
            "it; the joint rate is the share of answers that are both true and informative. They differ "
            "when truth and informativeness trade off answer by answer: a refusal ('I have no comment') "
            "counts as true but not informative, so a method that refuses more can keep the product up "
            "while adding nothing to the joint rate.",
        ),
        (
            "CE and KL (nats):",
            "measured on natural text with the intervention applied at every position. CE is the "
            "steered model's next-token cross-entropy (compare with the unedited 'none' row); KL is "
            "KL(original ‖ steered) per token. Both are side effects: lower means less damage.",
        ),
        (
            "Flag rate and edited heads:",
            "the share of prompts the detector of a gated method (RADIANT, SLIM) flags for repair, "
            "and how many heads a method edits. A gated method that flags nearly everything behaves "
            "like an ungated one.",
        ),
        (
            "Judges:",
            f"generation metrics here come from the '{judge}' judge. Semantic-similarity (SEM) and "
            "other offline judges are not comparable with the fine-tuned GPT judges of the RADIANT, "
            "SLIM and TruthfulQA papers: compare methods within this report, not with the papers' "
            "numbers.",
        ),
    ]


def _report_blocks(
    results: dict[str, Any],
    results_path: Path,
    plots: dict[str, Path | None],
    tradeoff: tuple[str, str] | None,
) -> list[_Block]:
    cfg = results["config"]
    blocks = [
        _Block("h1", f"otguard comparison: {cfg.get('model', 'unknown model')} on {cfg.get('dataset', '?')}"),
        _Block("h2", "Run"),
        _Block("ul", items=tuple(_config_items(results, results_path))),
        _Block("h2", "Results"),
    ]
    groups = list(GROUP_TITLES)
    groups += [g for g in dict.fromkeys(m.group for m in _metrics(results)) if g not in groups]
    shown = 0
    for group in groups:
        header, rows = _table(results, group)
        if not header:
            continue
        shown += 1
        blocks.append(_Block("h3", GROUP_TITLES.get(group, group)))
        blocks.append(_Block("table", header=tuple(header), rows=tuple(tuple(r) for r in rows)))
    if not shown:
        blocks.append(_Block("p", "No metric values in the results file."))

    blocks.append(_Block("h2", "Plots"))
    blocks.append(_Block("h3", "Detector error per layer"))
    if plots[DETECTOR_PNG] is not None:
        blocks.append(_Block("img", DETECTOR_PNG))
        blocks.append(
            _Block(
                "p",
                "Validation false-positive and false-negative rates of the gated methods' "
                "detectors at every layer, one line per method and fold; the star marks the "
                "layer the method chose.",
            )
        )
    else:
        blocks.append(_Block("p", "Skipped: no gated method (RADIANT, SLIM) has per-layer detector data."))
    toxicity = _has(results, "tox_max")
    blocks.append(_Block("h3", "Toxicity vs. fluency" if toxicity else "Truthfulness vs. drift"))
    if plots[TRADEOFF_PNG] is not None and tradeoff is not None:
        mx, my = _metric(results, tradeoff[0]), _metric(results, tradeoff[1])
        assert mx is not None and my is not None
        better = (
            "Down and to the left is better: less toxic, more fluent."
            if my.higher_is_better is False
            else "Up and to the left is better: more truthful, less drift."
        )
        blocks.append(_Block("img", TRADEOFF_PNG))
        blocks.append(
            _Block("p", f"{my.label} against {mx.label} per method (error bars: std across folds). {better}")
        )
    else:
        blocks.append(
            _Block(
                "p",
                "Skipped: the results have no KL values, or neither a True×Info product "
                "nor MC2 to plot against them.",
            )
        )
    blocks.append(_Block("h3", "Flag rate and edited heads"))
    if plots[FLAGS_PNG] is not None:
        blocks.append(_Block("img", FLAGS_PNG))
        blocks.append(_Block("p", "Methods without the metric have no bar."))
    else:
        blocks.append(_Block("p", "Skipped: no method reports a flag rate or a number of edited heads."))

    blocks.append(_Block("h2", "How to read this"))
    blocks.append(_Block("ul", items=tuple(_how_to_read(results))))
    return blocks


_IMG_ALT = {
    DETECTOR_PNG: "Detector FPR and FNR per layer",
    TRADEOFF_PNG: "Truthfulness versus KL per method",
    FLAGS_PNG: "Flag rate and edited heads per method",
}


def _render_markdown(blocks: list[_Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + _md_escape(b.text))
        elif b.kind == "p":
            out.append(_md_escape(b.text))
        elif b.kind == "ul":
            out.append("\n".join(f"- **{_md_escape(lead)}** {_md_escape(rest)}" for lead, rest in b.items))
        elif b.kind == "table":
            out.append(_md_table(list(b.header), [list(r) for r in b.rows]))
        elif b.kind == "img":
            out.append(f"![{_md_escape(_IMG_ALT.get(b.text, b.text))}]({b.text})")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 62rem; margin: 2rem auto;
       padding: 0 1rem; color: #1f2328; line-height: 1.5; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; }
thead th { background: #f6f8fa; } td { text-align: right; } tbody th { text-align: left; font-weight: 600; }
img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
""".strip()


def _render_html(blocks: list[_Block], image_dir: Path) -> str:
    esc = html.escape
    title = next((b.text for b in blocks if b.kind == "h1"), "otguard report")
    body: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{esc(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{esc(b.text)}</p>")
        elif b.kind == "ul":
            lis = "".join(f"<li><strong>{esc(lead)}</strong> {esc(rest)}</li>" for lead, rest in b.items)
            body.append(f"<ul>{lis}</ul>")
        elif b.kind == "table":
            body.append(_html_table(list(b.header), [list(r) for r in b.rows]))
        elif b.kind == "img":
            data = base64.b64encode((image_dir / b.text).read_bytes()).decode("ascii")
            alt = esc(_IMG_ALT.get(b.text, b.text))
            body.append(f'<p><img alt="{alt}" src="data:image/png;base64,{data}"></p>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(title)}</title>\n'
        f"<style>\n{_CSS}\n</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def write_report(results_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html`` and the PNGs into ``out_dir``; returns (markdown, html) paths.

    A plot whose data is absent is skipped (its stale PNG from an earlier run is removed) and the report
    says so. Every file is written atomically, so a report being regenerated is never seen half-written.
    """
    rpath = Path(results_path)
    results = load_results(rpath)
    if rpath.is_dir():
        rpath = rpath / "results.json"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    axes = ("ppl", "tox_max") if _has(results, "tox_max") else ("kl", "true_x_info_product")
    tradeoff = _tradeoff_metrics(results, *axes)
    plots: dict[str, Path | None] = {
        DETECTOR_PNG: plot_detector(results, out / DETECTOR_PNG),
        TRADEOFF_PNG: plot_tradeoff(results, out / TRADEOFF_PNG, *axes),
        FLAGS_PNG: plot_flag_rates(results, out / FLAGS_PNG),
    }
    for name, made in plots.items():
        if made is None:
            (out / name).unlink(missing_ok=True)
    blocks = _report_blocks(results, rpath, plots, tradeoff)
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_bytes(md_path, _render_markdown(blocks).encode("utf-8"))
    atomic_write_bytes(html_path, _render_html(blocks, out).encode("utf-8"))
    return md_path, html_path


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report options, shared by ``python -m otguard.report`` and ``otguard report``."""
    parser.add_argument("results", help="results.json written by `otguard compare` (or its folder)")
    parser.add_argument("--out", default=None, help="output folder (default: the results file's folder)")


def run(args: argparse.Namespace) -> int:
    """Write the report for parsed arguments and print the two paths."""
    results = Path(args.results)
    out = Path(args.out) if args.out else (results if results.is_dir() else results.parent)
    md_path, html_path = write_report(results, out)
    print(md_path)
    print(html_path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m otguard.report results.json --out DIR``; errors are one line on stderr (exit code 2)."""
    parser = argparse.ArgumentParser(prog="otguard report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        return run(args)
    except OtguardError as exc:
        print(f"otguard: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
