"""The report's plots: detector error per layer, a trade-off scatter, flag rates and edited heads,
repaired vs. harmed answers per method, and the swept methods' trade-off frontiers.

matplotlib is imported inside the functions (importing the report stays cheap) and figures are drawn on
the non-interactive Agg canvas without touching pyplot's global state. Each plot returns None and writes
nothing when the results lack its data, so the report can say "skipped" instead of drawing empty axes.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from otguard.io import atomic_write_bytes
from otguard.report.frontier import frontier_panels, frontier_points, is_finite, sweep_metric
from otguard.report.tables import (
    ResultsLike,
    Stat,
    as_results,
    base_method,
    format_stat,
    has,
    method_label,
    metric,
    stat,
)
from otguard.results import RunResults

__all__ = [
    "REPAIR_PAIRS",
    "plot_detector",
    "plot_flag_rates",
    "plot_frontier",
    "plot_repair_harm",
    "plot_tradeoff",
    "tradeoff_metrics",
]

#: (panel title, repair metric, harm metric) of the repair/harm plot.
REPAIR_PAIRS = (("Judged answers", "repair_rate", "harm_rate"), ("MC1", "mc1_repair_rate", "mc1_harm_rate"))


def _new_figure(width: float, height: float) -> Any:
    """A Figure on an Agg canvas: no pyplot, so no GUI backend and no global figure list to leak."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _method_colors(results: RunResults) -> dict[str, Any]:
    """One fixed colour per method, so a method looks the same in every plot."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(results.method_ids)}


def _nan_list(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _detector_runs(results: RunResults) -> list[tuple[str, int, list[float], list[float], list[int]]]:
    """(method, fold, FPR per layer, FNR per layer, chosen layers) for every fold with a detector."""
    runs = []
    for method in results.method_ids:
        entry = results.methods.get(method)
        for record in entry.folds if entry is not None else []:
            det = record.detector
            if det is None:
                continue
            fpr, fnr = _nan_list(det.per_layer["fpr"]), _nan_list(det.per_layer["fnr"])
            if not fpr and not fnr:
                continue
            runs.append((method, record.fold, fpr, fnr, det.chosen_layers))
    return runs


def plot_detector(results: ResultsLike, path: str | os.PathLike[str]) -> Path | None:
    """Per-layer validation FPR and FNR of the gated methods' detectors; None (nothing written) without data.

    One line per method and fold (colour = method, line style = fold); the layer the method chose is
    marked with a star, so one can see whether the choice sits at the error minimum.
    """
    res = as_results(results)
    runs = _detector_runs(res)
    if not runs:
        return None
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    colors = _method_colors(res)
    styles = ["-", "--", ":", "-."]
    fig = _new_figure(10.0, 4.2)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, name in ((axes[0], "FPR"), (axes[1], "FNR")):
        for k, (method, fold, fpr, fnr, chosen) in enumerate(runs):
            values = fpr if name == "FPR" else fnr
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
                label=f"{method_label(method)}, fold {fold}" if name == "FPR" else None,
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


def tradeoff_metrics(results: RunResults, x: str, y: str) -> tuple[str, str] | None:
    """The (x, y) metrics to plot: y falls back to MC2 when missing; None when there is nothing to plot."""
    if not has(results, x):
        return None
    if not has(results, y):
        y = "mc2"
        if not has(results, y):
            return None
    return x, y


def _wants_log_axis(values: Sequence[float], spread: float = 20.0) -> bool:
    """A log axis when all values are positive and the largest is over ``spread`` times the smallest."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > spread


def _norm(v: float, lo: float, hi: float, log: bool) -> float:
    """``v``'s position between ``lo`` and ``hi`` (0..1), on a log scale when the axis is one."""
    if log:
        v, lo, hi = math.log(v), math.log(lo), math.log(hi)
    return (v - lo) / (hi - lo) if hi > lo else 0.0


