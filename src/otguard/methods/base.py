"""What every method shares: estimator conventions, the inputs of ``fit``, and grid fitting.

Methods follow scikit-learn's conventions: keyword-only hyper-parameters stored verbatim,
validation in :meth:`Method.fit`, ``fit`` returns ``self``, fitted state ends in ``_``
(``policy_``, ``detector_``), and :meth:`Method.get_params` round-trips the constructor.

:meth:`Method.fit_grid` fits one policy per grid point (a dict of constructor parameters that
override the method's own), for the hyper-parameter sweeps of ``otguard compare``. The base class
refits every point; methods whose expensive part does not depend on some parameters (the probes do
not depend on ITI's ``top_k`` or RADIANT's ``margin``) share it between the points through a cache
(:meth:`Method._fit_rows`), so that each policy equals, tensor for tensor, the one a separate
``fit`` of that point gives. Everything that changes the shared part (the seed included) is in the
cache key, so points that differ there are fitted separately.
"""

from __future__ import annotations

import copy
import inspect
import logging
import weakref
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from otguard.activations import ActivationSet
from otguard.errors import ConfigError, DataError, NotFittedError
from otguard.sites import ModelIdentity

if TYPE_CHECKING:
    from otguard.policy import Policy

logger = logging.getLogger(__name__)

#: What a shared grid fit keeps between points: key (a tuple naming the part and every parameter it
#: depends on) -> the fitted part.
Cache = dict[tuple[Any, ...], Any]


class Rows:
    """The training and validation rows of a bank, split once (on first use) for all the grid points."""

    def __init__(self, acts: ActivationSet, train_idx: Any, val_idx: Any) -> None:
        self.acts = acts
        self.train_idx = train_idx
        self.val_idx = val_idx

    @cached_property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Training activations ``(n, L, H, d)`` float32 and labels ``(n,)``."""
        return split_xy(self.acts, self.train_idx, "training")

    @cached_property
    def val(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation activations and labels."""
        return split_xy(self.acts, self.val_idx, "validation")


class Method:
    """Base class: maps an activation bank (+ train/validation rows) to a :class:`Policy`."""

    name: ClassVar[str] = "base"

    def get_params(self) -> dict[str, Any]:
        """Hyper-parameters as passed to the constructor (they go into the policy JSON)."""
        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self"}

    def set_params(self, **params: Any) -> Method:
        valid = self.get_params()
        for key, value in params.items():
            if key not in valid:
                raise ConfigError(f"{type(self).__name__} has no parameter {key!r}; valid: {sorted(valid)}.")
            setattr(self, key, value)
        return self

    @property
    def policy_(self) -> Any:
        policy = self.__dict__.get("_policy")
        if policy is None:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted yet; call fit(acts, train_idx, val_idx)."
            )
        return policy

    def fit(self, acts: ActivationSet, train_idx: Any, val_idx: Any) -> Method:
        """Fit on ``train_idx``, tune on ``val_idx``; sets ``policy_`` and returns ``self``."""
        if type(self)._fit_rows is Method._fit_rows:  # pragma: no cover - a subclass must define one
            raise NotImplementedError(f"{type(self).__name__} must override fit or _fit_rows.")
        self.check_params(acts)
        cache: Cache = {}
        self._fit_rows(Rows(acts, train_idx, val_idx), cache)
        self._keep_cache(acts, train_idx, val_idx, cache)
        return self

    def fit_grid(
        self, acts: ActivationSet, train_idx: Any, val_idx: Any, grid: Sequence[dict[str, Any]]
    ) -> list[Policy]:
        """One policy per grid point, in grid order; each point's parameters override this method's.

        Every point's names and values are checked before anything is fitted (ConfigError). The parts a
        method shares between points (see the module docstring) are also reused from this instance's
        previous ``fit`` / ``fit_grid`` on the same bank object and the same rows. ``self`` itself is not
        refitted; an empty grid gives an empty list.
        """
        variants = [self.variant(point) for point in grid]
        for variant in variants:
            variant.check_params(acts)
        rows = Rows(acts, train_idx, val_idx)
        cache = self._reusable_cache(acts, train_idx, val_idx)
        policies = []
        for variant in variants:
            variant._fit_rows(rows, cache)
            policies.append(variant.policy_)
        self._keep_cache(acts, train_idx, val_idx, cache)
        return policies

    def variant(self, point: dict[str, Any]) -> Method:
        """An unfitted copy of this method with ``point``'s parameters (unknown names: ConfigError)."""
        if not isinstance(point, dict):
            raise ConfigError(
                f"A grid point must be a dict of parameters, e.g. {{'strength': 2.0}}; got {point!r}."
            )
        clone = type(self)(**copy.deepcopy(self.get_params()))
        clone.set_params(**copy.deepcopy(point))
        return clone

    def check_params(self, acts: ActivationSet) -> None:
        """Check the hyper-parameter values against the bank (ConfigError); nothing by default."""

    def _fit_rows(self, rows: Rows, cache: Cache) -> None:
        """Fit on ``rows``, reusing and filling ``cache``; sets ``self._policy``.

        Methods that share work between grid points override this (and not ``fit``); the default,
        for subclasses that only override ``fit``, refits the point from scratch.
        """
        self.fit(rows.acts, rows.train_idx, rows.val_idx)

    # The cache of the last fit, keyed by the bank object (a weak reference: it does not keep the
    # activations alive) and copies of the row indices.
    def _keep_cache(self, acts: ActivationSet, train_idx: Any, val_idx: Any, cache: Cache) -> None:
        try:
            ref = weakref.ref(acts)
        except TypeError:  # pragma: no cover - ActivationSet supports weak references
            return
        self.__dict__["_grid_cache"] = (ref, _index_copy(train_idx), _index_copy(val_idx), cache)

    def _reusable_cache(self, acts: ActivationSet, train_idx: Any, val_idx: Any) -> Cache:
        kept = self.__dict__.get("_grid_cache")
        if kept is not None:
            ref, train, val, cache = kept
            if (ref() is acts and np.array_equal(train, _index_copy(train_idx))
                    and np.array_equal(val, _index_copy(val_idx))):  # fmt: skip
                return dict(cache)
        return {}

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


