"""The evaluation harness behind ``otguard compare`` and ``otguard rescore``.

One home per concept:

- :mod:`~otguard.harness.config`: the run configuration, validated before any model work;
- :mod:`~otguard.harness.registry`: which task serves which ``--dataset`` (one line per task);
- :mod:`~otguard.harness.task`: the task protocol (folds, evaluation, metric catalogue, CSV, report text);
- :mod:`~otguard.harness.truthfulqa`, :mod:`~otguard.harness.toxicity`: the two tasks;
- :mod:`~otguard.harness.judges`: the judges of a TruthfulQA run, named and described;
- :mod:`~otguard.harness.paired`: per-question comparisons with ``none`` (repair/harm, paired bootstrap);
- :mod:`~otguard.harness.summary`: a method's summaries in ``results.json`` from the saved results;
- :mod:`~otguard.harness.resume`: each finished (fold, method) result saved at once, runs resumed;
- :mod:`~otguard.harness.run`: the fold loop and ``results.json`` (:mod:`otguard.results`);
- :mod:`~otguard.harness.rescore`: a toxicity run's continuations scored again.

Names are imported on first use, so that ``import otguard.harness.task`` (for the report's text)
does not import the fold loop.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from otguard.harness.config import CompareConfig
    from otguard.harness.registry import DATASETS
    from otguard.harness.rescore import rescore_toxicity
    from otguard.harness.run import CompareRun, run_compare

__all__ = ["DATASETS", "CompareConfig", "CompareRun", "rescore_toxicity", "run_compare"]

_EXPORTS = {
    "CompareConfig": "otguard.harness.config",
    "DATASETS": "otguard.harness.registry",
    "CompareRun": "otguard.harness.run",
    "run_compare": "otguard.harness.run",
    "rescore_toxicity": "otguard.harness.rescore",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'otguard.harness' has no attribute {name!r}")
