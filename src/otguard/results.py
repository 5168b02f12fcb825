"""The ``results.json`` contract: what a comparison run writes and what the report reads.

The harness builds a :class:`RunResults` and writes it (:meth:`RunResults.write`); the report and
rescoring read it back (:meth:`RunResults.from_json`). Both sides go through these types, so a key is
spelled in one place and a malformed file fails on load with one line naming every problem
(:class:`~otguard.errors.ResultsError`), not with a ``KeyError`` half way through a report.

Layout (``format_version`` 3)::

    {"format_version": 3, "task": "truthfulqa", "std_ddof": 1,
     "config": {...the run's configuration, incl. "methods": [ids in run order]...},
     "started": "2026-01-01T12:00:00", "seconds": 1234.5,
     "timings": {"collect": 12.0, ...}, "versions": {"otguard": "0.1.0", ...},
     "metrics": {"mc1": {"label": "MC1", "higher_is_better": true, "group": "mc", "unit": "%"}, ...},
     "examples": {"slim": {"repaired": [{"fold": 0, "question": "...", "before": "...", "after": "..."}],
                           "harmed": [...]}},
     "judges": {"true": {"name": "learned:truth", "role": "truth", "validated": true,
                         "validation": {"seen_questions": {"accuracy": 0.86, "auroc": 0.9, ...}, ...}}, ...},
     "methods": {"slim": {"summary": {"mc1": {"mean": 0.3, "std": 0.01, "folds": [0.29, 0.31],
                                              "delta_vs_none": {"mean": 0.02, "ci95": [0.0, 0.04],
                                                                "n": 817, "resamples": 2000}}},
                          "folds": [{"fold": 0, "seconds": 8.1, "policy": {...}, "detector": {...},
                                     ...task facts of the fold, e.g. "test_questions": 20}],
                          "sweep": [...grid points, optional: see below...]}}}

Hyper-parameter sweeps (optional, format 3): a swept method carries ``sweep``, one entry per grid point::

    {"params": {"head_share": 0.02, "strength": 5.0},
     "validation": {"mc2": 0.41, "kl": 0.03},            # means over the folds that have the point
     "test": {"mc2": 0.40, "kl": 0.031, "true": 0.52},   # means over folds; a metric may be null/absent
     "selected_folds": [0, 1],                           # folds whose validation rule chose this point
     "within_budget": true,                              # validation KL <= budget in every fold (or null)
     "folds": [{"fold": 0, "validation": {...}, "test": {...}, "selected": true}, ...]}

and the run carries the rule that chose among them, ``"selection": {"metric": "mc2", "kl_budget": 0.1,
"kl_on": "validation documents", "frontier_questions": 100, "rule": "<one sentence>", ...}`` (extra keys
kept). The keys of ``validation`` / ``test`` are metric ids (of the ``metrics`` catalogue, where the
report takes labels and units from; an id missing there is shown under its own name). A method id may
carry a variant after ``@`` (``"iti@paper"``: ITI with the paper's defaults), a method entry of its own.
:func:`merge_sweep` builds a method's ``sweep`` from per-fold entries. Files without these keys (all
older ones) load unchanged.

Format version 1 (files written before this module; no ``format_version`` key) kept ``started``,
``seconds``, ``timings`` and ``versions`` inside ``config`` and had no ``task``; it loads unchanged
otherwise. Format 2 (no ``std_ddof``, ``judges`` or ``delta_vs_none``) loads unchanged.

``std`` is the standard deviation over the finite per-fold values with ``std_ddof`` delta degrees of
freedom: format 3 writes the *sample* std (``ddof=1``); files of formats 1 and 2 hold the
*population* std (``ddof=0``, half the range with two folds), and load with ``std_ddof`` 0 so that a
report says which one it prints. ``delta_vs_none`` is the paired bootstrap of a method's difference
to the unsteered model (:mod:`otguard.harness.paired`).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from otguard.errors import DataFileNotFoundError, ResultsError
from otguard.io import atomic_write_text

__all__ = [
    "FORMAT_VERSION",
    "STD_DDOF",
    "Delta",
    "DetectorRecord",
    "FoldRecord",
    "MethodResult",
    "MetricSpec",
    "MetricSummary",
    "RunResults",
    "Selection",
    "SweepFold",
    "SweepPoint",
    "merge_sweep",
]

#: Version of the layout :meth:`RunResults.to_dict` writes; :meth:`RunResults.from_dict` reads 1 to 3.
FORMAT_VERSION = 3
#: Delta degrees of freedom of the ``MetricSummary.std`` this otguard writes (1: the sample std).
STD_DDOF = 1
#: ... and of files that do not record it (formats 1 and 2 wrote the population std).
_OLD_STD_DDOF = 0
# Run facts that format 1 kept inside "config" and format 2 keeps at the top level.
_RUN_KEYS = ("started", "seconds", "timings", "versions")
# Task of a format-1 file, from its config.dataset.
_V1_TASKS = {"truthfulqa": "truthfulqa", "truthfulqa-mc2": "truthfulqa", "toxigen": "toxicity"}
_FOLD_KEYS = ("fold", "seconds", "fit_seconds", "policy", "detector")
_SWEEP_KEYS = ("params", "validation", "test", "selected_folds", "within_budget", "folds")
_SWEEP_FOLD_KEYS = ("fold", "validation", "test", "selected")
_SELECTION_KEYS = ("metric", "rule", "kl_budget", "kl_on", "frontier_questions")
_MAX_SHOWN = 12


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_number_or_none(value: Any) -> bool:
    return value is None or _is_number(value)


def _clean(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------------
# The types
# --------------------------------------------------------------------------------------------------


@dataclass
class MetricSpec:
    """How a metric is shown: label, direction (None: neither is better), table group and unit.

    ``unit`` None leaves the choice to the report ("%" for fraction groups, "nats" for CE/KL).
    """

    label: str
    higher_is_better: bool | None = None
    group: str = "other"
    unit: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "higher_is_better": self.higher_is_better,
                               "group": self.group}  # fmt: skip
        if self.unit is not None:
            out["unit"] = self.unit
        return out

    @classmethod
    def from_dict(cls, metric_id: str, data: Mapping[str, Any]) -> MetricSpec:
        unit = data.get("unit")
        return cls(
            label=str(data.get("label") or metric_id),
            higher_is_better=data.get("higher_is_better"),
            group=str(data.get("group") or "other"),
            unit=None if unit is None else str(unit),
        )


@dataclass
class Delta:
    """A method's difference to the unsteered model (``none``) on one metric, with its 95 % interval.

    ``mean``: the point estimate (the method's value minus ``none``'s, as the table's means give it);
    ``ci95``: the 2.5th and 97.5th percentiles of the paired bootstrap over test questions; ``n``: the
    paired questions; ``resamples``: bootstrap resamples. None where no finite value exists.
    """

    mean: float | None
    ci95: tuple[float | None, float | None]
    n: int = 0
    resamples: int = 0

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (the difference is not chance)."""
        lo, hi = self.ci95
        return lo is not None and hi is not None and (lo > 0 or hi < 0)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci95": list(self.ci95), "n": self.n, "resamples": self.resamples}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Delta:
        lo, hi = data["ci95"]
        return cls(
            mean=None if data.get("mean") is None else float(data["mean"]),
            ci95=(None if lo is None else float(lo), None if hi is None else float(hi)),
            n=int(data.get("n") or 0),
            resamples=int(data.get("resamples") or 0),
        )


@dataclass
class MetricSummary:
    """One method's metric over the folds: mean, std (see ``RunResults.std_ddof``) and per-fold values.

    Non-finite values are stored as None. ``folds`` None means the file did not record per-fold values
    (then the fold count is the configuration's). ``delta_vs_none``: the paired-bootstrap difference to
    the unsteered model, where the harness computed one.
    """

    mean: float | None
    std: float | None = 0.0
    folds: list[float | None] | None = None
    delta_vs_none: Delta | None = None

    @classmethod
    def of(cls, values: Sequence[float], *, mean: float | None = None, ddof: int = STD_DDOF) -> MetricSummary:
        """Summary of per-fold values: mean and std (``ddof``) over the finite ones (NaN kept as None).

        ``mean`` replaces the mean of the fold values for metrics that are not an average over folds
        (True×Info product: the product of the fold means of True and Info).
        """
        vals = [float(v) for v in values]
        finite = [v for v in vals if math.isfinite(v)]
        if mean is None:
            mean = float(np.mean(finite)) if finite else float("nan")
        std = float(np.std(finite, ddof=ddof)) if len(finite) > max(1, ddof) else 0.0
        return cls(_clean(float(mean)), _clean(std), [_clean(v) for v in vals])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mean": self.mean, "std": self.std}
        if self.folds is not None:
            out["folds"] = list(self.folds)
        if self.delta_vs_none is not None:
            out["delta_vs_none"] = self.delta_vs_none.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricSummary:
        folds = data.get("folds")
        delta = data.get("delta_vs_none")
        return cls(
            mean=None if data["mean"] is None else float(data["mean"]),
            std=None if data.get("std") is None else float(data["std"]),
            folds=None if folds is None else [None if v is None else float(v) for v in folds],
            delta_vs_none=None if delta is None else Delta.from_dict(delta),
        )


@dataclass
class DetectorRecord:
    """A gated method's detector on one fold: the chosen layer(s) and validation rates per layer.

    ``per_layer`` always has ``fpr`` and ``fnr`` (one value per layer, None where undefined); the harness
    also records ``accuracy``, ``f1`` and ``threshold`` when the detector has them.
    """

    per_layer: dict[str, list[float | None]]
    layer: int | list[int] | None = None

    @property
    def chosen_layers(self) -> list[int]:
        if self.layer is None:
            return []
        return [int(v) for v in (self.layer if isinstance(self.layer, list) else [self.layer])]

    def to_dict(self) -> dict[str, Any]:
        return {"layer": copy.copy(self.layer), "per_layer": {k: list(v) for k, v in self.per_layer.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DetectorRecord:
        layer = data.get("layer")
        per_layer = {
            str(k): [None if x is None else float(x) for x in v] if isinstance(v, list) else copy.deepcopy(v)
            for k, v in data["per_layer"].items()
        }
        return cls(per_layer=per_layer, layer=[int(v) for v in layer] if isinstance(layer, list) else layer)


@dataclass
class FoldRecord:
    """What one method did on one fold: its policy summary, detector, timing and the task's fold facts.

    ``meta`` holds the task's facts about the fold (``test_questions``, ``eval_groups``...); in JSON they
    sit next to the other keys of the record.
    """

    fold: int
    policy: dict[str, Any] | None = None
    detector: DetectorRecord | None = None
    seconds: float | None = None
    fit_seconds: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fold": self.fold}
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.fit_seconds is not None:
            out["fit_seconds"] = self.fit_seconds
        out["policy"] = copy.deepcopy(self.policy)
        out["detector"] = None if self.detector is None else self.detector.to_dict()
        out.update(copy.deepcopy(self.meta))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], index: int = 0) -> FoldRecord:
        det = data.get("detector")
        return cls(
            fold=int(data.get("fold", index)),
            policy=copy.deepcopy(data.get("policy")),
            detector=None if det is None else DetectorRecord.from_dict(det),
            seconds=None if data.get("seconds") is None else float(data["seconds"]),
            fit_seconds=None if data.get("fit_seconds") is None else float(data["fit_seconds"]),
            meta={k: copy.deepcopy(v) for k, v in data.items() if k not in _FOLD_KEYS},
        )


def _values(data: Mapping[str, Any] | None) -> dict[str, float | None]:
    """Metric values as floats, non-finite ones as None (JSON has no NaN; the report shows "–")."""
    out: dict[str, float | None] = {}
    for key, value in (data or {}).items():
        out[str(key)] = None if value is None else _clean(float(value))
    return out


@dataclass
class SweepFold:
    """One grid point on one fold: its validation and test metrics, and whether the fold's rule chose it.

    ``extra``: any other keys of the record (e.g. the fold's ``within_budget``), kept as written.
    """

    fold: int
    validation: dict[str, float | None] = field(default_factory=dict)
    test: dict[str, float | None] = field(default_factory=dict)
    selected: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fold": self.fold, "validation": dict(self.validation),
                               "test": dict(self.test), "selected": self.selected}  # fmt: skip
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepFold:
        return cls(
            fold=int(data["fold"]),
            validation=_values(data.get("validation")),
            test=_values(data.get("test")),
            selected=bool(data.get("selected", False)),
            extra={k: copy.deepcopy(v) for k, v in data.items() if k not in _SWEEP_FOLD_KEYS},
        )


