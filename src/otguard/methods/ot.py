"""RADIANT and SLIM: a risk-aware probe ensemble gates head-wise Gaussian optimal-transport maps.

Both fit Stage 1 (one probe per head of every layer, a vote threshold per layer, the best layer on
validation data) and Stage 2 (for each head of the chosen layer, the closest Gaussian that the
head's probe calls desirable with high probability, and the OT map onto it). They differ as the
papers' current code does (docs/method.md §2–§4, §7):

============== ====================================== ======================================
               RADIANT                                SLIM
============== ====================================== ======================================
alpha          :class:`Margin` (default 15)           :class:`ChanceLevel` (gamma = 0.1)
constraint     S ⪰ Σ_ref^{1/2} (desirable covariance) none
threshold      lowest validation FPR + bl·FNR (both)  lowest validation FPR + bl·FNR
layer choice   mean per-head validation loss          ensemble validation loss
moments from   training rows                          training + validation rows
               (rows the head's own probe flags)      (rows the head's own probe flags)
source cov     OAS-shrunk (``cov_shrinkage``)         OAS-shrunk (``cov_shrinkage``)
edit rule      replace: a <- A a + b                  a <- a + κ·p·(A a + b - a)
============== ====================================== ======================================

RADIANT's published threshold rule ("lowest validation FNR, ties by loss", ``threshold_rule="radiant"``)
is available but not the default: it returns the largest τ with zero validation FNR, and since τ = 0
(flag everything) always has zero FNR it degenerates to an always-on edit whenever a single
undesirable validation example gets no vote (docs/method.md §8 item 4; on SmolLM2 + TruthfulQA fold 0 it
chose τ = 0, FPR 1.0). ``threshold_rule="slim"`` (the default for both) minimises FPR + bl·FNR
instead; raise ``fnr_weight`` (bl) to trade false positives for misses as the paper intends.

``cov_shrinkage="none"`` keeps the papers' plain ML covariance of the flagged rows; the default
``"oas"`` shrinks it toward a scaled identity with a deterministic intensity that falls like 1/n
(:func:`otguard.transport.shrink_covariance`), because a head with a few flagged rows in d = 64
otherwise gets a near-singular Σ̂ and an OT map with a norm in the hundreds.

Stage 3 of SLIM (choosing κ on semantic preference data) lives in :mod:`otguard.methods.stage3`.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import torch

from otguard.activations import ActivationSet
from otguard.errors import ConfigError, DataError
from otguard.methods.base import Method, bank_identity, check_two_classes, split_xy
from otguard.policy import EditRule, LayerEdit, Policy
from otguard.probes import fit_detector
from otguard.transport import ChanceLevel, Margin, fit_head_maps, guarantee_rate, shrink_covariance

logger = logging.getLogger(__name__)

# Fewer flagged rows than this: no usable Gaussian, the head is left unedited. Few rows (d = 64 on
# SmolLM2) make the ML covariance singular; ``cov_shrinkage="oas"`` (the default) shrinks it toward a
# scaled identity so that the OT map stays well conditioned (see transport.shrink_covariance).
MIN_SOURCE_ROWS = 4
COV_SHRINKAGE = ("oas", "none")


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head mean and ML covariance over the rows where ``mask`` is set.

    ``x: (n, H, d)``, ``mask: (n, H)`` -> ``mu (H, d)``, ``cov (H, d, d)``, ``count (H,)``; float64.
    """
    x = x.double()
    m = mask.double()
    count = m.sum(0)
    safe = count.clamp(min=1)
    mu = torch.einsum("nh,nhd->hd", m, x) / safe[:, None]
    centred = (x - mu) * m[..., None]
    cov = torch.einsum("nhi,nhj->hij", centred, centred) / safe[:, None, None]
    return mu, cov, count


