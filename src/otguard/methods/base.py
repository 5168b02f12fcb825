"""What every method shares: estimator conventions and the inputs of ``fit``.

Methods follow scikit-learn's conventions: keyword-only hyper-parameters stored verbatim,
validation in :meth:`Method.fit`, ``fit`` returns ``self``, fitted state ends in ``_``
(``policy_``, ``detector_``), and :meth:`Method.get_params` round-trips the constructor.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, ClassVar

import numpy as np
import torch

from otguard.activations import ActivationSet
from otguard.errors import ConfigError, DataError, NotFittedError
from otguard.sites import ModelIdentity

logger = logging.getLogger(__name__)


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

    def fit(self, acts: ActivationSet, train_idx: Any, val_idx: Any) -> Method:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"


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
