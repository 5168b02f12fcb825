"""otguard: detect-then-repair attention-head interventions (RADIANT, SLIM) for Hugging Face LMs.

Typical use::

    model, tok = otguard.load_model("smollm2-135m")
    acts = otguard.collect(model, tok, otguard.data.truthfulqa_mc2(data_dir))
    policy = otguard.fit_policy(acts, "slim")
    with policy.attach(model):
        model.generate(...)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from otguard.io import package_version

__version__ = package_version()

from otguard import data  # noqa: E402
from otguard.activations import ActivationSet, collect  # noqa: E402
from otguard.errors import (  # noqa: E402
    DataError,
    ModelLoadError,
    NotFittedError,
    OtguardError,
    PolicyError,
    PolicyMismatchError,
    SolverError,
    UnsupportedArchitectureError,
)
from otguard.methods import METHODS, get_method  # noqa: E402
from otguard.models import load_model  # noqa: E402
from otguard.hook import attached  # noqa: E402
from otguard.policy import LayerEdit, Policy, PolicyHandle  # noqa: E402
from otguard.sites import find_head_sites, model_identity, register_site, supported_model_types  # noqa: E402
from otguard.transport import ChanceLevel, Margin  # noqa: E402


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
    """Fit ``method`` on an activation bank and return its :class:`Policy`.

    Without explicit rows, a random ``val_ratio`` of the *groups* (questions) is held out for
    validation (threshold and layer choice) and the rest trains the probes.
    """
    if train_idx is None or val_idx is None:
        groups = acts.groups.numpy()
        unique = np.unique(groups)
        rng = np.random.default_rng(split_seed)
        n_val = max(1, int(round(len(unique) * val_ratio)))
        val_groups = rng.choice(unique, size=n_val, replace=False)
        is_val = np.isin(groups, val_groups)
        train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    return get_method(method, **params).fit(acts, train_idx, val_idx).policy_


__all__ = [
    "METHODS",
    "ActivationSet",
    "ChanceLevel",
    "DataError",
    "LayerEdit",
    "Margin",
    "ModelLoadError",
    "NotFittedError",
    "OtguardError",
    "Policy",
    "PolicyError",
    "PolicyHandle",
    "PolicyMismatchError",
    "SolverError",
    "UnsupportedArchitectureError",
    "__version__",
    "attached",
    "collect",
    "data",
    "find_head_sites",
    "fit_policy",
    "get_method",
    "load_model",
    "model_identity",
    "register_site",
    "supported_model_types",
]