class _OTMethod(Method):
    """Stage 1 + Stage 2, shared by RADIANT and SLIM; subclasses fix the variant."""

    rule: ClassVar[EditRule]
    moments_from_val: ClassVar[bool]
    use_ref_cov: ClassVar[bool]
    # Hyper-parameters both subclasses take (set in their constructors).
    fnr_weight: float
    loss: Any
    threshold_rule: Any
    layer_criterion: Any
    layers: list[int] | None
    cov_shrinkage: str
    epochs: int
    lr: float
    seed: int
    device: str | None
    progress: bool

    def _alpha(self) -> ChanceLevel | Margin:  # pragma: no cover
        raise NotImplementedError

    def _kappa(self) -> float:
        return 1.0

    def fit(self, acts: ActivationSet, train_idx: Any, val_idx: Any) -> _OTMethod:
        """Fit the detector on ``train_idx``, tune it on ``val_idx``, and fit the head maps."""
        alpha = self._alpha()
        if self.cov_shrinkage not in COV_SHRINKAGE:
            raise ConfigError(
                f"cov_shrinkage must be one of {', '.join(COV_SHRINKAGE)}; got {self.cov_shrinkage!r}."
            )
        x_tr, y_tr = split_xy(acts, train_idx, "training")
        x_va, y_va = split_xy(acts, val_idx, "validation")
        check_two_classes(y_tr, "training")
        check_two_classes(y_va, "validation")
        detector = fit_detector(
            x_tr, y_tr, x_va, y_va,
            fnr_weight=self.fnr_weight, loss=self.loss, threshold_rule=self.threshold_rule,
            layer_criterion=self.layer_criterion, layers=self.layers, epochs=self.epochs, lr=self.lr,
            seed=self.seed, progress=self.progress, device=self.device,
        )  # fmt: skip
        layer = int(detector.layer)
        threshold = int(detector.thresholds[layer])
        theta = detector.bank.weight[layer].detach().double().cpu()  # (H, d)
        theta0 = detector.bank.bias[layer].detach().double().cpu()  # (H,)

        if self.moments_from_val:
            x_src = torch.cat([x_tr[:, layer], x_va[:, layer]])
        else:
            x_src = x_tr[:, layer]
        votes = (torch.einsum("nhd,hd->nh", x_src.double(), theta) + theta0) > 0
        mu_hat, sigma_hat, count = masked_moments(x_src, votes)
        usable = count >= MIN_SOURCE_ROWS
        if not bool(usable.any()):
            raise DataError(
                f"No head of layer {layer} has {MIN_SOURCE_ROWS}+ training rows that its probe calls "
                "undesirable, so there is nothing to transport. Use more data."
            )
        for h in torch.nonzero(~usable).flatten().tolist():
            logger.warning("Layer %d head %d: only %d flagged rows; left unedited.", layer, h, int(count[h]))
        # The source covariance is shrunk before Stage 2; fit_head_maps then uses that one matrix for
        # both the projection and the OT map.
        if self.cov_shrinkage == "oas":
            sigma_hat, shrinkage = shrink_covariance(sigma_hat, count.clamp(min=1))
        else:
            shrinkage = torch.zeros_like(count)
        # Unusable heads get a harmless stand-in problem (their edits are masked out below).
        eye = torch.eye(x_src.shape[-1], dtype=torch.float64)
        sigma_hat = torch.where(usable[:, None, None], sigma_hat, eye)
        ref_cov = None
        if self.use_ref_cov:
            desirable = x_tr[:, layer][y_tr == 0]
            ref_mu = desirable.double().mean(0)
            centred = desirable.double() - ref_mu
            ref_cov = torch.einsum("nhi,nhj->hij", centred, centred) / desirable.shape[0]
        result = fit_head_maps(mu_hat, sigma_hat, theta, theta0, alpha, ref_cov=ref_cov)
        A = torch.where(usable[:, None, None], result.A, eye).float()
        b = torch.where(usable[:, None], result.b, torch.zeros_like(result.b)).float()

        # Guarantee check on held-out flagged validation rows: share called desirable after the map.
        x_val_l = x_va[:, layer].double()
        val_votes = (torch.einsum("nhd,hd->nh", x_val_l, theta) + theta0) > 0
        rate_t = guarantee_rate(x_val_l, result.A, result.b, theta, theta0, mask=val_votes & usable)
        rates = [float(r) for r in rate_t]

        edit = LayerEdit(
            layer=layer,
            probe_weight=theta.float(),
            probe_bias=theta0.float(),
            threshold=threshold,
            head_mask=usable,
            b=b,
            A=A,
        )
        identity = bank_identity(acts)
        meta = {
            "data_fingerprint": acts.meta.get("data_fingerprint"),
            "dataset": acts.meta.get("dataset"),
            "n_train": int(len(y_tr)),
            "n_val": int(len(y_va)),
            "layer": layer,
            "threshold": threshold,
            "alpha_multiplier": alpha.multiplier,
            "transport_cases": result.case.tolist(),
            "source_rows": count.long().tolist(),
            "cov_shrinkage": [float(v) if ok else None for v, ok in zip(shrinkage, usable, strict=True)],
            "guarantee_rate_val": _nan_to_none(rates),
            "detector_val": detector.report.to_dict(),
        }
        self.detector_ = detector
        self.transport_ = result
        self._policy = Policy(
            method=self.name, rule=self.rule, layers=[edit], model=identity,
            params=self.get_params(), kappa=self._kappa(), meta=meta,
        )  # fmt: skip
        logger.info(
            "%s: layer %d, tau %d, val FPR %.3f FNR %.3f",
            self.name,
            layer,
            threshold,
            float(detector.report.fpr[layer]),
            float(detector.report.fnr[layer]),
        )
        return self


