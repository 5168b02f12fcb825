"""The task registry: which evaluation task serves which ``--dataset``.

Adding a task means writing one module with a :class:`~otguard.harness.task.Task` subclass and adding
one line to :data:`TASKS`. Entries are ``"module:Class"`` strings, imported on first use, so that the
configuration can list and check datasets without importing the tasks' evaluation code (and without
an import circle: the tasks import the configuration).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from otguard.errors import ConfigError

if TYPE_CHECKING:
    from otguard.results import RunResults

#: ``--dataset`` value -> the task class that runs it.
TASKS: dict[str, str] = {
    "truthfulqa": "otguard.harness.truthfulqa:TruthfulQATask",
    "truthfulqa-mc2": "otguard.harness.truthfulqa:TruthfulQATask",
    "toxigen": "otguard.harness.toxicity:ToxicityTask",
}

#: ``--dataset`` values of ``otguard compare``.
DATASETS: tuple[str, ...] = tuple(TASKS)


def task_class(dataset: str) -> Any:
    """The task class (a :class:`~otguard.harness.task.Task` subclass) for ``dataset``; an unknown one is a
    :class:`ConfigError` listing the valid ones.

    Typed ``Any`` so that this module needs no import of the task protocol (which names the
    configuration, which looks tasks up here): the registry stays at the bottom of the harness.
    """
    try:
        target = TASKS[dataset]
    except (KeyError, TypeError):
        raise ConfigError(
            f"Unknown dataset {dataset!r} for compare; choose one of {', '.join(TASKS)}."
        ) from None
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def task_by_name(name: str) -> Any:
    """The task class whose :attr:`Task.name` is ``name`` (as recorded in ``results.json``), or None."""
    for dataset in TASKS:
        cls = task_class(dataset)
        if cls.name == name:
            return cls
    return None


def how_to_read(results: RunResults) -> list[tuple[str, str]]:
    """The "how to read this" items of a run's task: (bold lead, text) pairs for the report.

    A format-1 file (no ``task``) gets its task from the metrics, as the report always did; a task
    this otguard does not know gets only the item that explains a table cell.
    """
    if results.task:
        cls = task_by_name(results.task)
        if cls is None:
            from otguard.report.explain import cells_item

            return [cells_item()]
    else:
        cls = task_class("toxigen") if "tox_max" in results.metrics else task_class("truthfulqa")
    items: list[tuple[str, str]] = cls.how_to_read(results)
    return items
