"""Methods: each maps an activation bank (with train/validation rows) to a :class:`Policy`.

``get_method("radiant", margin=15)`` builds one by its id; ids are kebab-case as in the CLI.

The registry names each method's class as ``"module:Class"`` and imports it on first use, so that
the CLI and the run configuration can list and check method ids without importing torch (an unknown
``--methods`` entry is reported in well under a second). The sweep helpers of
:mod:`otguard.methods.grids` (``default_grid``, ``PAPER_PARAMS``, ``parse_variant``) are loaded the
same way; ``Method.fit_grid`` fits one policy per grid point.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from otguard.errors import ConfigError

if TYPE_CHECKING:
    from otguard.activations import ActivationSet
    from otguard.methods.base import Method
    from otguard.methods.baselines import ITI, MeanShift, NoIntervention
    from otguard.methods.grids import PAPER_PARAMS, default_grid, parse_variant
    from otguard.methods.ot import Radiant, Slim
    from otguard.policy import Policy

_REGISTRY: dict[str, str] = {
    "none": "otguard.methods.baselines:NoIntervention",
    "iti": "otguard.methods.baselines:ITI",
    "mean-shift": "otguard.methods.baselines:MeanShift",
    "radiant": "otguard.methods.ot:Radiant",
    "slim": "otguard.methods.ot:Slim",
}
#: The method ids, in registry order (no import of the methods themselves).
METHOD_IDS: tuple[str, ...] = tuple(_REGISTRY)


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class _MethodRegistry(Mapping[str, "type[Method]"]):
    """``METHODS[id]`` is the method's class, imported on first access."""

    def __getitem__(self, name: str) -> type[Method]:
        cls: type[Method] = _load(_REGISTRY[name])
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return f"METHODS({', '.join(_REGISTRY)})"


METHODS: Mapping[str, type[Method]] = _MethodRegistry()


def get_method(name: str, **params: Any) -> Method:
    """Instantiate a method by id; unknown ids or parameters are errors that list the valid ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"Unknown method {name!r}; choose one of {', '.join(METHOD_IDS)}.")
    method = METHODS[name]()
    method.set_params(**params)
    return method


def fit_policy(
    acts: ActivationSet,
    method: str = "slim",
    *,
    train_idx: Any = None,
    val_idx: Any = None,
    val_ratio: float = 0.2,
    split_seed: int = 42,
    **params: Any,
) -> Policy:
    """Fit ``method`` on an activation bank and return its :class:`~otguard.policy.Policy`.

    Without explicit rows, a random ``val_ratio`` of the *groups* (questions) is held out for
    validation (threshold and layer choice) and the rest trains the probes.
    """
    import numpy as np

    if train_idx is None or val_idx is None:
        groups = acts.groups.numpy()
        unique = np.unique(groups)
        rng = np.random.default_rng(split_seed)
        n_val = max(1, int(round(len(unique) * val_ratio)))
        val_groups = rng.choice(unique, size=n_val, replace=False)
        is_val = np.isin(groups, val_groups)
        train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    return get_method(method, **params).fit(acts, train_idx, val_idx).policy_


_CLASSES = {"Method": "otguard.methods.base:Method", "ITI": _REGISTRY["iti"],
            "MeanShift": _REGISTRY["mean-shift"], "NoIntervention": _REGISTRY["none"],
            "Radiant": _REGISTRY["radiant"], "Slim": _REGISTRY["slim"]}  # fmt: skip


_GRIDS = ("KAPPA_GRID", "PAPER", "PAPER_PARAMS", "default_grid", "heads_from_share", "parse_variant")


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return _load(_CLASSES[name])
    if name in _GRIDS:
        return _load(f"otguard.methods.grids:{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ITI", "METHODS", "METHOD_IDS", "PAPER_PARAMS", "MeanShift", "Method", "NoIntervention", "Radiant",
           "Slim", "default_grid", "fit_policy", "get_method", "parse_variant"]  # fmt: skip
