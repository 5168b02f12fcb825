"""Baselines fitted and applied through the same policy machinery: none, ITI, mean shift.

They are *always-on* policies (no detector gate, ``threshold=None``) with a pure shift
``a <- a + b`` on selected heads, so the evaluation harness treats every method alike.

Grid fits (:meth:`Method.fit_grid`) share what does not depend on the swept parameters: ITI's probes,
head ranking, directions and standard deviations (``top_k`` / ``head_share`` / ``strength`` only pick
and scale), mean shift's probes and class-mean differences (``strength`` only scales).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from otguard.activations import ActivationSet
from otguard.errors import ConfigError
from otguard.methods.base import (
    Cache,
    Method,
    Rows,
    bank_identity,
    check_int,
    check_real,
    check_two_classes,
    head_accuracy,
)
from otguard.methods.grids import heads_from_share
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
        super().fit(acts, train_idx, val_idx)
        return self

    def _fit_rows(self, rows: Rows, cache: Cache) -> None:
        self._policy = Policy(
            method=self.name, rule="shift", layers=[], model=bank_identity(rows.acts), params={}
        )


def _probe_key(method: Any) -> tuple[Any, ...]:
    """Cache key of :func:`head_accuracy`: every parameter its probes depend on (not ``progress``)."""
    return ("head-accuracy", method.epochs, method.lr, method.seed, method.device)


class ITI(Method):
    """Inference-time intervention (Li et al. 2023): top-K heads by probe accuracy, α·σ mass-mean shift.

    Probes are logistic (BCE) per head, trained on the training rows and ranked by validation
    accuracy over all layers; each of the K chosen heads is shifted by
    ``strength * std(a·v) * v`` with ``v`` the unit mass-mean direction from undesirable to desirable
    training activations and ``std`` the population standard deviation (ddof 0, as ITI's ``np.std``)
    of all training activations of that head projected on ``v``.

    K is ``top_k`` (the paper's 48), or, when ``head_share`` is given, that share of all L·H heads,
    ``max(1, round(head_share * L * H))`` rounded half up: 48 heads are 4.7 % of LLaMA-7B's 1,024 but
    18 % of SmolLM2-135M's 270, so a share carries the paper's setting across model sizes. The policy's
    ``meta["top_k"]`` records the K used.
    """

    name = "iti"

    def __init__(
        self,
        *,
        top_k: int = 48,
        head_share: float | None = None,
        strength: float = 15.0,
        epochs: int = 300,
        lr: float = 2e-2,
        seed: int = 0,
        device: str | None = None,
        progress: bool = True,
    ) -> None:
        self.top_k = top_k
        self.head_share = head_share
        self.strength = strength
        self.epochs = epochs
        self.lr = lr
        self.seed = seed
        self.device = device
        self.progress = progress

    def check_params(self, acts: ActivationSet) -> None:
        check_int("ITI", "top_k", self.top_k, low=1, example="48")
        if self.head_share is not None:
            check_real("ITI", "head_share", self.head_share, low=0.0, high=1.0, example="0.05; None: top_k")
        check_real("ITI", "strength", self.strength, example="5.0")

    def n_heads_edited(self, n_layers: int, n_heads: int) -> int:
        """K, the number of heads shifted on a model with ``n_layers`` x ``n_heads`` heads."""
        if self.head_share is not None:
            return heads_from_share(float(self.head_share), n_layers, n_heads)
        return min(int(self.top_k), n_layers * n_heads)

    def _fit_rows(self, rows: Rows, cache: Cache) -> None:
        x_tr, y_tr = rows.train
        x_va, y_va = rows.val
        check_two_classes(y_tr, "training")
        key = _probe_key(self)
        if key not in cache:
            cache[key] = head_accuracy(self, x_tr, y_tr, x_va, y_va)  # (L, H)
        accuracy = cache[key]
        if ("iti-direction",) not in cache:
            direction = _class_direction(x_tr, y_tr)
            unit = direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            # Population std (ddof 0) of the training activations along the direction, as ITI's np.std.
            sigma = torch.einsum("nlhd,lhd->nlh", x_tr.double(), unit).std(0, correction=0)  # (L, H)
            cache[("iti-direction",)] = (unit, sigma)
        unit, sigma = cache[("iti-direction",)]
        L, H = accuracy.shape
        k = self.n_heads_edited(L, H)
        top = torch.topk(accuracy.flatten(), k).indices
        mask = torch.zeros(L * H, dtype=torch.bool)
        mask[top] = True
        mask = mask.view(L, H)
        shifts = self.strength * sigma[..., None] * unit
        self._policy = Policy(
            method=self.name, rule="shift", layers=_shift_edits(shifts, mask), model=bank_identity(rows.acts),
            params=self.get_params(),
            meta={"heads": [[int(i // H), int(i % H)] for i in top.tolist()],
                  "val_accuracy": accuracy[mask].tolist(), "top_k": k},
        )  # fmt: skip


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

    def check_params(self, acts: ActivationSet) -> None:
        check_real("MeanShift", "strength", self.strength, example="1.0")
        if self.layer is not None:
            layer = check_int("MeanShift", "layer", self.layer, low=0, example="0, or None to choose it")
            if layer >= acts.n_layers:
                raise ConfigError(
                    f"MeanShift layer must be in 0..{acts.n_layers - 1} (or None to choose it); got {layer}."
                )

    def _fit_rows(self, rows: Rows, cache: Cache) -> None:
        acts = rows.acts
        x_tr, y_tr = rows.train
        check_two_classes(y_tr, "training")
        layer = self.layer
        if layer is None:
            x_va, y_va = rows.val
            key = _probe_key(self)
            if key not in cache:
                cache[key] = head_accuracy(self, x_tr, y_tr, x_va, y_va)
            layer = int(cache[key].mean(-1).argmax())
        layer = int(layer)
        if ("class-direction", layer) not in cache:
            cache[("class-direction", layer)] = _class_direction(x_tr[:, layer : layer + 1], y_tr)[0]
        shifts = torch.zeros(acts.n_layers, acts.n_heads, acts.head_dim, dtype=torch.float64)
        shifts[layer] = self.strength * cache[("class-direction", layer)]
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
