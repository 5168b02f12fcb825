"""Baselines fitted and applied through the same policy machinery: none, ITI, mean shift.

They are *always-on* policies (no detector gate, ``threshold=None``) with a pure shift
``a <- a + b`` on selected heads, so the evaluation harness treats every method alike.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from otguard.activations import ActivationSet
from otguard.methods.base import Method, bank_identity, check_two_classes, head_accuracy, split_xy
from otguard.policy import LayerEdit, Policy

logger = logging.getLogger(__name__)


def _shift_edits(shifts: torch.Tensor, mask: torch.Tensor) -> list[LayerEdit]:
    """One ungated shift edit per layer that has a selected head. ``shifts (L, H, d)``, ``mask (L, H)``."""
    _, H, d = shifts.shape
    edits = []
    for layer in torch.nonzero(mask.any(-1)).flatten().tolist():
        edits.append(
            LayerEdit(
                layer=layer,
                probe_weight=torch.zeros(H, d),
                probe_bias=torch.zeros(H),
                threshold=None,
                head_mask=mask[layer].clone(),
                b=(shifts[layer] * mask[layer, :, None]).float(),
            )
        )
    return edits


def _class_direction(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mass-mean direction from the undesirable to the desirable class, ``(L, H, d)``, float64."""
    x = x.double()
    return x[y == 0].mean(0) - x[y == 1].mean(0)


class NoIntervention(Method):
    """The unintervened model, as a policy with no edits (so the harness runs it like the others)."""

    name = "none"

    def __init__(self) -> None:
        pass

    def fit(self, acts: ActivationSet, train_idx: Any = None, val_idx: Any = None) -> NoIntervention:
        self._policy = Policy(method=self.name, rule="shift", layers=[], model=bank_identity(acts), params={})
        return self


class ITI(Method):
    """Inference-time intervention (Li et al. 2023): top-K heads by probe accuracy, α·σ mass-mean shift.

    Probes are logistic (BCE) per head, trained on the training rows and ranked by validation
    accuracy over all layers; each of the ``top_k`` chosen heads is shifted by
    ``strength * std(a·v) * v`` with ``v`` the unit mass-mean direction from undesirable to desirable
    training activations and ``std`` the population standard deviation (ddof 0, as ITI's ``np.std``)
    of all training activations of that head projected on ``v``.
    """

    name = "iti"

    def __init__(
        self,
        *,
        top_k: int = 48,
        strength: float = 15.0,
        epochs: int = 300,
        lr: float = 2e-2,
        seed: int = 0,
        device: str | None = None,
        progress: bool = True,
    ) -> None:
        self.top_k = top_k
        self.strength = strength
        self.epochs = epochs
        self.lr = lr
        self.seed = seed
        self.device = device
        self.progress = progress

    def fit(self, acts: ActivationSet, train_idx: Any, val_idx: Any) -> ITI:
        x_tr, y_tr = split_xy(acts, train_idx, "training")
        x_va, y_va = split_xy(acts, val_idx, "validation")
        check_two_classes(y_tr, "training")
        accuracy = head_accuracy(self, x_tr, y_tr, x_va, y_va)  # (L, H)
        L, H = accuracy.shape
        k = min(int(self.top_k), L * H)
        top = torch.topk(accuracy.flatten(), k).indices
        mask = torch.zeros(L * H, dtype=torch.bool)
        mask[top] = True
        mask = mask.view(L, H)
        direction = _class_direction(x_tr, y_tr)
        unit = direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        # Population std (ddof 0) of the training activations along the direction, as ITI's np.std.
        sigma = torch.einsum("nlhd,lhd->nlh", x_tr.double(), unit).std(0, correction=0)  # (L, H)
        shifts = self.strength * sigma[..., None] * unit
        self._policy = Policy(
            method=self.name, rule="shift", layers=_shift_edits(shifts, mask), model=bank_identity(acts),
            params=self.get_params(),
            meta={"heads": [[int(i // H), int(i % H)] for i in top.tolist()],
                  "val_accuracy": accuracy[mask].tolist()},
        )  # fmt: skip
        return self


class MeanShift(Method):
    """Shift every head of one layer by ``strength`` times the class-mean difference.

    The layer is the one whose heads separate the classes best on validation data (mean probe
    accuracy), unless ``layer`` is given.
    """

    name = "mean-shift"

    def __init__(
        self,
        *,
        strength: float = 1.0,
        layer: int | None = None,
        epochs: int = 300,
        lr: float = 2e-2,
        seed: int = 0,
        device: str | None = None,
        progress: bool = True,
    ) -> None:
        self.strength = strength
        self.layer = layer
        self.epochs = epochs
        self.lr = lr
        self.seed = seed
        self.device = device
        self.progress = progress

    def fit(self, acts: ActivationSet, train_idx: Any, val_idx: Any) -> MeanShift:
        x_tr, y_tr = split_xy(acts, train_idx, "training")
        check_two_classes(y_tr, "training")
        layer = self.layer
        if layer is None:
            x_va, y_va = split_xy(acts, val_idx, "validation")
            layer = int(head_accuracy(self, x_tr, y_tr, x_va, y_va).mean(-1).argmax())
        if not 0 <= layer < acts.n_layers:
            raise ValueError(f"layer must be in 0..{acts.n_layers - 1}, got {layer}.")
        shifts = torch.zeros(acts.n_layers, acts.n_heads, acts.head_dim, dtype=torch.float64)
        shifts[layer] = self.strength * _class_direction(x_tr[:, layer : layer + 1], y_tr)[0]
        mask = torch.zeros(acts.n_layers, acts.n_heads, dtype=torch.bool)
        mask[layer] = True
        self._policy = Policy(
            method=self.name,
            rule="shift",
            layers=_shift_edits(shifts, mask),
            model=bank_identity(acts),
            params=self.get_params(),
            meta={"layer": layer},
        )
        return self
