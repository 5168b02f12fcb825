"""otguard: detect-then-repair attention-head interventions (RADIANT, SLIM) for Hugging Face LMs.

Typical use::

    model, tok = otguard.load_model("smollm2-135m")
    acts = otguard.collect(model, tok, otguard.data.truthfulqa_mc2(data_dir))
    policy = otguard.fit_policy(acts, "slim")
    with policy.attach(model):
        model.generate(...)

The public names are imported on first use (PEP 562), so ``import otguard`` and the CLI's argument
checks do not pay for torch and transformers; ``otguard.load_model`` etc. work as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from otguard.errors import (
    ConfigError,
    DataError,
    ModelLoadError,
    NotFittedError,
    OtguardError,
    PolicyError,
    PolicyMismatchError,
    SolverError,
    UnsupportedArchitectureError,
)
from otguard.io import package_version

__version__ = package_version()

if TYPE_CHECKING:
    from otguard import data
    from otguard.activations import ActivationSet, collect
    from otguard.hook import attached
    from otguard.methods import METHODS, fit_policy, get_method
    from otguard.models import load_model
    from otguard.policy import LayerEdit, Policy, PolicyHandle
    from otguard.sites import find_head_sites, model_identity, register_site, supported_model_types
    from otguard.transport import ChanceLevel, Margin

#: public name -> the module that defines it
_LAZY: dict[str, str] = {
    "ActivationSet": "otguard.activations",
    "collect": "otguard.activations",
    "attached": "otguard.hook",
    "METHODS": "otguard.methods",
    "fit_policy": "otguard.methods",
    "get_method": "otguard.methods",
    "load_model": "otguard.models",
    "LayerEdit": "otguard.policy",
    "Policy": "otguard.policy",
    "PolicyHandle": "otguard.policy",
    "find_head_sites": "otguard.sites",
    "model_identity": "otguard.sites",
    "register_site": "otguard.sites",
    "supported_model_types": "otguard.sites",
    "ChanceLevel": "otguard.transport",
    "Margin": "otguard.transport",
}


def __getattr__(name: str) -> Any:
    if name == "data":
        return importlib.import_module("otguard.data")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'otguard' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"data"})


__all__ = [
    "METHODS",
    "ActivationSet",
    "ChanceLevel",
    "ConfigError",
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