@dataclass
class SweepPoint:
    """One grid point of a method's sweep: its hyper-parameters and metrics averaged over the folds.

    ``validation`` decided the selection; ``test`` places the point on the trade-off frontier (every grid
    point has one, not only the chosen ones). ``selected_folds``: the folds whose rule chose this point;
    ``within_budget``: its validation KL kept the budget in every fold (None: not recorded). ``folds``:
    the per-fold values behind the means. ``extra``: other keys, kept as written.
    """

    params: dict[str, Any]
    validation: dict[str, float | None] = field(default_factory=dict)
    test: dict[str, float | None] = field(default_factory=dict)
    selected_folds: list[int] = field(default_factory=list)
    within_budget: bool | None = None
    folds: list[SweepFold] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def selected(self) -> bool:
        """Whether some fold's validation rule chose this point."""
        return bool(self.selected_folds)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "params": copy.deepcopy(self.params),
            "validation": dict(self.validation),
            "test": dict(self.test),
            "selected_folds": list(self.selected_folds),
            "within_budget": self.within_budget,
            "folds": [f.to_dict() for f in self.folds],
        }
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepPoint:
        within = data.get("within_budget")
        return cls(
            params=copy.deepcopy(dict(data["params"])),
            validation=_values(data.get("validation")),
            test=_values(data.get("test")),
            selected_folds=[int(k) for k in data.get("selected_folds") or []],
            within_budget=None if within is None else bool(within),
            folds=[SweepFold.from_dict(f) for f in data.get("folds") or []],
            extra={k: copy.deepcopy(v) for k, v in data.items() if k not in _SWEEP_KEYS},
        )


