"""Methods: each maps an activation bank (with train/validation rows) to a :class:`Policy`.

``get_method("radiant", margin=15)`` builds one by its id; ids are kebab-case as in the CLI.
"""

from __future__ import annotations

from typing import Any

from otguard.methods.base import Method
from otguard.methods.baselines import ITI, MeanShift, NoIntervention
from otguard.methods.ot import Radiant, Slim

METHODS: dict[str, type[Method]] = {
    "none": NoIntervention,
    "iti": ITI,
    "mean-shift": MeanShift,
    "radiant": Radiant,
    "slim": Slim,
}


def get_method(name: str, **params: Any) -> Method:
    """Instantiate a method by id; unknown ids or parameters are errors that list the valid ones."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}.")
    cls = METHODS[name]
    method = cls()
    method.set_params(**params)
    return method


__all__ = ["ITI", "METHODS", "MeanShift", "Method", "NoIntervention", "Radiant", "Slim", "get_method"]
