"""Stage 1 of RADIANT / SLIM: risk-aware logistic probes on every head, per-layer vote ensembles.

Shapes: N examples, L layers, H heads, d head dim. Labels: ``y = 1`` = undesirable everywhere.

One logistic probe per (layer, head), p = sigmoid(theta . a + theta0); its vote is ``p > 0.5``
(strict, evaluated as ``logit > 0``, which is the same test without rounding at p ~ 0.5). A layer's
ensemble flags an example when at least ``tau`` of its H heads vote undesirable.

Why it is built this way (docs/method.md §2 and the flaws of §8):

- All L*H probes are trained together as one batched program (weights (L, H, d)); each probe's loss
  only depends on its own parameters, so the summed loss gives exactly the per-probe gradients and
  Adam, being element-wise, takes exactly the per-probe steps. ``tests/reference/probe_loop.py``
  trains the probes one at a time and must agree.
- The "best on validation" checkpoint is a real copy of each probe's parameters at its own best
  epoch. The original code stored a live ``state_dict`` reference, so validation never mattered
  (flaw 1). ``checkpoint="last"`` reproduces what the original effectively did.
- Both vote-threshold rules are available; RADIANT's degenerates to "no validation miss", which
  costs many false positives (flaw 4), so SLIM's ``FPR + bl * FNR`` rule is the default.
- :func:`fit_detector` keeps the very probes used to choose the layer (flaw 13: SLIM retrained them).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from otguard.errors import DataError

__all__ = [
    "Detector",
    "LayerReport",
    "ProbeBank",
    "choose_layer",
    "ensemble_metrics",
    "fit_detector",
    "select_thresholds",
    "train_probes",
]

logger = logging.getLogger(__name__)

ProbeLoss = Literal["risk", "bce"]
ThresholdRule = Literal["slim", "radiant"]
LayerCriterion = Literal["loss", "mean-head-loss"]
Checkpoint = Literal["best", "last"]

# On CPU the two matmuls of an epoch are memory-bound (each reads the whole (L*H, N, d) block once).
# Running them over groups of probes whose training block fits in about this many bytes lets the
# gradient matmul re-read the group from cache instead of DRAM (about 20 vs 29 ms per epoch at
# N=4000, L*H=270, d=64 on one AMD core with 1 MiB L2; no loss on a Xeon). GPUs take one group.
_CPU_GROUP_BYTES = 2 * 2**20
_TIE_TOL = 1e-12


# --------------------------------------------------------------------------- checks and inputs


def _as_float(name: str, x: object) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(x)
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise DataError(f"{name} must hold real numbers; got dtype {t.dtype}.")
    return t


def _check_acts(name: str, x: object, ndim: int = 4) -> Tensor:
    t = _as_float(name, x)
    if t.ndim != ndim:
        want = "(N, L, H, d)" if ndim == 4 else f"{ndim} dimensions"
        raise DataError(f"{name} must have shape {want}; got {tuple(t.shape)}.")
    if t.shape[0] == 0:
        raise DataError(
            f"{name} is empty (0 examples); collect activations for at least one example of each class."
        )
    if any(s == 0 for s in t.shape[1:]):
        raise DataError(f"{name} has a zero-sized dimension: shape {tuple(t.shape)}.")
    return t


def _check_labels(name: str, y: object, n: int, acts_name: str, *, both_classes: bool = True) -> Tensor:
    t = y if isinstance(y, Tensor) else torch.as_tensor(y)
    if t.ndim != 1 or t.shape[0] != n:
        raise DataError(
            f"{name} must have shape ({n},) to match {acts_name} ({n} examples); got {tuple(t.shape)}."
        )
    bad = torch.zeros(t.shape, dtype=torch.bool) if t.dtype == torch.bool else ~((t == 0) | (t == 1))
    if bool(bad.any()):
        seen = torch.unique(t[bad])[:5].tolist()
        raise DataError(f"{name} must be 0/1 labels (1 = undesirable); found values such as {seen}.")
    t = t.to(torch.bool)
    if both_classes:
        n1 = int(t.sum())
        if n1 == 0 or n1 == n:
            only = 1 if n1 == n else 0
            raise DataError(
                f"{name} has only label {only} ({n} examples); need both desirable (0) and undesirable (1) "
                "examples to measure false-positive and false-negative rates. Add examples of the missing "
                "class or use a different split."
            )
    return t


def _check_finite(name: str, t: Tensor) -> None:
    # min and max are finite iff every value is (NaN propagates): one cheap pass, no boolean mask.
    if not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise DataError(
            f"{name} contains {bad} non-finite values (NaN or inf); re-collect the activations "
            "(e.g. in float32 instead of float16 if they overflow)."
        )


def _check_fnr_weight(fnr_weight: float) -> float:
    try:
        bl = float(fnr_weight)
    except (TypeError, ValueError):
        raise ValueError(f"fnr_weight must be a number > 0 (e.g. 1.0 or 2.5); got {fnr_weight!r}.") from None
    if not (math.isfinite(bl) and bl > 0):
        raise ValueError(f"fnr_weight must be finite and > 0 (e.g. 1.0 or 2.5); got {fnr_weight!r}.")
    return bl


def _check_votes(votes: object) -> Tensor:
    t = votes if isinstance(votes, Tensor) else torch.as_tensor(votes)
    if t.ndim != 3:
        raise DataError(f"votes must have shape (N, L, H); got {tuple(t.shape)}.")
    if t.shape[0] == 0:
        raise DataError("votes is empty (0 examples); need validation examples of both classes.")
    if t.dtype != torch.bool:
        if bool((~((t == 0) | (t == 1))).any()):
            raise DataError("votes must be boolean (or 0/1) head votes, e.g. ProbeBank.votes(x).")
        t = t.to(torch.bool)
    return t


def _check_thresholds(thresholds: object, n_layers: int, n_heads: int) -> Tensor:
    t = thresholds if isinstance(thresholds, Tensor) else torch.as_tensor(thresholds)
    if t.ndim != 1 or t.shape[0] != n_layers:
        raise DataError(f"thresholds must have shape ({n_layers},) (one per layer); got {tuple(t.shape)}.")
    t = t.to(torch.int64)
    if bool(((t < 0) | (t > n_heads + 1)).any()):
        raise DataError(f"thresholds must be in 0..{n_heads + 1} (number of head votes); got {t.tolist()}.")
    return t


# --------------------------------------------------------------------------- probe bank


@dataclass(eq=False)
class ProbeBank:
    """All L*H fitted head probes: weight (L, H, d), bias (L, H), best_epoch (L, H).

    ``best_epoch[l, h]`` is the number of Adam steps behind the stored parameters of that probe (1 to
    ``epochs``): its own best validation epoch with ``checkpoint="best"``, ``epochs`` with "last".
    """

    weight: Tensor
    bias: Tensor
    fnr_weight: float
    loss: str
    best_epoch: Tensor
    checkpoint: str = "best"
    epochs: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(L, H, d)."""
        n_layers, n_heads, dim = self.weight.shape
        return n_layers, n_heads, dim

    def to(self, device: torch.device | str) -> ProbeBank:
        """A copy with the tensors on ``device``."""
        return ProbeBank(
            self.weight.to(device),
            self.bias.to(device),
            self.fnr_weight,
            self.loss,
            self.best_epoch.to(device),
            self.checkpoint,
            self.epochs,
        )

    def _input(self, x: object) -> Tensor:
        t = _check_acts("x", x)
        if tuple(t.shape[1:]) != self.shape:
            n_layers, n_heads, dim = self.shape
            raise DataError(
                f"x has per-example shape {tuple(t.shape[1:])}, but the probes were trained on "
                f"(L, H, d) = ({n_layers}, {n_heads}, {dim}); use activations of the same model and site."
            )
        return t.to(device=self.weight.device, dtype=self.weight.dtype)

    def logits(self, x: Tensor) -> Tensor:
        """Probe logits (N, L, H) for activations x (N, L, H, d)."""
        t = self._input(x)
        return torch.einsum("nlhd,lhd->nlh", t, self.weight) + self.bias

    def probabilities(self, x: Tensor) -> Tensor:
        """Probability of "undesirable" per head, (N, L, H)."""
        return torch.sigmoid(self.logits(x))

    def votes(self, x: Tensor) -> Tensor:
        """Head votes (N, L, H) bool: p > 0.5, evaluated as logit > 0."""
        return self.logits(x) > 0

    def head_metrics(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Hard per-head metrics at p > 0.5: accuracy, fpr, fnr, loss = fpr + bl*fnr, each (L, H)."""
        votes = self.votes(x)
        labels = _check_labels("y", y, votes.shape[0], "x").to(votes.device)
        return _head_metrics(votes, labels, self.fnr_weight)


def _head_metrics(votes: Tensor, y: Tensor, fnr_weight: float) -> dict[str, Tensor]:
    neg = (~y).to(torch.float64)
    pos = y.to(torch.float64)
    v = votes.to(torch.float64)
    fp = torch.einsum("nlh,n->lh", v, neg)
    tp = torch.einsum("nlh,n->lh", v, pos)
    n0, n1 = neg.sum(), pos.sum()
    fpr = fp / n0
    fnr = (n1 - tp) / n1  # same expression as the trainer's checkpoint loss
    accuracy = (tp + (n0 - fp)) / (n0 + n1)
    return {"accuracy": accuracy, "fpr": fpr, "fnr": fnr, "loss": fpr + fnr_weight * fnr}


# --------------------------------------------------------------------------- training


def _xavier_init(n_layers: int, n_heads: int, dim: int, seed: int) -> Tensor:
    """Xavier-uniform (fan_in = d, fan_out = 1) for every probe from a local generator, in float32.

    Drawn in float32 whatever the compute dtype, so a float64 run starts from the same numbers.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    bound = math.sqrt(6.0 / (dim + 1))
    return torch.empty((n_layers, n_heads, dim), dtype=torch.float32).uniform_(-bound, bound, generator=gen)


def _head_major(x: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(N, L, H, d) -> contiguous (L*H, N, d) in the compute dtype: each probe's data in one block."""
    n, n_layers, n_heads, dim = x.shape
    out = torch.empty((n_layers, n_heads, n, dim), dtype=dtype, device=device)
    out.copy_(x.permute(1, 2, 0, 3))
    return out.view(n_layers * n_heads, n, dim)


def train_probes(
    x: Tensor,
    y: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    *,
    fnr_weight: float = 1.0,
    loss: ProbeLoss = "risk",
    lr: float = 2e-3,
    epochs: int = 1000,
    seed: int = 0,
    checkpoint: Checkpoint = "best",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> ProbeBank:
    """Train one logistic probe per (layer, head), all at once, by full-batch Adam.

    x: (N, L, H, d) activations (float16 is fine: computation is in ``dtype``, float32 by default;
    float64 exists for reference checks). y: (N,) labels, 1 = undesirable. x_val, y_val: the
    validation split used to pick each probe's best epoch (hard loss FPR + bl*FNR at p > 0.5).

    loss "risk" (the paper's smooth FPR + bl*FNR, per probe):
    ``mean_{y=0} p + bl * mean_{y=1} (1 - p)``; "bce": ``(1/N) sum_i w_i BCE(logit_i, y_i)`` with
    ``w_i = bl`` on undesirable examples, 1 otherwise (``pos_weight`` in torch terms).
    Init: Xavier-uniform weights, zero bias, from a local ``torch.Generator(seed)`` (the global RNG
    is untouched). ``checkpoint="best"`` returns, per probe, a copy of its parameters at its own
    best validation epoch (ties keep the earlier epoch); "last" the final ones.
    ``device``: where to train (default: x's device). Raises DataError for empty, one-class,
    mismatched or non-finite data.
    """
    bl = _check_fnr_weight(fnr_weight)
    if loss not in ("risk", "bce"):
        raise ValueError(f"loss must be 'risk' (smooth FPR + bl*FNR) or 'bce'; got {loss!r}.")
    if checkpoint not in ("best", "last"):
        raise ValueError(f"checkpoint must be 'best' or 'last'; got {checkpoint!r}.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int (e.g. 1000); got {epochs!r}.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0 (e.g. 2e-3); got {lr!r}.")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64; got {dtype}.")

    xt = _check_acts("x", x)
    xv = _check_acts("x_val", x_val)
    if tuple(xv.shape[1:]) != tuple(xt.shape[1:]):
        raise DataError(
            f"x_val has per-example shape {tuple(xv.shape[1:])} but x has {tuple(xt.shape[1:])}; "
            "both must be (L, H, d) activations of the same model and site."
        )
    yt = _check_labels("y", y, xt.shape[0], "x")
    yv = _check_labels("y_val", y_val, xv.shape[0], "x_val")
    dev = torch.device(device) if device is not None else xt.device

    n, n_layers, n_heads, dim = xt.shape
    n_probes = n_layers * n_heads
    data = _head_major(xt, dtype, dev)  # (P, N, d)
    _check_finite("x", data)
    data_val = _head_major(xv, dtype, dev)  # (P, Nv, d)
    _check_finite("x_val", data_val)

    yt, yv = yt.to(dev), yv.to(dev)
    n1 = int(yt.sum())
    n0 = n - n1
    # Per-example factor of dL/dlogit, constant over epochs.
    if loss == "risk":
        # dL/dz_i = p_i (1 - p_i) * c_i, c_i = 1/N0 on desirable, -bl/N1 on undesirable.
        pos_coef, neg_coef = -bl / n1, 1.0 / n0
    else:
        # dL/dz_i = w_i (p_i - y_i) / N.
        pos_coef, neg_coef = bl / n, 1.0 / n
    coef = torch.full((n,), neg_coef, dtype=dtype, device=dev).masked_fill_(yt, pos_coef)
    target = yt.to(dtype)
    # Validation counts through one matmul: votes (P, Nv) @ [desirable, undesirable] (Nv, 2).
    val_cols = torch.stack([~yv, yv], dim=1).to(dtype)
    n0v = float((~yv).sum())
    n1v = float(yv.sum())

    weight = _xavier_init(n_layers, n_heads, dim, seed).to(device=dev, dtype=dtype)
    w = weight.view(n_probes, 1, dim).clone().requires_grad_(True)
    b = torch.zeros((n_probes, 1, 1), dtype=dtype, device=dev, requires_grad=True)
    w.grad = torch.zeros_like(w)
    b.grad = torch.zeros_like(b)
    opt = torch.optim.Adam([w, b], lr=lr)

    if dev.type == "cpu":
        group = max(1, min(n_probes, _CPU_GROUP_BYTES // (n * dim * data.element_size())))
    else:
        group = n_probes
    buf = torch.empty((group, 1, n), dtype=dtype, device=dev)

    best_loss = torch.full((n_probes,), math.inf, dtype=torch.float64, device=dev)
    best_epoch = torch.full((n_probes,), epochs, dtype=torch.int64, device=dev)
    best_w = w.detach().clone()
    best_b = b.detach().clone()

    logger.info(
        "training %d x %d probes (d=%d) on %d examples (%d undesirable), %d validation; loss=%s, "
        "fnr_weight=%g, %d epochs, device=%s",
        n_layers,
        n_heads,
        dim,
        n,
        n1,
        xv.shape[0],
        loss,
        bl,
        epochs,
        dev,
    )
    start = time.perf_counter()
    log_every = max(1, epochs // 20)
    bar = tqdm(range(1, epochs + 1), desc="probes", unit="epoch", disable=not progress, leave=False)
    with torch.no_grad():
        for epoch in bar:
            gw, gb = w.grad, b.grad
            for i in range(0, n_probes, group):
                j = min(i + group, n_probes)
                block = data[i:j]
                # Logits (k, 1, N) = w block^T + b; gradient g block (below). Row-vector products:
                # the layout that was fast on both CPUs (AMD, Intel) and GPUs measured.
                z = torch.baddbmm(b[i:j], w[i:j], block.transpose(1, 2), out=buf[: j - i])
                p = z.sigmoid_()
                # risk: p (1 - p) * coef, in place; bce: (p - y) * coef.
                g = p.addcmul_(p, p, value=-1.0) if loss == "risk" else p.sub_(target)
                g.mul_(coef)
                torch.bmm(g, block, out=gw[i:j])
                torch.sum(g, dim=2, keepdim=True, out=gb[i:j])
            opt.step()

            if checkpoint == "best" or (progress and epoch % log_every == 0):
                zv = torch.baddbmm(b, w, data_val.transpose(1, 2))  # (P, 1, Nv)
                counts = ((zv > 0).to(dtype).view(n_probes, -1) @ val_cols).to(torch.float64)  # (P, 2)
                val_loss = counts[:, 0] / n0v + bl * ((n1v - counts[:, 1]) / n1v)
                if checkpoint == "best":
                    # Count pairs with equal loss can differ by rounding: treat them as ties (keep earlier).
                    better = val_loss < best_loss - _TIE_TOL
                    best_loss = torch.where(better, val_loss, best_loss)
                    best_epoch = torch.where(better, epoch, best_epoch)
                    best_w = torch.where(better.view(-1, 1, 1), w, best_w)
                    best_b = torch.where(better.view(-1, 1, 1), b, best_b)
                if progress and epoch % log_every == 0:
                    bar.set_postfix(val_loss=f"{float(val_loss.mean()):.4f}", refresh=False)
    bar.close()

    if checkpoint == "last":
        best_w, best_b = w.detach().clone(), b.detach().clone()
    elapsed = time.perf_counter() - start
    logger.info("trained %d probes in %.1fs (%.2f ms/epoch)", n_probes, elapsed, 1e3 * elapsed / epochs)
    return ProbeBank(
        weight=best_w.view(n_layers, n_heads, dim),
        bias=best_b.view(n_layers, n_heads),
        fnr_weight=bl,
        loss=loss,
        best_epoch=best_epoch.view(n_layers, n_heads),
        checkpoint=checkpoint,
        epochs=epochs,
    )


# --------------------------------------------------------------------------- per-layer ensembles


def _vote_histograms(votes: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per layer, how many desirable / undesirable examples got k head votes, k = 0..H: (L, H+1) each."""
    n_heads = votes.shape[2]
    counts = votes.sum(dim=2)  # (N, L)
    onehot = torch.nn.functional.one_hot(counts, n_heads + 1).to(torch.float64)  # (N, L, H+1)
    pos = y.to(torch.float64)
    hist1 = torch.einsum("nlk,n->lk", onehot, pos)
    hist0 = torch.einsum("nlk,n->lk", onehot, 1.0 - pos)
    return hist0, hist1


def _first_min(values: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per row, the first index within _TIE_TOL of the row minimum (over mask), and the tie mask."""
    if mask is not None:
        values = torch.where(mask, values, torch.full_like(values, math.inf))
    best = values.min(dim=-1, keepdim=True).values
    is_min = values <= best + _TIE_TOL
    return is_min.to(torch.int8).argmax(dim=-1), is_min


def select_thresholds(
    votes_val: Tensor, y_val: Tensor, *, fnr_weight: float = 1.0, rule: ThresholdRule = "slim"
) -> Tensor:
    """Vote threshold tau per layer, (L,) int64, chosen on validation votes (N, L, H).

    A layer flags an example iff its number of undesirable head votes is >= tau. Searched over
    tau = 0..H (tau = 0 flags everything; H + 1 would flag nothing and is skipped).
    "slim": argmin FPR + bl*FNR, ties -> smallest tau. "radiant": lexicographic (FNR, FPR + bl*FNR),
    remaining ties -> smallest tau; as tau = 0 has FNR 0, this is the threshold with the fewest false
    positives among those that miss no validation example, which over-flags (docs/method.md §8 item 4).
    """
    bl = _check_fnr_weight(fnr_weight)
    if rule not in ("slim", "radiant"):
        raise ValueError(f"rule must be 'slim' (min FPR + bl*FNR) or 'radiant' (FNR first); got {rule!r}.")
    v = _check_votes(votes_val)
    yv = _check_labels("y_val", y_val, v.shape[0], "votes_val").to(v.device)
    hist0, hist1 = _vote_histograms(v, yv)
    # Examples flagged at tau = examples with >= tau votes: reverse cumulative sums over k.
    fp = hist0.flip(-1).cumsum(-1).flip(-1)  # (L, H+1), index tau
    tp = hist1.flip(-1).cumsum(-1).flip(-1)
    n1 = hist1.sum(-1, keepdim=True)
    fpr = fp / hist0.sum(-1, keepdim=True)
    fnr = (n1 - tp) / n1
    risk = fpr + bl * fnr
    if rule == "slim":
        tau, _ = _first_min(risk)
    else:
        _, fnr_min = _first_min(fnr)
        tau, _ = _first_min(risk, fnr_min)
    return tau


@dataclass(eq=False)
class LayerReport:
    """Per-layer ensemble metrics at each layer's threshold; every field is an (L,) tensor."""

    fpr: Tensor
    fnr: Tensor
    accuracy: Tensor
    f1: Tensor
    tp: Tensor
    tn: Tensor
    fp: Tensor
    fn: Tensor
    loss: Tensor
    threshold: Tensor
    fnr_weight: float = 1.0

    _FIELDS = ("threshold", "loss", "fpr", "fnr", "accuracy", "f1", "tp", "tn", "fp", "fn")

    @property
    def n_layers(self) -> int:
        return int(self.loss.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: each metric as a list over layers, plus fnr_weight."""
        out: dict[str, Any] = {name: getattr(self, name).tolist() for name in self._FIELDS}
        out["fnr_weight"] = self.fnr_weight
        return out

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per layer (``layer`` first), for tables."""
        cols = {name: getattr(self, name).tolist() for name in self._FIELDS}
        return [{"layer": i, **{k: v[i] for k, v in cols.items()}} for i in range(self.n_layers)]


def ensemble_metrics(votes: Tensor, y: Tensor, thresholds: Tensor, *, fnr_weight: float = 1.0) -> LayerReport:
    """Metrics of every layer's ensemble (flag iff #votes >= threshold) on votes (N, L, H), y (N,)."""
    bl = _check_fnr_weight(fnr_weight)
    v = _check_votes(votes)
    yy = _check_labels("y", y, v.shape[0], "votes").to(v.device)
    tau = _check_thresholds(thresholds, v.shape[1], v.shape[2]).to(v.device)
    flags = v.sum(dim=2) >= tau  # (N, L)
    pos = yy.unsqueeze(1)
    tp = (flags & pos).sum(0)
    fp = (flags & ~pos).sum(0)
    fn = (~flags & pos).sum(0)
    tn = (~flags & ~pos).sum(0)
    n1 = (tp + fn).to(torch.float64)
    n0 = (fp + tn).to(torch.float64)
    fpr = fp / n0
    fnr = fn / n1
    denom = (2 * tp + fp + fn).to(torch.float64)
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(denom))
    return LayerReport(
        fpr=fpr,
        fnr=fnr,
        accuracy=(tp + tn) / (n0 + n1),
        f1=f1,
        tp=tp,
        tn=tn,
        fp=fp,
        fn=fn,
        loss=fpr + bl * fnr,
        threshold=tau,
        fnr_weight=bl,
    )


def _layer_candidates(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise ValueError(f"layers must be indices in [{-n_layers}, {n_layers}); got {list(layers)!r}.")
        out.append(layer % n_layers)
    if not out:
        raise ValueError("layers is empty; pass None to consider every layer.")
    return sorted(set(out))


def choose_layer(
    report: LayerReport,
    criterion: LayerCriterion = "loss",
    *,
    head_metrics: dict[str, Tensor] | None = None,
    layers: Sequence[int] | None = None,
) -> int:
    """Index of the layer to edit: the lowest validation score, ties -> the earlier layer.

    "loss": the layer ensemble's FPR + bl*FNR at its threshold (SLIM). "mean-head-loss": the mean over
    heads of each head's own hard loss (RADIANT); needs ``head_metrics`` from
    :meth:`ProbeBank.head_metrics` on the validation set. ``layers`` restricts the candidates.
    """
    if criterion == "loss":
        score = report.loss.to(torch.float64)
    elif criterion == "mean-head-loss":
        if head_metrics is None or "loss" not in head_metrics:
            raise ValueError(
                "criterion 'mean-head-loss' needs head_metrics (ProbeBank.head_metrics(x_val, y_val))."
            )
        score = head_metrics["loss"].to(torch.float64).mean(dim=1).cpu()
        if score.shape[0] != report.n_layers:
            raise DataError(
                f"head_metrics covers {score.shape[0]} layers but the report has {report.n_layers}."
            )
    else:
        raise ValueError(f"criterion must be 'loss' or 'mean-head-loss'; got {criterion!r}.")
    cand = _layer_candidates(layers, report.n_layers)
    sub = score.cpu()[cand]
    idx, _ = _first_min(sub)
    return cand[int(idx)]


# --------------------------------------------------------------------------- detector


@dataclass(eq=False)
class Detector:
    """Stage-1 result: the probe bank, per-layer thresholds (L,), validation reports, the chosen layer.

    ``report``: the layer ensembles on the validation set; ``head_report``: per-head validation
    metrics (L, H) from :meth:`ProbeBank.head_metrics`.
    """

    bank: ProbeBank
    thresholds: Tensor
    report: LayerReport
    layer: int
    head_report: dict[str, Tensor] = field(default_factory=dict)
    threshold_rule: str = "slim"
    layer_criterion: str = "loss"

    def flags(self, x: Tensor) -> Tensor:
        """Layer-ensemble flags (N, L) bool: #undesirable head votes >= that layer's threshold."""
        votes = self.bank.votes(x)
        return votes.sum(dim=2) >= self.thresholds.to(votes.device)

    def predict(self, x: Tensor) -> Tensor:
        """Flags (N,) bool of the chosen layer's ensemble (True = undesirable)."""
        return self.flags(x)[:, self.layer]


def fit_detector(
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    *,
    fnr_weight: float = 1.0,
    loss: ProbeLoss = "risk",
    threshold_rule: ThresholdRule = "slim",
    layer_criterion: LayerCriterion = "loss",
    layers: Sequence[int] | None = None,
    epochs: int = 1000,
    lr: float = 2e-3,
    seed: int = 0,
    checkpoint: Checkpoint = "best",
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Detector:
    """Whole Stage 1: train all probes, pick each layer's vote threshold, pick the layer, on x_val.

    x_*: (N, L, H, d), y_*: (N,), 1 = undesirable. Probes for every layer are trained (cheap, batched);
    ``layers`` only restricts which layers may be chosen. The returned probes are the ones the
    choice was made with (no retraining).
    """
    if threshold_rule not in ("slim", "radiant"):
        raise ValueError(f"threshold_rule must be 'slim' or 'radiant'; got {threshold_rule!r}.")
    if layer_criterion not in ("loss", "mean-head-loss"):
        raise ValueError(f"layer_criterion must be 'loss' or 'mean-head-loss'; got {layer_criterion!r}.")
    xv = _check_acts("x_val", x_val)
    if layers is not None:
        _layer_candidates(layers, xv.shape[1])
    bank = train_probes(
        x_train,
        y_train,
        xv,
        y_val,
        fnr_weight=fnr_weight,
        loss=loss,
        lr=lr,
        epochs=epochs,
        seed=seed,
        checkpoint=checkpoint,
        device=device,
        progress=progress,
    )
    votes = bank.votes(xv).cpu()
    yv = torch.as_tensor(y_val).cpu()
    thresholds = select_thresholds(votes, yv, fnr_weight=bank.fnr_weight, rule=threshold_rule)
    report = ensemble_metrics(votes, yv, thresholds, fnr_weight=bank.fnr_weight)
    heads = _head_metrics(votes, _check_labels("y_val", yv, votes.shape[0], "x_val"), bank.fnr_weight)
    layer = choose_layer(report, layer_criterion, head_metrics=heads, layers=layers)
    logger.info(
        "chose layer %d (tau=%d, val FPR=%.3f, FNR=%.3f)",
        layer,
        int(thresholds[layer]),
        float(report.fpr[layer]),
        float(report.fnr[layer]),
    )
    return Detector(
        bank=bank,
        thresholds=thresholds,
        report=report,
        layer=layer,
        head_report=heads,
        threshold_rule=threshold_rule,
        layer_criterion=layer_criterion,
    )