def plot_tradeoff(
    results: ResultsLike, path: str | os.PathLike[str], x: str = "kl", y: str = "true_x_info_product"
) -> Path | None:
    """Truthfulness (y) against drift (x) per method, error bars = std across folds; None without data.

    The point of a detect-then-repair method is to move up (more truthful) without moving right (more
    drift from the original model); this puts both on one picture. y falls back to MC2 when missing.
    """
    res = as_results(results)
    chosen = tradeoff_metrics(res, x, y)
    if chosen is None:
        return None
    x, y = chosen
    mx, my = metric(res, x), metric(res, y)
    assert mx is not None and my is not None
    points: list[tuple[str, Stat, Stat]] = []
    for method in res.method_ids:
        sx, sy = stat(res, method, x), stat(res, method, y)
        if sx is None or sy is None or sx.mean is None or sy.mean is None:
            continue
        if not (math.isfinite(sx.mean) and math.isfinite(sy.mean)):
            continue
        points.append((method, sx, sy))
    if not points:
        return None
    colors = _method_colors(res)
    fig = _new_figure(6.4, 4.8)
    ax = fig.subplots()
    kx = 100.0 if mx.unit == "%" else 1.0
    ky = 100.0 if my.unit == "%" else 1.0
    xs = [kx * (sx.mean or 0.0) for _, sx, _ in points]
    ys = [ky * (sy.mean or 0.0) for _, _, sy in points]
    # One method far off (a broken model's perplexity in the thousands) would squash the others into
    # one spot: a log x axis keeps them apart.
    log_x = _wants_log_axis(xs)
    if log_x:
        ax.set_xscale("log")
    placed: list[tuple[float, float]] = []  # labels of points within 4 % of the axes get stacked
    for (method, sx, sy), px, py in zip(points, xs, ys, strict=True):
        xerr = kx * sx.std if sx.n > 1 and sx.std is not None else None
        yerr = ky * sy.std if sy.n > 1 and sy.std is not None else None
        ax.errorbar(
            px, py, xerr=xerr, yerr=yerr, fmt="o", color=colors[method], markersize=7, capsize=3, lw=1.2
        )
        here = (_norm(px, min(xs), max(xs), log_x), _norm(py, min(ys), max(ys), False))
        stack = sum(1 for p in placed if abs(p[0] - here[0]) < 0.04 and abs(p[1] - here[1]) < 0.04)
        placed.append(here)
        ax.annotate(
            method_label(method),
            (px, py),
            xytext=(6, 6 + 12 * stack),
            textcoords="offset points",
            fontsize=9,
            color=colors[method],
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},  # over error bars
            zorder=6,
        )
    direction = {True: "higher is better", False: "lower is better"}
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