def _index_copy(idx: Any) -> np.ndarray:
    return np.array(idx if idx is not None else [], copy=True)


def check_real(owner: str, name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = True, example: str = "") -> float:  # fmt: skip
    """``value`` as a finite float within the bounds, else a one-line ConfigError naming the parameter."""
    import math

    bad = isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating)
    number = float(value) if not bad else math.nan
    if not bad and math.isfinite(number):
        below = low is not None and (number <= low if low_open else number < low)
        above = high is not None and number > high
        if not (below or above):
            return number
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    want = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    hint = f" (e.g. {example})" if example else ""
    raise ConfigError(f"{owner} {name} must be {want}{hint}; got {value!r}.")


def check_int(owner: str, name: str, value: Any, *, low: int, example: str = "") -> int:
    """``value`` as an int >= ``low`` (integral floats such as 48.0 accepted), else a ConfigError."""
    ok = not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)
    if ok and float(value).is_integer() and int(value) >= low:
        return int(value)
    hint = f" (e.g. {example})" if example else ""
    raise ConfigError(f"{owner} {name} must be an integer >= {low}{hint}; got {value!r}.")


def split_xy(acts: ActivationSet, idx: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``idx`` of the bank as float32 activations ``(n, L, H, d)`` and labels ``(n,)``."""
    index = torch.as_tensor(np.asarray(idx), dtype=torch.long)
    if index.numel() == 0:
        raise DataError(f"The {what} split is empty; use more data or a different split.")
    y = acts.labels[index]
    if bool((y < 0).any()):
        raise DataError(f"The {what} split has unlabelled rows (label -1); methods need labels 0/1.")
    return acts.acts[index].float(), y.long()


def check_two_classes(y: torch.Tensor, what: str) -> None:
    """A detector needs both classes; say which one is missing and what to do."""
    n1 = int(y.sum())
    n0 = int(y.numel()) - n1
    if n0 == 0 or n1 == 0:
        missing = "desirable (label 0)" if n0 == 0 else "undesirable (label 1)"
        raise DataError(
            f"The {what} data has {y.numel()} examples but no {missing} ones; the detector needs both "
            "classes. Use more data (e.g. a larger --limit) or check the labels."
        )


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(..., d)`` and maximum-likelihood covariance ``(..., d, d)`` of ``x: (n, ..., d)``, float64."""
    x = x.double()
    mu = x.mean(0)
    centred = x - mu
    cov = torch.einsum("n...i,n...j->...ij", centred, centred) / x.shape[0]
    return mu, cov


def bank_identity(acts: ActivationSet) -> ModelIdentity:
    """The model identity recorded with the activations (a shape-only stand-in for bare tensors)."""
    return acts.model or ModelIdentity(
        "unknown", "unknown", acts.n_layers, acts.n_heads, acts.n_heads, acts.head_dim,
        acts.n_heads * acts.head_dim, "",
    )  # fmt: skip


def head_accuracy(
    method: Any, x_tr: torch.Tensor, y_tr: torch.Tensor, x_va: torch.Tensor, y_va: torch.Tensor
) -> torch.Tensor:
    """Validation accuracy ``(L, H)`` of logistic (BCE) probes on every head, to rank heads or layers."""
    from otguard.probes import train_probes

    check_two_classes(y_va, "validation")
    bank = train_probes(x_tr, y_tr, x_va, y_va, loss="bce", epochs=method.epochs, lr=method.lr,
                        seed=method.seed, device=method.device, progress=method.progress)  # fmt: skip
    return bank.head_metrics(x_va, y_va)["accuracy"].cpu()