@dataclass
class Selection:
    """The rule that chose each swept method's operating point from its grid, on validation data only.

    ``metric``: the validation metric maximised (a metric id, e.g. "mc2"); ``kl_budget``: the largest
    validation KL allowed (None: no budget); ``kl_on``: which text that KL is measured on;
    ``frontier_questions``: the test questions behind the grid points' test metrics; ``rule``: the rule
    in one sentence, as the report prints it; ``extra``: any other keys, kept as written (e.g. the
    toxicity task's ``ppl_budget``, read through :attr:`ppl_budget`).
    """

    metric: str
    rule: str
    kl_budget: float | None = None
    kl_on: str | None = None
    frontier_questions: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ppl_budget(self) -> float | None:
        """The largest validation perplexity ratio to the unsteered model allowed (``extra["ppl_budget"]``,
        kept there so that records written before it round-trip unchanged; None: no such budget)."""
        value = self.extra.get("ppl_budget")
        return None if value is None else float(value)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "kl_budget": self.kl_budget, "kl_on": self.kl_on,
                               "frontier_questions": self.frontier_questions, "rule": self.rule}  # fmt: skip
        out.update(copy.deepcopy(self.extra))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selection:
        budget, n = data.get("kl_budget"), data.get("frontier_questions")
        return cls(
            metric=str(data["metric"]),
            rule=str(data["rule"]),
            kl_budget=None if budget is None else float(budget),
            kl_on=None if data.get("kl_on") is None else str(data["kl_on"]),
            frontier_questions=None if n is None else int(n),
            extra={k: copy.deepcopy(v) for k, v in data.items() if k not in _SELECTION_KEYS},
        )