def plot_flag_rates(results: ResultsLike, path: str | os.PathLike[str]) -> Path | None:
    """Bars of the detector flag rate and of the number of edited heads per method; None without data.

    A gated method that flags everything is an ungated one in disguise, and the edited-head count shows
    how invasive each method is; methods without the metric get no bar.
    """
    res = as_results(results)
    panels = [m for m in ("flag_rate", "edited_heads") if has(res, m)]
    if not panels:
        return None
    colors = _method_colors(res)
    fig = _new_figure(5.0 * len(panels) + 0.6, 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, metric_id in zip(axes, panels, strict=True):
        spec = metric(res, metric_id)
        assert spec is not None
        scale = 100.0 if spec.unit == "%" else 1.0
        names: list[str] = []
        means: list[float] = []
        errs: list[float] = []
        for method in res.method_ids:
            s = stat(res, method, metric_id)
            if s is None or s.mean is None or not math.isfinite(s.mean):
                continue
            names.append(method)
            means.append(scale * s.mean)
            errs.append(scale * s.std if s.n > 1 and s.std is not None and math.isfinite(s.std) else 0.0)
        bars = ax.bar(
            [method_label(n) for n in names],
            means,
            yerr=errs,
            capsize=4,
            color=[colors[n] for n in names],
            alpha=0.9,
        )
        ax.bar_label(
            bars,
            labels=[format_stat(Stat(m / scale, None, 1), spec.unit) for m in means],
            padding=3,
            fontsize=8,
        )
        ax.set_title(spec.heading)
        ax.set_ylabel(spec.heading)
        ax.margins(y=0.15)
        if spec.unit == "%":
            ax.set_ylim(0, max(100.0, max(means) * 1.15) if means else 100.0)
        ax.grid(axis="y", alpha=0.3)
    return _save_figure(fig, path)


def plot_repair_harm(results: ResultsLike, path: str | os.PathLike[str]) -> Path | None:
    """Repaired vs. harmed shares per method (judged answers, and MC1), error bars the 95 % paired
    bootstrap intervals; None (nothing written) when no method has them.

    The unsteered model's false answers a policy fixes and its true answers it breaks, side by side: a
    policy whose harm bar matches its repair bar changes answers without helping.
    """
    res = as_results(results)
    panels = [(title, r, h) for title, r, h in REPAIR_PAIRS if has(res, r) or has(res, h)]
    if not panels:
        return None
    fig = _new_figure(5.2 * len(panels) + 0.4, 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, repair_id, harm_id) in zip(axes, panels, strict=True):
        names = [
            m
            for m in res.method_ids
            if stat(res, m, repair_id) is not None or stat(res, m, harm_id) is not None
        ]
        width = 0.38
        for k, (metric_id, label, color) in enumerate(
            ((repair_id, "repaired", "#2e7d32"), (harm_id, "harmed", "#c62828"))
        ):
            means, lows, highs = [], [], []
            for method in names:
                summary = res.summary(method, metric_id)
                mean = summary.mean if summary is not None and summary.mean is not None else math.nan
                means.append(100.0 * mean)
                delta = summary.delta_vs_none if summary is not None else None
                lo, hi = delta.ci95 if delta is not None else (None, None)
                lows.append(100.0 * (mean - lo) if lo is not None and math.isfinite(mean) else 0.0)
                highs.append(100.0 * (hi - mean) if hi is not None and math.isfinite(mean) else 0.0)
            xs = [i + (k - 0.5) * width for i in range(len(names))]
            bars = ax.bar(
                xs, means, width, yerr=[lows, highs], capsize=3, color=color, alpha=0.85, label=label
            )
            ax.bar_label(
                bars, labels=[f"{m:.1f}" if math.isfinite(m) else "" for m in means], padding=2, fontsize=7
            )
        ax.set_xticks(range(len(names)), [method_label(n) for n in names])
        ax.set_title(f"{title}: repaired vs. harmed")
        ax.set_ylabel("% of the unsteered model's false (repaired) / true (harmed) answers")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return _save_figure(fig, path)


#: The unsteered model: a horizontal reference line in the frontier plot (its KL is 0 by definition).
_BASELINE = "none"


def plot_frontier(results: ResultsLike, path: str | os.PathLike[str]) -> Path | None:
    """Test truthfulness against test KL for every grid point of every swept method; None (nothing
    written) when no method has a sweep with both metrics.

    Two panels, test MC2 and (when the sweeps have it) judged True against test KL, one curve per swept
    method through its grid points sorted by KL; a star marks a point some fold's validation rule
    chose, a hollow marker a point outside the budgets (KL; and perplexity where the run has one: the
    vertical line shows the KL budget only). Methods run at one setting are references:
    ``none`` a dashed line, variant rows (``iti@paper``) and other methods a marker in their method's
    colour. The x axis turns logarithmic when KL spans decades, so small-KL points stay apart.
    """
    res = as_results(results)
    panels = frontier_panels(res)
    if not panels:
        return None
    from matplotlib.lines import Line2D

    colors = _method_colors(res)

    def color(method: str) -> Any:
        return colors.get(base_method(method), colors[method])

    swept = res.swept_methods
    budget = res.selection.kl_budget if res.selection is not None else None
    fig = _new_figure(5.6 * len(panels) + 0.8, 4.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (y, x) in zip(axes, panels, strict=True):
        my, mx = sweep_metric(res, y), sweep_metric(res, x)
        ky = 100.0 if my.unit == "%" else 1.0
        kx = 100.0 if mx.unit == "%" else 1.0
        points = frontier_points(res, y, x)
        markers: list[tuple[str, float, float]] = []
        lines: list[tuple[str, float]] = []
        reference = (res.selection.extra.get("reference") if res.selection is not None else None) or {}
        for method in res.method_ids:
            if method in swept:
                continue
            if method == _BASELINE and is_finite(reference.get(y)):
                # the unsteered model on the frontier's own questions, when the run measured it
                lines.append((method, ky * float(reference[y])))
                continue
            sy, sx = res.summary(method, y), res.summary(method, x)
            if sy is None or not is_finite(sy.mean):
                continue
            if method == _BASELINE or sx is None or not is_finite(sx.mean):
                lines.append((method, ky * float(sy.mean or 0.0)))
            else:
                markers.append((method, kx * float(sx.mean or 0.0), ky * float(sy.mean or 0.0)))
        log_x = _wants_log_axis([kx * p.x for p in points] + [mx_ for _, mx_, _ in markers])
        if log_x:
            ax.set_xscale("log")
        for method in swept:
            mine = sorted((p for p in points if p.method == method), key=lambda p: p.x)
            if not mine:
                continue
            c = color(method)
            xs, ys = [kx * p.x for p in mine], [ky * p.y for p in mine]
            ax.plot(xs, ys, "-", color=c, lw=1.3, zorder=2, label=method_label(method))
            for p, px, py in zip(mine, xs, ys, strict=True):
                face = "white" if p.within_budget is False else c
                ax.plot(
                    [px],
                    [py],
                    marker="o",
                    markersize=5,
                    color=c,
                    markerfacecolor=face,
                    linestyle="none",
                    zorder=3,
                )
            chosen = [(px, py) for p, px, py in zip(mine, xs, ys, strict=True) if p.selected_folds]
            if chosen:
                ax.plot(
                    [c_[0] for c_ in chosen],
                    [c_[1] for c_ in chosen],
                    marker="*",
                    markersize=15,
                    color=c,
                    markeredgecolor="black",
                    markeredgewidth=0.7,
                    linestyle="none",
                    zorder=5,
                )
        for method, px, py in markers:
            ax.plot(
                [px],
                [py],
                marker="X" if "@" in method else "D",
                markersize=9,
                color=color(method),
                markeredgecolor="black",
                markeredgewidth=0.6,
                linestyle="none",
                zorder=4,
                label=method_label(method),
            )
        for method, py in lines:
            ax.axhline(
                py,
                color="grey" if method == _BASELINE else color(method),
                linestyle="--",
                lw=1.0,
                zorder=1,
                label=f"{method_label(method)} (unsteered, same questions)"
                if method == _BASELINE and is_finite(reference.get(y))
                else f"{method_label(method)} (unsteered)"
                if method == _BASELINE
                else method_label(method),
            )
        if budget is not None and x == "kl" and (budget > 0 or not log_x):
            ax.axvline(
                kx * budget, color="black", linestyle=":", lw=1.0, zorder=1, label="KL budget (validation)"
            )
        direction = {True: " — higher is better", False: " — lower is better", None: ""}
        ax.set_xlabel(f"test {mx.heading}{direction[mx.higher_is_better]}")
        ax.set_ylabel(f"test {my.heading}{direction[my.higher_is_better]}")
        ax.set_title(f"Test {my.label} vs. test {mx.label}, every grid point")
        ax.margins(x=0.08, y=0.1)
        ax.grid(alpha=0.3)
    handles, labels = axes[-1].get_legend_handles_labels()
    for ax in axes[:-1]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    handles += [
        Line2D([], [], marker="*", markersize=12, color="grey", markeredgecolor="black", linestyle="none"),
        Line2D([], [], marker="o", markersize=5, color="grey", markerfacecolor="white", linestyle="none"),
    ]
    ppl_budget = res.selection.ppl_budget if res.selection is not None else None
    outside = "outside the KL budget" if ppl_budget is None else "outside the KL or perplexity budget"
    labels += ["chosen on validation (some fold)", outside]
    axes[-1].legend(handles, labels, fontsize=7, loc="best", framealpha=0.85)
    return _save_figure(fig, path)
