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

RADIANT's layer sweep (docs/method.md §2.5): ``Radiant(layer_sweep=2)`` records the two best layers by
mean head loss in ``candidate_layers_``; a fit with ``layers=[l]`` edits layer ``l`` (the probes of every
layer are always trained; ``layers`` only restricts the choice), and the harness keeps the candidate
with the best validation truthfulness.

``fit_grid`` shares Stage 1 (probes once per probe setting, thresholds once per rule) and Stage 2 (once
per layer, α and shrinkage) between grid points; each policy equals a separate ``fit``.

Stage 3 of SLIM (choosing κ on semantic preference data) lives in :mod:`otguard.methods.stage3`.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import torch

from otguard.activations import ActivationSet
from otguard.errors import ConfigError, DataError
from otguard.methods.base import Cache, Method, Rows, bank_identity, check_int, check_two_classes
from otguard.policy import EditRule, LayerEdit, Policy
from otguard.probes import Detector, choose_layer, ensemble_metrics, fit_detector, select_thresholds
from otguard.transport import ChanceLevel, Margin, fit_head_maps, guarantee_rate, shrink_covariance

logger = logging.getLogger(__name__)

# Fewer flagged rows than this: no usable Gaussian, the head is left unedited. Few rows (d = 64 on
# SmolLM2) make the ML covariance singular; ``cov_shrinkage="oas"`` (the default) shrinks it toward a
# scaled identity so that the OT map stays well conditioned (see transport.shrink_covariance).
MIN_SOURCE_ROWS = 4
COV_SHRINKAGE = ("oas", "none")
THRESHOLD_RULES = ("slim", "radiant")
LAYER_CRITERIA = ("loss", "mean-head-loss")
_TIE_TOL = 1e-12  # as otguard.probes: layer scores closer than this are ties (the earlier layer wins)


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


def _first_best(score: torch.Tensor, candidates: list[int], n: int) -> list[int]:
    """The ``n`` candidates with the lowest score, best first; within ``_TIE_TOL`` the earlier layer wins
    (the rule of :func:`otguard.probes.choose_layer`, applied again to what is left)."""
    left = list(candidates)
    out: list[int] = []
    while left and len(out) < n:
        values = [float(score[layer]) for layer in left]
        low = min(values)
        pick = next(layer for layer, v in zip(left, values, strict=True) if v <= low + _TIE_TOL)
        out.append(pick)
        left.remove(pick)
    return out