@dataclass
class MethodResult:
    """One method's results: a summary per metric (JSON key ``summary``), one record per fold and, for a
    swept method, its grid points (``sweep``; None for a method run at one setting)."""

    metrics: dict[str, MetricSummary] = field(default_factory=dict)
    folds: list[FoldRecord] = field(default_factory=list)
    sweep: list[SweepPoint] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"summary": {k: s.to_dict() for k, s in self.metrics.items()},
                               "folds": [f.to_dict() for f in self.folds]}  # fmt: skip
        if self.sweep is not None:
            out["sweep"] = [p.to_dict() for p in self.sweep]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodResult:
        sweep = data.get("sweep")
        return cls(
            metrics={str(k): MetricSummary.from_dict(v) for k, v in data["summary"].items()},
            folds=[FoldRecord.from_dict(f, k) for k, f in enumerate(data.get("folds") or [])],
            sweep=None if sweep is None else [SweepPoint.from_dict(p) for p in sweep],
        )


@dataclass
class RunResults:
    """Everything a comparison run produced; the one way to write and read ``results.json``.

    ``config`` is the run's configuration as a plain dict (the harness's configuration fields plus the
    resolved model, judge, dtype, thread count, and ``methods``, the method ids in run order);
    ``metrics`` is the catalogue of the metrics some method has; ``methods`` maps method id to its
    results. ``task`` names the harness task ("truthfulqa", "toxicity"...). ``judges`` names every judge
    or scorer behind a metric, by role (``"true"``, ``"info"``, ``"sem"``...), with its held-out
    validation figures where it has them (``"validated": false`` where it has none); ``std_ddof`` says
    which standard deviation the summaries hold (1: sample, 0: population). ``examples``: per method,
    a few items of each kind ("repaired", "harmed": question, unsteered and steered answer).
    ``selection``: the validation rule that chose the swept methods' grid points (None: no sweep).
    """

    config: dict[str, Any]
    methods: dict[str, MethodResult]
    metrics: dict[str, MetricSpec] = field(default_factory=dict)
    task: str | None = None
    started: str | None = None
    seconds: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    judges: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    selection: Selection | None = None
    std_ddof: int = STD_DDOF
    format_version: int = FORMAT_VERSION

    # ---- queries the report and rescoring need ----------------------------------------------------

    @property
    def method_ids(self) -> list[str]:
        """Methods in the order of ``config.methods``, then any extra ones found in ``methods``."""
        order = list(dict.fromkeys(self.config.get("methods") or []))
        return order + [m for m in self.methods if m not in order]

    def summary(self, method: str, metric: str) -> MetricSummary | None:
        """A method's summary of one metric, or None when the method does not have it."""
        entry = self.methods.get(method)
        return entry.metrics.get(metric) if entry is not None else None

    @property
    def swept_methods(self) -> list[str]:
        """Methods (in :attr:`method_ids` order) that carry a non-empty sweep."""
        return [m for m in self.method_ids if m in self.methods and self.methods[m].sweep]

    def n_folds(self, summary: MetricSummary) -> int:
        """Folds behind a summary: its per-fold values, else the configuration's fold count (else 1)."""
        if summary.folds is not None:
            return len(summary.folds)
        folds = self.config.get("folds")
        return int(folds) if isinstance(folds, int | float) and not isinstance(folds, bool) else 1

    # ---- serialisation -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict of the current format (a deep copy: editing it leaves ``self`` alone)."""
        return {
            "format_version": FORMAT_VERSION,
            "task": self.task,
            "std_ddof": self.std_ddof,
            "config": copy.deepcopy(self.config),
            "started": self.started,
            "seconds": self.seconds,
            "timings": dict(self.timings),
            "versions": dict(self.versions),
            "judges": copy.deepcopy(self.judges),
            "examples": copy.deepcopy(self.examples),
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
            "methods": {k: m.to_dict() for k, m in self.methods.items()},
            **({} if self.selection is None else {"selection": self.selection.to_dict()}),
        }

    def to_json(self) -> str:
        """``results.json`` text (indented; values JSON cannot hold, such as paths, written as strings)."""
        return json.dumps(self.to_dict(), indent=2, default=str)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Validate, then write atomically (a reader never sees half a file); returns the path."""
        self.validate()
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "Results") -> RunResults:
        """Check and parse a decoded ``results.json`` of format 1 to 3; raises :class:`ResultsError`.

        ``source`` starts the error message (e.g. "Results file runs/x/results.json").
        """
        problems = _problems(data)
        if problems:
            shown = "; ".join(problems[:_MAX_SHOWN])
            if len(problems) > _MAX_SHOWN:
                shown += f"; and {len(problems) - _MAX_SHOWN} more"
            raise ResultsError(f"{source} is not a valid otguard compare result: {shown}.")
        data = _upgrade(data)
        cfg = data["config"]
        return cls(
            config=copy.deepcopy({k: v for k, v in cfg.items()}),
            methods={str(k): MethodResult.from_dict(v) for k, v in data["methods"].items()},
            metrics={str(k): MetricSpec.from_dict(str(k), v) for k, v in data["metrics"].items()},
            task=data.get("task"),
            started=None if data.get("started") is None else str(data["started"]),
            seconds=None if data.get("seconds") is None else float(data["seconds"]),
            timings={str(k): float(v) for k, v in (data.get("timings") or {}).items()},
            versions={str(k): str(v) for k, v in (data.get("versions") or {}).items()},
            judges=copy.deepcopy(dict(data.get("judges") or {})),
            examples=copy.deepcopy(dict(data.get("examples") or {})),
            selection=None if data.get("selection") is None else Selection.from_dict(data["selection"]),
            std_ddof=int(data.get("std_ddof", _OLD_STD_DDOF)),
        )

    @classmethod
    def loads(cls, text: str, *, source: str = "Results") -> RunResults:
        """Parse ``results.json`` text; invalid JSON is a :class:`ResultsError` naming line and column."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ResultsError(
                f"{source} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                "it may be truncated (did the compare job finish?)."
            ) from exc
        return cls.from_dict(data, source=source)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> RunResults:
        """Read a ``results.json`` (or the folder holding one) of format 1 to 3."""
        p = resolve_path(path)
        if not p.is_file():
            raise DataFileNotFoundError(
                f"Results file not found: {p}. Pass the results.json written by `otguard compare`."
            )
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ResultsError(f"Results file {p} is not UTF-8 text ({exc}).") from exc
        except OSError as exc:
            raise ResultsError(f"Results file {p} could not be read: {exc}") from exc
        return cls.loads(text, source=f"Results file {p}")

    def validate(self) -> RunResults:
        """Raise :class:`ResultsError` if this object would not load back as written; returns ``self``."""
        problems = _problems(self.to_dict())
        for mid, entry in self.methods.items():
            for k, rec in enumerate(entry.folds):
                clash = sorted(set(rec.meta) & set(_FOLD_KEYS))
                if clash:
                    problems.append(f"methods.{mid}.folds[{k}].meta repeats the record's keys {clash}")
        if problems:
            raise ResultsError(f"Results are not a valid otguard compare result: {'; '.join(problems)}.")
        return self


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or ``path/results.json`` when ``path`` is a run folder holding one."""
    p = Path(path)
    return p / "results.json" if p.is_dir() and (p / "results.json").is_file() else p


# --------------------------------------------------------------------------------------------------
# Format versions and checks
# --------------------------------------------------------------------------------------------------


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """A format-1 dict in the current layout (a shallow copy; formats 2 and 3 are returned as they are;
    a file without ``std_ddof`` keeps the population std it was written with)."""
    if data.get("format_version", 1) != 1:
        return data
    out = dict(data)
    cfg = dict(out["config"])
    for key in _RUN_KEYS:
        if key in cfg:
            out[key] = cfg.pop(key)
    out["config"] = cfg
    dataset = cfg.get("dataset")
    out["task"] = _V1_TASKS.get(dataset, dataset) if isinstance(dataset, str) else None
    out["format_version"] = FORMAT_VERSION
    out["std_ddof"] = _OLD_STD_DDOF
    return out


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
    if not (layer is None or _is_number(layer) or (isinstance(layer, list) and all(map(_is_number, layer)))):
        problems.append(f"{where}.layer must be an integer, a list of integers or null")


def _check_run_facts(data: dict[str, Any], problems: list[str]) -> None:
    if not (data.get("task") is None or isinstance(data["task"], str)):
        problems.append("task must be a string or null")
    if not (data.get("started") is None or isinstance(data["started"], str)):
        problems.append("started must be a string or null")
    if not _is_number_or_none(data.get("seconds")):
        problems.append("seconds must be a number or null")
    timings = data.get("timings")
    if timings is not None and not (isinstance(timings, dict) and all(map(_is_number, timings.values()))):
        problems.append("timings must be an object of seconds per stage")
    if data.get("versions") is not None and not isinstance(data["versions"], dict):
        problems.append("versions must be an object")
    if data.get("judges") is not None and not (
        isinstance(data["judges"], dict) and all(isinstance(v, dict) for v in data["judges"].values())
    ):
        problems.append("judges must be an object of judge records")
    examples = data.get("examples")
    if examples is not None and not (
        isinstance(examples, dict)
        and all(
            isinstance(kinds, dict) and all(isinstance(rows, list) for rows in kinds.values())
            for kinds in examples.values()
        )
    ):
        problems.append("examples must be an object of {kind: [example, ...]} per method")
    ddof = data.get("std_ddof")
    if ddof is not None and ddof not in (0, 1):
        problems.append("std_ddof must be 0 or 1")


def _check_summary(summary: Any, where: str, problems: list[str]) -> None:
    if summary is None:
        problems.append(f"missing key {where}.summary")
        return
    if not isinstance(summary, dict):
        problems.append(f"{where}.summary must be an object")
        return
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
        elif stat.get("delta_vs_none") is not None:
            delta = stat["delta_vs_none"]
            ci = delta.get("ci95") if isinstance(delta, dict) else None
            if not (
                isinstance(delta, dict)
                and _is_number_or_none(delta.get("mean"))
                and isinstance(ci, list)
                and len(ci) == 2
                and all(_is_number_or_none(v) for v in ci)
            ):
                problems.append(f"{at}.delta_vs_none must be {{mean, ci95: [lo, hi]}} of numbers")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_values(values: Any, at: str, problems: list[str], *, required: bool = True) -> None:
    """Metric values of a sweep point: an object of metric id -> number or null."""
    if values is None:
        if required:
            problems.append(f"missing key {at}")
        return
    if not isinstance(values, dict):
        problems.append(f"{at} must be an object of metric values")
        return
    for key, value in values.items():
        if not _is_number_or_none(value):
            problems.append(f"{at}.{key} must be a number or null")


def _check_sweep(sweep: Any, where: str, problems: list[str]) -> None:
    """A method's grid points feed the frontier plot and tables; a malformed one fails at load."""
    if sweep is None:
        return
    if not isinstance(sweep, list):
        problems.append(f"{where}.sweep must be a list of grid points")
        return
    seen: list[Any] = []
    for i, point in enumerate(sweep):
        at = f"{where}.sweep[{i}]"
        if not isinstance(point, dict):
            problems.append(f"{at} must be an object")
            continue
        params = point.get("params")
        if params is None:
            problems.append(f"missing key {at}.params")
        elif not isinstance(params, dict):
            problems.append(f"{at}.params must be an object")
        elif params in seen:
            problems.append(f"{at}.params repeats {where}.sweep[{seen.index(params)}].params")
        seen.append(params)
        _check_values(point.get("validation"), f"{at}.validation", problems)
        _check_values(point.get("test"), f"{at}.test", problems)
        chosen = point.get("selected_folds")
        if chosen is not None and not (isinstance(chosen, list) and all(map(_is_int, chosen))):
            problems.append(f"{at}.selected_folds must be a list of fold numbers")
        if point.get("within_budget") not in (True, False, None):
            problems.append(f"{at}.within_budget must be true, false or null")
        folds = point.get("folds")
        if folds is None:
            continue
        if not isinstance(folds, list):
            problems.append(f"{at}.folds must be a list")
            continue
        for k, fold in enumerate(folds):
            fat = f"{at}.folds[{k}]"
            if not isinstance(fold, dict):
                problems.append(f"{fat} must be an object")
                continue
            if "fold" not in fold:
                problems.append(f"missing key {fat}.fold")
            elif not _is_int(fold["fold"]):
                problems.append(f"{fat}.fold must be an integer")
            _check_values(fold.get("validation"), f"{fat}.validation", problems, required=False)
            _check_values(fold.get("test"), f"{fat}.test", problems, required=False)
            if fold.get("selected") not in (True, False, None):
                problems.append(f"{fat}.selected must be true or false")