class Radiant(_OTMethod):
    """RADIANT (arXiv 2501.15758, authors' current variant): margin α, reference covariance, replace."""

    name = "radiant"
    rule = "replace"
    moments_from_val = False
    use_ref_cov = True

    def __init__(
        self,
        *,
        margin: float = 15.0,
        fnr_weight: float = 1.0,
        loss: str = "risk",
        threshold_rule: str = "slim",
        layer_criterion: str = "mean-head-loss",
        layers: list[int] | None = None,
        cov_shrinkage: str = "oas",
        epochs: int = 1000,
        lr: float = 2e-3,
        seed: int = 0,
        device: str | None = None,
        progress: bool = True,
    ) -> None:
        self.margin = margin
        self.fnr_weight = fnr_weight
        self.loss = loss
        self.threshold_rule = threshold_rule
        self.layer_criterion = layer_criterion
        self.layers = layers
        self.cov_shrinkage = cov_shrinkage
        self.epochs = epochs
        self.lr = lr
        self.seed = seed
        self.device = device
        self.progress = progress

    def _alpha(self) -> Margin:
        return Margin(float(self.margin))


class Slim(_OTMethod):
    """SLIM: chance level γ, no reference constraint, κ·p-weighted edits (κ tuned by Stage 3)."""

    name = "slim"
    rule = "kappa-p"
    moments_from_val = True
    use_ref_cov = False

    def __init__(
        self,
        *,
        gamma: float = 0.1,
        kappa: float = 20.0,
        fnr_weight: float = 1.0,
        loss: str = "risk",
        threshold_rule: str = "slim",
        layer_criterion: str = "loss",
        layers: list[int] | None = None,
        cov_shrinkage: str = "oas",
        epochs: int = 1000,
        lr: float = 2e-3,
        seed: int = 0,
        device: str | None = None,
        progress: bool = True,
    ) -> None:
        self.gamma = gamma
        self.kappa = kappa
        self.fnr_weight = fnr_weight
        self.loss = loss
        self.threshold_rule = threshold_rule
        self.layer_criterion = layer_criterion
        self.layers = layers
        self.cov_shrinkage = cov_shrinkage
        self.epochs = epochs
        self.lr = lr
        self.seed = seed
        self.device = device
        self.progress = progress

    def _alpha(self) -> ChanceLevel:
        return ChanceLevel(float(self.gamma))

    def _kappa(self) -> float:
        return float(self.kappa)


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if np.isnan(v) else v for v in values]