class _OTMethod(Method):
    """Stage 1 + Stage 2, shared by RADIANT and SLIM; subclasses fix the variant.

    Grid fits share Stage 1 between points: the probes once per probe setting (``fnr_weight``, ``loss``,
    ``epochs``, ``lr``, ``seed``, ``device``), the vote thresholds once per ``threshold_rule``, the layer
    choice per ``layers`` / ``layer_criterion``; and Stage 2 once per (layer, α, ``cov_shrinkage``), so
    SLIM's κ points share everything but the policy's κ.
    """

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

    def _layer_sweep(self) -> int:
        return 1

    def check_params(self, acts: ActivationSet) -> None:
        owner = type(self).__name__
        try:
            self._alpha()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{owner}: {exc}") from None
        if self.cov_shrinkage not in COV_SHRINKAGE:
            raise ConfigError(
                f"cov_shrinkage must be one of {', '.join(COV_SHRINKAGE)}; got {self.cov_shrinkage!r}."
            )
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ConfigError(
                f"{owner} threshold_rule must be one of {', '.join(THRESHOLD_RULES)}; "
                f"got {self.threshold_rule!r}."
            )
        if self.layer_criterion not in LAYER_CRITERIA:
            raise ConfigError(
                f"{owner} layer_criterion must be one of {', '.join(LAYER_CRITERIA)}; "
                f"got {self.layer_criterion!r}."
            )
        if self.layers is not None:
            n = acts.n_layers
            ok = (
                isinstance(self.layers, list | tuple)
                and len(self.layers) > 0
                and all(not isinstance(v, bool) and isinstance(v, int) and -n <= v < n for v in self.layers)
            )
            if not ok:
                raise ConfigError(
                    f"{owner} layers must be a non-empty list of layer indices in [{-n}, {n}) "
                    f"(or None for every layer); got {self.layers!r}."
                )
        check_int(owner, "layer_sweep", self._layer_sweep(), low=1, example="2")

    def _probe_key(self) -> tuple[Any, ...]:
        """Cache key of the probes: every parameter they depend on (not ``progress``)."""
        return ("probes", self.fnr_weight, self.loss, self.epochs, self.lr, self.seed, self.device)

    def _stage1(self, rows: Rows, cache: Cache) -> Detector:
        """The detector of this point: probes, thresholds and layer, from the cache where possible."""
        x_tr, y_tr = rows.train
        x_va, y_va = rows.val
        probe_key = self._probe_key()
        if probe_key not in cache:
            # Every layer's probes are trained whatever ``layers`` says (it only restricts the choice),
            # so the detector is fitted for all layers and the layer re-chosen below.
            detector = fit_detector(
                x_tr, y_tr, x_va, y_va,
                fnr_weight=self.fnr_weight, loss=self.loss, threshold_rule=self.threshold_rule,
                layer_criterion=self.layer_criterion, layers=None, epochs=self.epochs, lr=self.lr,
                seed=self.seed, progress=self.progress, device=self.device,
            )  # fmt: skip
            cache[probe_key] = (detector, self.threshold_rule, self.layer_criterion)
            cache[(*probe_key, "thresholds", self.threshold_rule)] = (detector.thresholds, detector.report)
        base, base_rule, base_criterion = cache[probe_key]
        rule_key = (*probe_key, "thresholds", self.threshold_rule)
        if rule_key not in cache:  # the same probes, another vote-threshold rule (fit_detector's steps)
            votes = base.bank.votes(x_va).cpu()
            yv = torch.as_tensor(y_va).cpu()
            bl = base.bank.fnr_weight
            thresholds = select_thresholds(votes, yv, fnr_weight=bl, rule=self.threshold_rule)
            cache[rule_key] = (thresholds, ensemble_metrics(votes, yv, thresholds, fnr_weight=bl))
        thresholds, report = cache[rule_key]
        if self.layers is None and (self.threshold_rule, self.layer_criterion) == (base_rule, base_criterion):
            layer = int(base.layer)
        else:
            layer = choose_layer(
                report, self.layer_criterion, head_metrics=base.head_report, layers=self.layers
            )
        return Detector(
            bank=base.bank, thresholds=thresholds, report=report, layer=layer, head_report=base.head_report,
            threshold_rule=self.threshold_rule, layer_criterion=self.layer_criterion,
        )  # fmt: skip

    def _candidates(self, detector: Detector) -> list[int]:
        """The ``layer_sweep`` best layers by the layer criterion, best first (the first is edited)."""
        n = self._layer_sweep()
        if n == 1:
            return [int(detector.layer)]
        if self.layer_criterion == "mean-head-loss":
            score = detector.head_report["loss"].to(torch.float64).mean(dim=1).cpu()
        else:
            score = detector.report.loss.to(torch.float64).cpu()
        n_layers = int(score.shape[0])
        if self.layers is None:
            pool = list(range(n_layers))
        else:
            pool = sorted({v % n_layers for v in self.layers})
        return _first_best(score, pool, n)

    def _stage2(
        self, rows: Rows, detector: Detector, alpha: ChanceLevel | Margin, cache: Cache
    ) -> dict[str, Any]:
        """Moments and head maps of the detector's layer (cached per probes, layer, α and shrinkage)."""
        x_tr, y_tr = rows.train
        x_va, _ = rows.val
        layer = int(detector.layer)
        # The source rows are those each head's own probe flags, whatever the layer's vote threshold.
        key = (*self._probe_key(), "stage2", layer, alpha, self.cov_shrinkage)
        if key in cache:
            return cache[key]
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
        out = {
            "theta": theta, "theta0": theta0, "usable": usable, "A": A, "b": b, "result": result,
            "count": count, "shrinkage": shrinkage, "rates": [float(r) for r in rate_t],
        }  # fmt: skip
        cache[key] = out
        return out

    def _fit_rows(self, rows: Rows, cache: Cache) -> None:
        """Fit the detector on the training rows, tune it on the validation rows, and fit the head maps."""
        alpha = self._alpha()
        x_tr, y_tr = rows.train
        x_va, y_va = rows.val
        check_two_classes(y_tr, "training")
        check_two_classes(y_va, "validation")
        detector = self._stage1(rows, cache)
        candidates = self._candidates(detector)
        layer = int(detector.layer)
        threshold = int(detector.thresholds[layer])
        maps = self._stage2(rows, detector, alpha, cache)
        usable, count, shrinkage = maps["usable"], maps["count"], maps["shrinkage"]
        edit = LayerEdit(
            layer=layer,
            probe_weight=maps["theta"].float(),
            probe_bias=maps["theta0"].float(),
            threshold=threshold,
            head_mask=usable.clone(),
            b=maps["b"].clone(),
            A=maps["A"].clone(),
        )
        meta = {
            "data_fingerprint": rows.acts.meta.get("data_fingerprint"),
            "dataset": rows.acts.meta.get("dataset"),
            "n_train": int(len(y_tr)),
            "n_val": int(len(y_va)),
            "layer": layer,
            "threshold": threshold,
            "candidate_layers": candidates,
            "alpha_multiplier": alpha.multiplier,
            "transport_cases": maps["result"].case.tolist(),
            "source_rows": count.long().tolist(),
            "cov_shrinkage": [float(v) if ok else None for v, ok in zip(shrinkage, usable, strict=True)],
            "guarantee_rate_val": _nan_to_none(maps["rates"]),
            "detector_val": detector.report.to_dict(),
        }
        self.detector_ = detector
        self.transport_ = maps["result"]
        self.candidate_layers_ = candidates
        self._policy = Policy(
            method=self.name, rule=self.rule, layers=[edit], model=bank_identity(rows.acts),
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


class Radiant(_OTMethod):
    """RADIANT (arXiv 2501.15758, authors' current variant): margin α, reference covariance, replace.

    ``layer_sweep``: after ``fit``, ``candidate_layers_`` (also ``policy_.meta["candidate_layers"]``)
    holds the ``layer_sweep`` best layers by the layer criterion (RADIANT's mean per-head validation
    loss by default), best first, among ``layers`` when given (fewer when there are fewer). The policy
    edits the first. The published method (docs/method.md §2.5, ``layer_sweep=2``) then fits one
    policy per candidate (``layers=[l]``, through ``fit_grid``: the probes are shared) and keeps the
    one with the best validation truthfulness of generated answers, a step of the harness.
    """

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
        layer_sweep: int = 1,
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
        self.layer_sweep = layer_sweep
        self.cov_shrinkage = cov_shrinkage
        self.epochs = epochs
        self.lr = lr
        self.seed = seed
        self.device = device
        self.progress = progress

    def _alpha(self) -> Margin:
        return Margin(self.margin)

    def _layer_sweep(self) -> int:
        return self.layer_sweep


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