def _check_selection(selection: Any, problems: list[str]) -> None:
    if selection is None:
        return
    if not isinstance(selection, dict):
        problems.append("selection must be an object or null")
        return
    for key in ("metric", "rule"):
        if key not in selection:
            problems.append(f"missing key selection.{key}")
        elif not isinstance(selection[key], str):
            problems.append(f"selection.{key} must be a string")
    for key in ("kl_budget", "ppl_budget"):
        if not _is_number_or_none(selection.get(key)):
            problems.append(f"selection.{key} must be a number or null")
    if not (selection.get("kl_on") is None or isinstance(selection["kl_on"], str)):
        problems.append("selection.kl_on must be a string or null")
    n = selection.get("frontier_questions")
    if not (n is None or _is_int(n)):
        problems.append("selection.frontier_questions must be an integer or null")


def _check_methods(methods: Any, problems: list[str]) -> None:
    if not isinstance(methods, dict):
        problems.append("methods must be an object")
        return
    for mid, entry in methods.items():
        where = f"methods.{mid}"
        if not isinstance(entry, dict):
            problems.append(f"{where} must be an object")
            continue
        _check_summary(entry.get("summary"), where, problems)
        _check_sweep(entry.get("sweep"), where, problems)
        folds = entry.get("folds", [])
        if folds is None:
            continue
        if not isinstance(folds, list):
            problems.append(f"{where}.folds must be a list")
            continue
        for k, fold in enumerate(folds):
            if not isinstance(fold, dict):
                problems.append(f"{where}.folds[{k}] must be an object")
                continue
            if "fold" in fold and not (isinstance(fold["fold"], int) and not isinstance(fold["fold"], bool)):
                problems.append(f"{where}.folds[{k}].fold must be an integer")
            for key in ("seconds", "fit_seconds"):
                if not _is_number_or_none(fold.get(key)):
                    problems.append(f"{where}.folds[{k}].{key} must be a number or null")
            if not (fold.get("policy") is None or isinstance(fold["policy"], dict)):
                problems.append(f"{where}.folds[{k}].policy must be an object or null")
            _check_detector(fold.get("detector"), f"{where}.folds[{k}].detector", problems)


