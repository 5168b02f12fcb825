"""The task protocol: what the fold loop (:mod:`otguard.harness.run`) asks of an evaluation task.

A task owns everything that is specific to one kind of evaluation, in one module: the data its
detector is trained on and how the folds split it, the held-out items of each fold, how a policy is
evaluated on them, the metric catalogue, the CSV of per-item outputs, the configuration checks and
the "how to read this" text of the report. The fold loop owns what every task shares: fitting the
methods, the CE/KL side effects on natural text, saving each finished (fold, method) result, and
``results.json``.

Life of a task: ``Task(config)`` loads its data and builds its judges (no model yet) ->
:meth:`Task.preflight` contacts any external service once -> :meth:`Task.bind` receives the model ->
per fold :meth:`Task.start_fold`, then per method :meth:`Task.stage3` (SLIM only) and
:meth:`Task.evaluate` (the unsteered model, method ``none``, first: every method's answers are
compared with its answers question by question, see :mod:`otguard.harness.paired`).
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from otguard.harness.paired import ItemValues
from otguard.report.explain import cells_item
from otguard.results import MetricSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from otguard.data import TextDataset
    from otguard.data.splits import Split
    from otguard.harness.config import CompareConfig
    from otguard.policy import Policy
    from otguard.results import RunResults

__all__ = ["SIDE_EFFECT_METRICS", "Evaluation", "StageTimer", "Task", "common_reading"]

# A metric of a method's items against ``none``'s: (item set, per-item metric id, "repair" | "harm").
RepairSpec = tuple[str, str, str]
# A product metric: (item set, first factor's metric id, second factor's metric id).
ProductSpec = tuple[str, str, str]

#: Metrics the fold loop adds for every task: CE/KL on natural text, the detector's flag rate and the
#: edited heads per flagged position.
SIDE_EFFECT_METRICS: dict[str, MetricSpec] = {
    "ce": MetricSpec("CE", False, "side-effects", "nats"),
    "kl": MetricSpec("KL", False, "side-effects", "nats"),
    "flag_rate": MetricSpec("Flag rate", None, "side-effects", "%"),
    "edited_heads": MetricSpec("Edited heads / flagged position", None, "side-effects", ""),
}


@dataclass
class Evaluation:
    """One policy on one fold: metric values, the rows of the task's CSV, per-item values by item set
    (for repair/harm and the paired bootstrap) and facts recorded with the fold (``meta``)."""

    metrics: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    items: dict[str, ItemValues] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class StageTimer:
    """Wall-clock seconds per stage, summed over folds and methods (written to ``results.json``).

    Stages are exclusive: a stage timed inside another (Stage 3 inside fitting) is counted for
    itself only, and its time is taken out of the enclosing stage, so the stages add up to the run.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open stage: seconds spent in stages nested inside it

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        t0 = time.time()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.time() - t0
            inner = self._inner.pop()
            self.seconds[key] = self.seconds.get(key, 0.0) + elapsed - inner
            if self._inner:
                self._inner[-1] += elapsed


def common_reading() -> dict[str, tuple[str, str]]:
    """The "how to read" items every task shares, by key: cells, side effects, differences, flags."""
    return {
        "cells": cells_item(),
        "side_effects": (
            "CE and KL (nats):",
            "measured on natural text with the intervention applied at every position. CE is the "
            "steered model's next-token cross-entropy (compare with the unedited 'none' row); KL is "
            "KL(original ‖ steered) per token. Both are side effects: lower means less damage.",
        ),
        "deltas": (
            "Difference to none:",
            "each method's value minus the unsteered model's, with the 95 % interval of a paired "
            "bootstrap over test items (items resampled within their fold, each paired with the "
            "unsteered model's result on the same item of its fold). A star marks differences whose "
            "interval excludes 0.",
        ),
        "flags": (
            "Flag rate and edited heads:",
            "the share of positions the detector of a gated method (RADIANT, SLIM) flags for repair on "
            "natural text, and how many heads a method edits per flagged position (summed over the "
            "hooked layers; over folds, total edited heads / total flagged positions). A gated method "
            "that flags nearly everything behaves like an ungated one.",
        ),
    }