def _problems(data: Any) -> list[str]:
    """All problems of a decoded results file, as dotted key paths (empty when it loads)."""
    if not isinstance(data, dict):
        return ["the top level must be a JSON object"]
    version = data.get("format_version", 1)
    if version not in (1, 2, FORMAT_VERSION) or isinstance(version, bool):
        return [
            f"format_version {version!r} is not one this otguard reads (1 to {FORMAT_VERSION}); "
            "a newer otguard wrote it, so upgrade otguard"
        ]
    problems = [f"missing key {key}" for key in ("config", "metrics", "methods") if key not in data]
    config = data.get("config")
    if "config" in data:
        if not isinstance(config, dict):
            problems.append("config must be an object")
        else:
            if "methods" not in config:
                problems.append("missing key config.methods")
            elif not isinstance(config["methods"], list) or not all(
                isinstance(m, str) for m in config["methods"]
            ):
                problems.append("config.methods must be a list of method ids")
            if version == 1 or "format_version" not in data:
                _check_run_facts({**data, **{k: config[k] for k in _RUN_KEYS if k in config}}, problems)
            else:
                _check_run_facts(data, problems)
    metrics = data.get("metrics")
    if "metrics" in data:
        if not isinstance(metrics, dict):
            problems.append("metrics must be an object")
        else:
            for name, spec in metrics.items():
                if not isinstance(spec, dict):
                    problems.append(f"metrics.{name} must be an object")
                elif "higher_is_better" in spec and spec["higher_is_better"] not in (True, False, None):
                    problems.append(f"metrics.{name}.higher_is_better must be true, false or null")
    if "methods" in data:
        _check_methods(data["methods"], problems)
    _check_selection(data.get("selection"), problems)
    return problems


# --------------------------------------------------------------------------------------------------
# Building a sweep
# --------------------------------------------------------------------------------------------------


def _mean_values(records: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Per metric, the mean of the finite values over the records (None where no record has one)."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    out: dict[str, float | None] = {}
    for key in keys:
        finite = [float(v) for r in records if (v := r.get(key)) is not None and math.isfinite(v)]
        out[key] = sum(finite) / len(finite) if finite else None
    return out


def _within_budgets(validation: Mapping[str, Any], limits: Mapping[str, float | None]) -> bool | None:
    """Whether the known figures of ``validation`` are within their limits (None: none is known)."""
    checks = [float(validation[key] or 0.0) <= limit for key, limit in limits.items()
              if limit is not None and validation.get(key) is not None]  # fmt: skip
    return all(checks) if checks else None


def merge_sweep(
    per_fold: Sequence[Sequence[Mapping[str, Any]]],
    *,
    kl_budget: float | None = None,
    fold_ids: Sequence[int] | None = None,
    budgets: Mapping[str, float | None] | None = None,
) -> list[dict[str, Any]]:
    """A method's ``sweep`` (the JSON layout; :meth:`SweepPoint.from_dict` types it) from per-fold entries.

    ``per_fold[k]`` lists fold k's grid points, each ``{"params": {...}, "validation": {...}, "test":
    {...}, "selected": bool}`` with optionally ``"within_budget"`` and ``"fold"`` (default
    ``fold_ids[k]``, else k); other keys are kept in the point's per-fold record. Points are matched
    across folds by equal ``params`` and listed in order of first appearance. ``validation`` and ``test``
    are per metric the mean over the folds that have a finite value (None where none has; a point
    missing from a fold is averaged over the folds that have it). ``within_budget`` is true when every
    fold's flag is, false when one is false, else None. A fold without the flag (the run writes it:
    :meth:`otguard.harness.sweep.FoldSweep.entries`, every budget applied) takes ``validation.kl <=
    kl_budget`` and ``validation[key] <= limit`` for each ``key: limit`` of ``budgets`` (e.g.
    ``{"ppl_ratio": 1.5}``), each where both are known: false when one is over, true when one is known
    and none is over. A fold listing the same params twice is a ``ValueError``.
    """
    if fold_ids is not None and len(fold_ids) != len(per_fold):
        raise ValueError(f"fold_ids has {len(fold_ids)} entries for {len(per_fold)} folds")
    points: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for k, entries in enumerate(per_fold):
        seen: list[dict[str, Any]] = []
        for entry in entries:
            params = dict(entry["params"])
            fold = int(entry.get("fold", fold_ids[k] if fold_ids is not None else k))
            if params in seen:
                raise ValueError(f"fold {fold} lists the grid point {params} twice")
            seen.append(params)
            validation, test = _values(entry.get("validation")), _values(entry.get("test"))
            record: dict[str, Any] = {"fold": fold, "validation": validation, "test": test,
                                      "selected": bool(entry.get("selected", False))}  # fmt: skip
            within = entry.get("within_budget")
            if within is None:
                within = _within_budgets(validation, {"kl": kl_budget, **(budgets or {})})
            if within is not None:
                record["within_budget"] = bool(within)
            kept = (*_SWEEP_FOLD_KEYS, "params", "within_budget")
            record.update({key: copy.deepcopy(v) for key, v in entry.items() if key not in kept})
            match = next((recs for p, recs in points if p == params), None)
            if match is None:
                points.append((copy.deepcopy(params), [record]))
            else:
                match.append(record)
    out = []
    for params, records in points:
        flags = [r.get("within_budget") for r in records]
        within_all = False if False in flags else (True if flags and all(flags) else None)
        out.append(
            {
                "params": params,
                "validation": _mean_values([r["validation"] for r in records]),
                "test": _mean_values([r["test"] for r in records]),
                "selected_folds": [r["fold"] for r in records if r["selected"]],
                "within_budget": within_all,
                "folds": records,
            }
        )
    return out