class Task(ABC):
    """An evaluation task of ``otguard compare``; subclasses live one per module and are registered
    in :data:`otguard.harness.registry.TASKS`.

    Class attributes: ``name`` (``results.json``'s ``task``), ``metrics`` (the catalogue, in table
    order), ``csv_name`` / ``csv_fields`` (the per-item output). Instance attributes set by the
    subclass: ``dataset`` (the detector's training data, split by group into folds), ``judge_name``
    (the judge or scorer named in the report) and, per fold, ``fold_meta`` (facts recorded with
    every method's fold record).
    """

    name: ClassVar[str]
    metrics: ClassVar[dict[str, MetricSpec]]
    csv_name: ClassVar[str]
    csv_fields: ClassVar[tuple[str, ...]]

    dataset: TextDataset
    judge_name: str

    def __init__(
        self, config: CompareConfig, *, progress: bool = True, timer: StageTimer | None = None
    ) -> None:
        self.config = config
        self.progress = progress
        self.timer = timer if timer is not None else StageTimer()
        self.fold = 0
        self.fold_meta: dict[str, Any] = {}
        self._model: PreTrainedModel | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None

    # ---- configuration and set-up ------------------------------------------------------------------

    @classmethod
    def check_config(cls, config: CompareConfig) -> list[str]:
        """Task-specific problems of ``config`` (cheap: no data, no model, no network)."""
        return []

    def preflight(self) -> None:
        """Contact every external service the evaluation will need once, so that a wrong URL or key
        fails now and not after an hour of generation. Offline tasks do nothing."""
        return None

    def bind(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """Give the task the model it evaluates (called once, before the first fold)."""
        self._model, self._tokenizer = model, tokenizer

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            raise RuntimeError("Task.bind(model, tokenizer) must be called before evaluating.")
        return self._model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise RuntimeError("Task.bind(model, tokenizer) must be called before evaluating.")
        return self._tokenizer

    # ---- the fold loop's calls ---------------------------------------------------------------------

    @abstractmethod
    def start_fold(self, fold: int, split: Split) -> None:
        """Pick the fold's held-out items (from ``split.test`` only) and set ``fold_meta``."""

    @abstractmethod
    def stage3(self, policy: Policy) -> Policy:
        """SLIM's Stage 3 (choose κ) on the fold's validation items, or ``policy`` unchanged."""

    @abstractmethod
    def evaluate(self, method: str, policy: Policy | None) -> Evaluation:
        """Evaluate ``policy`` (None: the unedited model) on the fold's held-out items."""

    # ---- sweeps (harness/sweep.py); a task without them runs every method at one point -------------

    #: Whether the task can score grid points on validation data (``validate``) and for the frontier.
    supports_sweep: ClassVar[bool] = False
    #: Whether the task can calibrate gates at the point of use (``calibrate_gates``).
    calibrates_gates: ClassVar[bool] = False
    #: The task's full-run values of the configuration's ``"auto"`` sample sizes, where they differ
    #: from :data:`otguard.harness.config.AUTO_SIZES` (``--limit`` still scales them down).
    auto_sizes: ClassVar[dict[str, int]] = {}

    def validate(
        self, points: dict[str, Policy | None], metrics: dict[str, str]
    ) -> dict[str, dict[str, float]]:
        """Score each policy on the fold's *validation* items: key -> {metric: value} for the metric
        named in ``metrics[key]`` (never on test items)."""
        raise NotImplementedError(f"the {self.name} task does not support sweeps")

    def prepare_test(self, active: dict[str, Policy | None]) -> None:
        """Called once per fold before :meth:`evaluate` with the policy of every method, so that shared
        passes (e.g. MC scoring of all policies at once) run once."""
        return None

    def frontier(self, points: dict[str, Policy | None]) -> dict[str, dict[str, float]]:
        """Test figures of each grid point for the trade-off frontier: key -> {metric: value}."""
        return {}

    def calibrate_gates(self, sweeps: dict[str, Any], max_false_flag_rate: float) -> None:
        """Calibrate the vote thresholds of the gated policies on validation data, in place."""
        raise NotImplementedError(f"the {self.name} task cannot calibrate gates")

    # ---- paired metrics (computed by the fold loop from the items of a method and of ``none``) ------

    def repair_metrics(self) -> dict[str, RepairSpec]:
        """Metric id -> (item set, per-item 0/1 metric, "repair" | "harm"); none by default."""
        return {}

    def product_metrics(self) -> dict[str, ProductSpec]:
        """Metric id -> (item set, a, b) for metrics that are the product of two fold means; none by
        default. Their summary mean is mean(a) x mean(b) over folds, not the mean of per-fold products."""
        return {}

    def metric_specs(self) -> dict[str, MetricSpec]:
        """This run's metric catalogue (labels may name the run's judges); the class catalogue by default."""
        return dict(self.metrics)

    def judges(self) -> dict[str, dict[str, Any]]:
        """The judges and scorers behind the metrics, by role, with their validation figures."""
        return {}

    def examples(
        self, before: list[dict[str, Any]], after: list[dict[str, Any]]
    ) -> dict[str, list[dict[str, Any]]]:
        """Candidate examples by kind ("repaired", "harmed") from the CSV rows of ``none`` (``before``)
        and of a method (``after``) on one fold; the fold loop keeps a seeded few. None by default."""
        return {}

    # ---- the report's text -------------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def how_to_read(cls, results: RunResults) -> list[tuple[str, str]]:
        """The report's "how to read this" items: (bold lead, text) pairs."""
