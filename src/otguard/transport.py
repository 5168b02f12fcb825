"""Stage 2: head-wise Gaussian projection onto the probe's chance constraint, and its OT map.

For one head, the activations the probe flags as undesirable are modelled as ``N(mu_hat, Sigma_hat)``.
RADIANT and SLIM move that Gaussian to the nearest ``N(mu, S^2)`` (distance
``||mu - mu_hat||^2 + ||S - S_hat||_F^2``, ``S_hat = Sigma_hat^{1/2}``) that satisfies the
chance constraint ``theta0 + theta^T mu + alpha * ||S theta|| <= 0`` (and, for RADIANT, ``S >= R``
with ``R`` the square root of a reference covariance), then edit activations with the Gaussian
Monge map between the two.

The original code solves this with a conic solver (about a minute per head at d = 128). Here:

* without the reference constraint, the exact closed form of docs/method.md §9.3 (three cases,
  one monotone scalar root solved by safeguarded Newton / bisection), batched over heads;
* with it, the ADMM of docs/method.md §9.4 whose chance-set step is that same closed form, batched over heads.

Everything runs in float64 on the inputs' device; results are cast back to the dtype of ``mu_hat``.
Shapes use ``...`` for any leading batch dims (typically ``H`` heads), ``d`` the head dimension.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
from torch import Tensor

from otguard.errors import SolverError

__all__ = [
    "CASE_ADMM",
    "CASE_COLLAPSE",
    "CASE_INTERIOR",
    "CASE_SATISFIED",
    "Alpha",
    "ChanceLevel",
    "Margin",
    "TransportResult",
    "chance_constraint_value",
    "fit_head_maps",
    "gaussian_projection",
    "guarantee_rate",
    "ot_map",
    "projection_objective",
    "regularize_covariance",
    "shrink_covariance",
]

#: Which branch produced a head's solution (``TransportResult.case``).
CASE_SATISFIED = 0  # the source already satisfies the constraint: identity map
CASE_INTERIOR = 1  # constraint active, covariance shrunk along theta by the multiplier c* (§9.3)
CASE_COLLAPSE = 2  # all variance along theta removed, mean moved onto the boundary (§9.3)
CASE_ADMM = 3  # solved by ADMM because the reference constraint S >= R is active (§9.4)

_DTYPE = torch.float64
_EPS = torch.finfo(_DTYPE).eps


# --------------------------------------------------------------------------------------------
# alpha: explicit about which convention is meant
# --------------------------------------------------------------------------------------------


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number; got {value!r} ({type(value).__name__}).")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite; got {out}.")
    return out


@dataclass(frozen=True)
class ChanceLevel:
    """SLIM's alpha: a probability tolerance ``gamma`` in (0, 0.5).

    The constraint then reads ``P(theta0 + theta^T a < 0) >= 1 - gamma`` for a Gaussian ``a``, i.e.
    multiplier ``Phi^{-1}(1 - gamma)`` (gamma = 0.1 gives 1.2816). gamma >= 0.5 would make the
    multiplier <= 0 and the problem non-convex, hence the range.
    """

    gamma: float

    def __post_init__(self) -> None:
        gamma = _check_real("ChanceLevel.gamma", self.gamma)
        if not 0.0 < gamma < 0.5:
            raise ValueError(
                f"ChanceLevel.gamma must be in (0, 0.5) (a probability tolerance, e.g. 0.1); got {gamma}. "
                "For RADIANT-style multipliers such as 15 or 30 use Margin(value) instead."
            )
        object.__setattr__(self, "gamma", gamma)

    @property
    def multiplier(self) -> float:
        """``Phi^{-1}(1 - gamma)``, the factor in front of ``||S theta||``."""
        return NormalDist().inv_cdf(1.0 - self.gamma)


@dataclass(frozen=True)
class Margin:
    """RADIANT's alpha: the multiplier itself (> 0), a margin in standard deviations along theta.

    RADIANT's scripts pass values of 5-40; read as a probability level they would mean
    gamma ~ 1e-50, so they are kept as what they are: a strength knob.
    """

    value: float

    def __post_init__(self) -> None:
        value = _check_real("Margin.value", self.value)
        if value <= 0.0:
            raise ValueError(f"Margin.value must be > 0 (e.g. 15); got {value}.")
        object.__setattr__(self, "value", value)

    @property
    def multiplier(self) -> float:
        """The multiplier in front of ``||S theta||``, i.e. ``value``."""
        return self.value


Alpha = ChanceLevel | Margin


def _multiplier(alpha: object) -> float:
    if isinstance(alpha, ChanceLevel | Margin):
        return alpha.multiplier
    raise TypeError(
        f"alpha must be ChanceLevel(gamma) (SLIM: probability tolerance, e.g. ChanceLevel(0.1)) or "
        f"Margin(value) (RADIANT: multiplier in std units, e.g. Margin(15)); got {alpha!r} "
        f"({type(alpha).__name__}). A bare number is ambiguous: wrap it in one of the two."
    )


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _as_tensor(name: str, x: object) -> Tensor:
    if isinstance(x, Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(x, dtype=_DTYPE)  # Python floats would otherwise become float32
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{name} must be a tensor (or array-like); got {type(x).__name__}.") from exc
    if t.is_complex():
        raise ValueError(f"{name} must be real; got dtype {t.dtype}.")
    return t


def _out_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else _DTYPE


def _check_finite(name: str, t: Tensor, batch_ndim: int) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        if batch_ndim > 0:
            per_item = bad.reshape(*t.shape[:batch_ndim], -1).any(-1)
            idx = tuple(int(i) for i in per_item.nonzero()[0])
            where = f" (first at batch index {idx})"
        else:
            where = ""
        raise SolverError(
            f"{name} contains NaN or inf{where}. Check the activations/probe that produced it "
            "(e.g. an empty flagged set gives a NaN mean)."
        )


def _check_floor(eig_floor: float) -> float:
    eig_floor = _check_real("eig_floor", eig_floor)
    if eig_floor <= 0.0:
        raise ValueError(f"eig_floor must be > 0 (relative eigenvalue floor, e.g. 1e-6); got {eig_floor}.")
    return eig_floor


def _shape_error(msg: str) -> ValueError:
    return ValueError(msg + " Pass mu_hat (..., d), sigma_hat (..., d, d), theta (..., d), theta0 (...).")


def _sym(x: Tensor) -> Tensor:
    return 0.5 * (x + x.transpose(-1, -2))


def _psd_sqrt(x: Tensor) -> Tensor:
    """Symmetric PSD square root of a symmetric matrix, negative eigenvalues clipped to 0."""
    evals, evecs = torch.linalg.eigh(_sym(x))
    return _sym((evecs * evals.clamp_min(0.0).sqrt().unsqueeze(-2)) @ evecs.transpose(-1, -2))


def _psd_part(x: Tensor) -> Tensor:
    """Projection of a symmetric matrix onto the PSD cone (Frobenius norm)."""
    evals, evecs = torch.linalg.eigh(_sym(x))
    return _sym((evecs * evals.clamp_min(0.0).unsqueeze(-2)) @ evecs.transpose(-1, -2))


def regularize_covariance(sigma: Tensor, eig_floor: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetrise ``sigma`` and floor its eigenvalues; return ``(sigma_reg, sqrt, inv_sqrt)``.

    Why: flagged sets are often smaller than d, so the ML covariance is singular and the OT map
    needs ``Sigma^{-1/2}``. The floor is relative, ``eig_floor * max(1, largest eigenvalue)``, and
    this one regularised matrix is used everywhere (projection, OT map, objective) so that the
    map pushes exactly the Gaussian the projection was solved for.

    sigma: (..., d, d). Returns three (..., d, d) float64 tensors on sigma's device, all symmetric.
    """
    eig_floor = _check_floor(eig_floor)
    s = _as_tensor("sigma", sigma).to(_DTYPE)
    if s.ndim < 2 or s.shape[-1] != s.shape[-2]:
        raise ValueError(f"sigma must have shape (..., d, d); got {tuple(s.shape)}.")
    _check_finite("sigma", s, s.ndim - 2)
    evals, evecs = _floored_eigh(s, eig_floor)
    sigma_reg = _sym((evecs * evals.unsqueeze(-2)) @ evecs.transpose(-1, -2))
    return (sigma_reg, *_roots(evals, evecs))


def shrink_covariance(sigma: Tensor, n_samples: Tensor | int) -> tuple[Tensor, Tensor]:
    """Oracle-approximating shrinkage of an ML covariance toward ``(tr(sigma) / d) I``.

    Returns ``((1 - rho) sigma + rho (tr(sigma) / d) I, rho)`` with the intensity of Chen, Wiesel,
    Eldar and Hero (2010, eq. 23), with ``T1 = tr(sigma)``, ``T2 = tr(sigma^2)``, ``n = n_samples``::

        rho = min(1, ((1 - 2/d) T2 + T1^2) / ((n + 1 - 2/d) (T2 - T1^2 / d)))

    Why: Stage 2 estimates ``sigma`` from the rows one head's probe flags, sometimes only a handful
    for d = 64. That matrix is singular; the eigenvalue floor of :func:`regularize_covariance` keeps
    it invertible but leaves a condition number of ~1e6, and since the OT map satisfies
    ``A sigma A = Sigma*``, ``||A|| <= sqrt(||Sigma*|| / lambda_min(sigma))`` can reach ~1e3 (it
    does with RADIANT's reference constraint, which asks for variance in the floored directions);
    ``(A - I) a + b`` then cancels badly in bf16. Shrinking bounds the condition number by
    ``1 + d (1 - rho) / rho`` (the top eigenvalue is at most ``tr(sigma)``), hence ``||A||``.
    Oracle-approximating shrinkage rather than Ledoit-Wolf because it needs only ``sigma`` and
    ``n`` (the masked moments Stage 2 already has, not the rows), it is derived for Gaussian data,
    which is exactly Stage 2's model, and it has the lower error of the two for small ``n``. The
    intensity is a deterministic function of ``(sigma, n)`` and, for a given covariance, falls like
    ``1 / n``: with many rows the estimate (and hence the fit) barely moves. A ``sigma`` already
    proportional to the identity is returned unchanged (intensity 1).

    sigma (..., d, d) symmetric PSD, n_samples (...) or an int >= 1 (rows behind each matrix).
    Returns (shrunk (..., d, d), rho (...)), float64 on sigma's device. The shrunk matrix is what
    to pass to :func:`fit_head_maps`, which then uses it for both the projection and the map.
    """
    s = _as_tensor("sigma", sigma).to(_DTYPE)
    if s.ndim < 2 or s.shape[-1] != s.shape[-2]:
        raise ValueError(f"sigma must have shape (..., d, d); got {tuple(s.shape)}.")
    _check_finite("sigma", s, s.ndim - 2)
    n = _as_tensor("n_samples", n_samples).to(device=s.device, dtype=_DTYPE)
    if bool((n < 1).any()):
        raise ValueError(f"n_samples must be >= 1 (rows behind each covariance); got min {float(n.min())}.")
    s = _sym(s)
    d = s.shape[-1]
    t1 = torch.diagonal(s, dim1=-2, dim2=-1).sum(-1)
    t2 = (s * s).sum((-1, -2))  # tr(sigma^2) for a symmetric matrix
    num = (1.0 - 2.0 / d) * t2 + t1 * t1
    spread = (t2 - t1 * t1 / d).clamp_min(0.0)  # ||sigma - (T1/d) I||_F^2 >= 0
    den = (n + 1.0 - 2.0 / d) * spread
    rho = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num)).clamp(max=1.0)
    rho = torch.where(t1 > 0, rho, torch.zeros_like(rho))  # a zero matrix stays zero
    target = (t1 / d)[..., None, None] * torch.eye(d, dtype=_DTYPE, device=s.device)
    r = rho[..., None, None]
    return _sym((1.0 - r) * s + r * target), rho


def _floored_eigh(s: Tensor, eig_floor: float) -> tuple[Tensor, Tensor]:
    evals, evecs = torch.linalg.eigh(_sym(s))
    return torch.maximum(evals, eig_floor * evals[..., -1:].clamp_min(1.0)), evecs


def _roots(evals: Tensor, evecs: Tensor) -> tuple[Tensor, Tensor]:
    """(Sigma^{1/2}, Sigma^{-1/2}) from an eigendecomposition with positive eigenvalues."""
    vt = evecs.transpose(-1, -2)
    root = evals.sqrt()
    return _sym((evecs * root.unsqueeze(-2)) @ vt), _sym((evecs * (1.0 / root).unsqueeze(-2)) @ vt)


@dataclass
class _Problem:
    """Validated, broadcast, flattened (B = prod of batch dims) float64 inputs."""

    batch_shape: torch.Size
    d: int
    mu_hat: Tensor  # (B, d)
    s_hat: Tensor  # (B, d, d) root of the regularised sigma_hat
    inv_sqrt: Tensor  # (B, d, d) its inverse
    theta: Tensor  # (B, d)
    theta0: Tensor  # (B,)
    r: Tensor | None  # (B, d, d)
    out_dtype: torch.dtype


def _prepare(
    mu_hat: Tensor,
    sigma_hat: Tensor,
    theta: Tensor,
    theta0: Tensor | float,
    ref_cov: Tensor | None,
    eig_floor: float,
) -> _Problem:
    mu = _as_tensor("mu_hat", mu_hat)
    sig = _as_tensor("sigma_hat", sigma_hat)
    th = _as_tensor("theta", theta)
    th0 = _as_tensor("theta0", theta0)
    out_dtype = _out_dtype(mu)
    if mu.ndim < 1 or sig.ndim < 2 or th.ndim < 1:
        raise _shape_error(
            f"Bad shapes: mu_hat {tuple(mu.shape)}, sigma_hat {tuple(sig.shape)}, theta {tuple(th.shape)}."
        )
    d = mu.shape[-1]
    if sig.shape[-2:] != (d, d) or th.shape[-1] != d:
        raise _shape_error(
            f"Dimension mismatch: mu_hat {tuple(mu.shape)}, sigma_hat {tuple(sig.shape)}, "
            f"theta {tuple(th.shape)} (all must share the last dim d={d})."
        )
    shapes = [mu.shape[:-1], sig.shape[:-2], th.shape[:-1], th0.shape]
    ref = None
    if ref_cov is not None:
        ref = _as_tensor("ref_cov", ref_cov)
        if ref.ndim < 2 or ref.shape[-2:] != (d, d):
            raise _shape_error(f"ref_cov must have shape (..., {d}, {d}); got {tuple(ref.shape)}.")
        shapes.append(ref.shape[:-2])
    try:
        batch = torch.broadcast_shapes(*shapes)
    except RuntimeError as exc:
        raise _shape_error(
            "Batch dims do not broadcast: " + ", ".join(str(tuple(s)) for s in shapes) + "."
        ) from exc
    nb = len(batch)
    device = mu.device

    def flat(t: Tensor, tail: tuple[int, ...]) -> Tensor:
        return t.to(device=device, dtype=_DTYPE).expand((*batch, *tail)).reshape(-1, *tail)

    mu_f, th_f, th0_f = flat(mu, (d,)), flat(th, (d,)), flat(th0, ())
    sig_f = flat(sig, (d, d))
    named = (("mu_hat", mu_f), ("theta", th_f), ("theta0", th0_f), ("sigma_hat", sig_f))
    if not bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):  # one device sync
        for name, t in named:
            _check_finite(name, t.reshape((*batch, *t.shape[1:])), nb)
    zero = th_f.norm(dim=-1) < 1e-150  # ||theta||^2 would underflow
    if bool(zero.any()):
        idx = int(zero.nonzero()[0])
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), batch)) if nb else ()
        raise SolverError(
            f"theta is zero at batch index {where}: a zero probe defines no constraint. "
            "Drop that head or retrain its probe."
        )
    s_hat, inv_sqrt = _roots(*_floored_eigh(sig_f, _check_floor(eig_floor)))
    r = None
    if ref is not None:
        ref_f = flat(ref, (d, d))
        _check_finite("ref_cov", ref_f.reshape(*batch, d, d), nb)
        r = _psd_sqrt(ref_f)
    return _Problem(batch, d, mu_f, s_hat, inv_sqrt, th_f, th0_f, r, out_dtype)


# --------------------------------------------------------------------------------------------
# closed form (docs/method.md §9.3)
# --------------------------------------------------------------------------------------------


def _phi(
    c: np.ndarray, a2: np.ndarray, b2: np.ndarray, n: np.ndarray, alpha: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """phi(c) = rho(c) (2c - alpha^2) and its derivative; rho(c) = ||S(c) theta||."""
    q1 = 1.0 / (1.0 + c)
    q2 = 1.0 / (1.0 + 2.0 * c)
    root = np.sqrt(np.maximum(b2 * q1 * q1 + a2 * q2 * q2, 1e-300))
    rho = n * root
    drho = -n * (b2 * q1**3 + 2.0 * a2 * q2**3) / root
    lin = 2.0 * c - alpha * alpha
    return rho * lin, drho * lin + 2.0 * rho


def _solve_multiplier(
    a2: Tensor, b2: Tensor, n: Tensor, delta: Tensor, alpha: Tensor, c_init: Tensor | None
) -> Tensor:
    """Unique root c* >= 0 of phi(c) = alpha * delta, elementwise (case-1 heads only).

    phi(c) = (1 + c) rho(c) * (2c - alpha^2)/(1 + c) and (1 + c) rho(c) lies in [K, n sigma_u]
    (K = n sqrt(b^2 + a^2/4)), so c* lies between the roots of s (2c - alpha^2)/(1 + c) = alpha delta
    for s = K and s = n sigma_u: an explicit bracket at most a factor ~2 wide. Newton steps that
    leave the (shrinking) bracket are replaced by bisection, so it always converges; all elements
    iterate together; ``c_init`` (e.g. the previous ADMM iterate) is used when inside the bracket.
    These are B scalars, so they are solved on the host in NumPy: one transfer each way instead of
    a device sync and ~40 tiny kernel launches per Newton step (4-6 steps typically).
    """
    a2_, b2_, n_, delta_, alpha_ = (t.detach().cpu().numpy() for t in (a2, b2, n, delta, alpha))
    target = alpha_ * delta_
    al2 = alpha_ * alpha_
    k = n_ * np.sqrt(b2_ + 0.25 * a2_)
    ns = n_ * np.sqrt(a2_ + b2_)
    g_k = (target + k * al2) / (2.0 * k - target)  # 2K > alpha delta in case 1, and n sigma_u >= K
    g_s = (target + ns * al2) / (2.0 * ns - target)
    lo = np.minimum(g_k, g_s) * (1.0 - 1e-12)
    hi = np.maximum(g_k, g_s) * (1.0 + 1e-12)
    lo = np.where(delta_ > 0, np.maximum(lo, 0.5 * al2), np.maximum(lo, 0.0))
    hi = np.where(delta_ < 0, np.minimum(hi, 0.5 * al2), hi)
    x = 0.5 * (lo + hi)
    if c_init is not None:
        ci = c_init.detach().cpu().numpy()
        x = np.where((ci > lo) & (ci < hi), ci, x)
    for _ in range(200):
        f, fp = _phi(x, a2_, b2_, n_, alpha_)
        f = f - target
        lo = np.where(f <= 0, x, lo)
        hi = np.where(f >= 0, x, hi)
        step = f / fp
        xn = x - step
        # Newton moves towards the root (phi' > 0); outside the bracket it overshot: bisect.
        ok = (xn >= lo) & (xn <= hi)
        xn = np.where(ok, xn, 0.5 * (lo + hi))
        # Stop on a tiny step, or when rounding noise in phi (~eps alpha^2 rho) makes Newton bounce
        # between the two ends of a bracket that cannot shrink any more.
        done = (ok & ((np.abs(step) <= 16 * _EPS * x) | (xn == lo) | (xn == hi))) | (f == 0)
        done |= hi - lo <= 16 * _EPS * hi
        x = xn
        if done.all():
            break
    return torch.from_numpy(x).to(device=a2.device, dtype=_DTYPE)


def _closed_form(
    s_hat: Tensor, mu_hat: Tensor, theta: Tensor, theta0: Tensor, alpha: Tensor, c_init: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Exact solution of (P) without the reference constraint, for any symmetric ``s_hat``.

    s_hat (B, d, d), mu_hat (B, d), theta (B, d), theta0 (B,), alpha (B,) multipliers > 0.
    Returns mu (B, d), S (B, d, d), case (B,) int64, c (B,) (the multiplier; inf when collapsed).
    S = S(c) = s_hat with its u-row/column scaled by 1/(1+c) and its (u,u) entry by 1/(1+2c),
    written as a rank-2 update (u = theta/||theta||).
    """
    n = theta.norm(dim=-1)
    u = theta / n.unsqueeze(-1)
    v = (s_hat @ u.unsqueeze(-1)).squeeze(-1)  # S_hat u
    a = (u * v).sum(-1)
    w = v - a.unsqueeze(-1) * u  # Q S_hat u
    a2 = a * a
    b2 = (w * w).sum(-1)
    delta = theta0 + (theta * mu_hat).sum(-1)
    sig_u = (a2 + b2).sqrt()
    k = n * (b2 + 0.25 * a2).sqrt()
    case0 = delta + alpha * n * sig_u <= 0
    case2 = ~case0 & (alpha * delta >= 2.0 * k)
    case1 = ~case0 & ~case2
    case = torch.full_like(delta, CASE_INTERIOR, dtype=torch.int64)
    case = torch.where(case0, CASE_SATISFIED, torch.where(case2, CASE_COLLAPSE, case))

    c = torch.where(case2, torch.full_like(delta, math.inf), torch.zeros_like(delta))
    if bool(case1.all()):
        c = _solve_multiplier(a2, b2, n, delta, alpha, c_init)
    elif bool(case1.any()):
        idx = case1.nonzero().squeeze(-1)
        ci = None if c_init is None else c_init[idx]
        root = _solve_multiplier(a2[idx], b2[idx], n[idx], delta[idx], alpha[idx], ci)
        c = c.index_put((idx,), root)
    # k1 = c/(1+c), k2 = 2c/(1+2c); 0 when satisfied, 1 when collapsed.
    cf = torch.where(case1, c, torch.zeros_like(c))
    k1 = torch.where(case2, torch.ones_like(c), cf / (1.0 + cf))
    k2 = torch.where(case2, torch.ones_like(c), 2.0 * cf / (1.0 + 2.0 * cf))
    uw = u.unsqueeze(-1) * w.unsqueeze(-2)
    uu = u.unsqueeze(-1) * u.unsqueeze(-2)
    s = s_hat - k1[:, None, None] * (uw + uw.transpose(-1, -2)) - (k2 * a)[:, None, None] * uu
    s = _sym(s)
    rho = n * (((1.0 - k2) * a) ** 2 + ((1.0 - k1) ** 2) * b2).sqrt()
    shift = torch.where(case0, torch.zeros_like(delta), (delta + alpha * rho).clamp_min(0.0)) / (n * n)
    mu = mu_hat - shift.unsqueeze(-1) * theta
    return mu, s, case, c


# --------------------------------------------------------------------------------------------
# ADMM with the reference constraint (docs/method.md §9.4)
# --------------------------------------------------------------------------------------------


def _fro(x: Tensor) -> Tensor:
    return x.flatten(-2).norm(dim=-1)


def _mean_for(s: Tensor, mu_hat: Tensor, theta: Tensor, theta0: Tensor, alpha: Tensor) -> Tensor:
    """Best mean for a fixed S: project mu_hat onto theta^T mu <= -theta0 - alpha ||S theta||."""
    n2 = (theta * theta).sum(-1)
    st = (s @ theta.unsqueeze(-1)).squeeze(-1).norm(dim=-1)
    viol = (theta0 + (theta * mu_hat).sum(-1) + alpha * st).clamp_min(0.0)
    return mu_hat - (viol / n2).unsqueeze(-1) * theta


_ADMM_RELAX = 1.8  # over-relaxation; about 1.4x fewer iterations than 1.0 on the test instances


def _admm(
    s_hat: Tensor,
    mu_hat: Tensor,
    theta: Tensor,
    theta0: Tensor,
    alpha: Tensor,
    r: Tensor,
    rho0: float | None,
    max_iter: int,
    tol: float,
) -> tuple[Tensor, Tensor, int, Tensor]:
    """ADMM on x = (mu, S) in the chance set, z = S in {S >= R}; all heads iterate together.

    x-step: the closed form applied to a rescaled target (the augmented objective is again a
    distance); z-step: R + PSD part of (S + w - R), one batched eigh; over-relaxed. The penalty
    starts at ``rho0`` or, if None, at 2 * alpha (the best fixed value on random instances for
    alpha from 1.3 to 20: 15-230 iterations to tol = 1e-9) and is then rebalanced per head only
    when the primal and dual residuals differ by more than 100x. The returned point is polished to
    be exactly feasible: S = z (so S >= R holds) and the mean re-projected for that S.
    Returns mu (B, d), S (B, d, d), iterations used, final max(primal, dual) residual / scale (B,).
    """
    scale = torch.maximum(_fro(s_hat), _fro(r)).clamp_min(1e-300)
    adaptive = rho0 is None
    rho = 2.0 * alpha if rho0 is None else torch.full_like(alpha, float(rho0))
    z = r + _psd_part(s_hat - r)
    w = torch.zeros_like(s_hat)
    c_prev: Tensor | None = None
    it = 0
    res = torch.full_like(scale, math.inf)
    for it in range(1, max_iter + 1):  # noqa: B007 (it is reported after the loop)
        rr = rho[:, None, None]
        sbar = (2.0 * s_hat + rr * (z - w)) / (2.0 + rr)
        sc = ((2.0 + rho) / 2.0).sqrt()
        _, t, _, c_prev = _closed_form(sc[:, None, None] * sbar, mu_hat, theta, theta0, alpha / sc, c_prev)
        s = t / sc[:, None, None]
        s_rel = _ADMM_RELAX * s + (1.0 - _ADMM_RELAX) * z
        z_old = z
        z = r + _psd_part(s_rel + w - r)
        w = w + s_rel - z
        if it % 5 == 0 or it == max_iter:
            prim = _fro(s - z) / scale
            dual = rho * _fro(z - z_old) / scale
            res = torch.maximum(prim, dual)
            if bool((res <= tol).all()):
                break
            if adaptive and it % 50 == 0:
                shrink = torch.where(dual > 100.0 * prim, 0.5, 1.0).to(rho)
                factor = torch.where(prim > 100.0 * dual, 2.0, shrink)
                rho = rho * factor
                w = w / factor[:, None, None]  # w is the scaled dual y / rho
        if it % 50 == 0:
            w = _sym(w)
    mu = _mean_for(z, mu_hat, theta, theta0, alpha)
    return mu, z, it, res


# --------------------------------------------------------------------------------------------
# public solver API
# --------------------------------------------------------------------------------------------


def _check_solver_args(admm_rho: float | None, max_iter: int, tol: float) -> None:
    if admm_rho is not None:
        rho = _check_real("admm_rho", admm_rho)
        if rho <= 0:
            raise ValueError(f"admm_rho must be > 0, or None for an adaptive penalty; got {rho}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int; got {max_iter!r}.")
    tol = _check_real("tol", tol)
    if tol <= 0:
        raise ValueError(f"tol must be > 0 (e.g. 1e-9); got {tol}.")


def _solve(
    prob: _Problem, mult: float, admm_rho: float | None, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(mu (B, d), S (B, d, d), case (B,)) for a prepared problem."""
    alpha = torch.full_like(prob.theta0, mult)
    mu, s, case, _ = _closed_form(prob.s_hat, prob.mu_hat, prob.theta, prob.theta0, alpha)
    if prob.r is None:
        return mu, s, case
    # Heads whose closed-form optimum already satisfies S >= R are optimal for the full problem.
    margin = torch.linalg.eigvalsh(s - prob.r)[:, 0]
    scale = torch.maximum(_fro(prob.s_hat), _fro(prob.r))
    need = margin < -tol * scale
    if bool(need.any()):
        idx = need.nonzero().squeeze(-1)
        mu_a, s_a, iters, res = _admm(
            prob.s_hat[idx], prob.mu_hat[idx], prob.theta[idx], prob.theta0[idx], alpha[idx],
            prob.r[idx], admm_rho, max_iter, tol,
        )  # fmt: skip
        if bool((res > tol).any()):
            warnings.warn(
                f"Stage-2 ADMM stopped after {iters} iterations with relative residual "
                f"{float(res.max()):.2e} > tol={tol:g}; the result is feasible but may be slightly "
                "suboptimal. Raise max_iter or tol.",
                RuntimeWarning,
                stacklevel=3,
            )
        mu = mu.index_put((idx,), mu_a)
        s = s.index_put((idx,), s_a)
        case = case.index_put((idx,), torch.full_like(idx, CASE_ADMM))
    return mu, s, case


def gaussian_projection(
    mu_hat: Tensor,
    sigma_hat: Tensor,
    theta: Tensor,
    theta0: Tensor | float,
    alpha: Alpha,
    ref_cov: Tensor | None = None,
    *,
    eig_floor: float = 1e-6,
    admm_rho: float | None = None,
    max_iter: int = 20000,
    tol: float = 1e-9,
) -> tuple[Tensor, Tensor]:
    """Nearest Gaussian ``N(mu*, S*^2)`` to ``N(mu_hat, sigma_hat)`` that the probe accepts.

    Solves ``min ||mu - mu_hat||^2 + ||S - S_hat||_F^2`` over ``S >= 0`` subject to
    ``theta0 + theta^T mu + alpha * ||S theta|| <= 0`` (and ``S >= R``, ``R = ref_cov^{1/2}``, when
    ``ref_cov`` is given), exactly: closed form without ``ref_cov``, ADMM with it. Probe convention:
    ``theta^T a + theta0 > 0`` means undesirable (label 1).

    Shapes: mu_hat (..., d), sigma_hat (..., d, d), theta (..., d), theta0 (...) or a float,
    ref_cov (..., d, d) or None; batch dims broadcast (typically ``...`` = H heads).
    ``sigma_hat`` is regularised once by :func:`regularize_covariance` (``eig_floor``).
    ``admm_rho``: fixed ADMM penalty; None starts at 2 * alpha and adapts it per head.
    ``max_iter``/``tol``: ADMM stop (relative primal and dual residuals); a RuntimeWarning is
    issued if it runs out of iterations (the result is still feasible).

    Returns ``(mu_star (..., d), s_star (..., d, d))``, ``s_star`` the symmetric PSD square root of
    the new covariance, both in mu_hat's float dtype (float64 if mu_hat is not floating).
    Raises TypeError for a bare-number alpha, SolverError for a zero theta or non-finite input.
    """
    mult = _multiplier(alpha)
    _check_solver_args(admm_rho, max_iter, tol)
    prob = _prepare(mu_hat, sigma_hat, theta, theta0, ref_cov, eig_floor)
    mu, s, _ = _solve(prob, mult, admm_rho, max_iter, tol)
    b, d = prob.batch_shape, prob.d
    return mu.reshape(*b, d).to(prob.out_dtype), s.reshape(*b, d, d).to(prob.out_dtype)


def _ot_map64(s_hat: Tensor, inv_sqrt: Tensor, s_star: Tensor) -> Tensor:
    """A = Sigma^{-1/2} (S_hat Sigma* S_hat)^{1/2} Sigma^{-1/2} with Sigma* = S* S*^T (float64).

    The middle root is U diag(sv) U^T from the SVD of M = S_hat S* (M M^T = S_hat Sigma* S_hat):
    singular values carry an absolute error ~eps ||M||, whereas square-rooting the eigenvalues of
    M M^T would give ~sqrt(eps) ||M||, which the floored Sigma^{-1/2} then amplifies (identity-map
    error 2e-5 instead of 1e-10 on a rank-deficient covariance).
    """
    u, sv, _ = torch.linalg.svd(s_hat @ s_star)
    middle = (u * sv.unsqueeze(-2)) @ u.transpose(-1, -2)
    return _sym(inv_sqrt @ middle @ inv_sqrt)


def ot_map(
    mu_hat: Tensor,
    sigma_hat: Tensor,
    mu_star: Tensor,
    s_star: Tensor,
    *,
    eig_floor: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Gaussian Monge map ``a -> A a + b`` from ``N(mu_hat, sigma_hat)`` to ``N(mu*, S* S*^T)``.

    ``A = Sigma^{-1/2} (Sigma^{1/2} Sigma* Sigma^{1/2})^{1/2} Sigma^{-1/2}`` (symmetric PSD) and
    ``b = mu* - A mu_hat``, computed with a symmetric eigendecomposition of ``sigma_hat`` and one
    SVD (no general sqrtm, no complex round-off; accurate even for rank-deficient covariances) and
    the same regularised ``sigma_hat`` as :func:`gaussian_projection`, so the map pushes exactly the
    Gaussian that was projected.

    Shapes: mu_hat (..., d), sigma_hat (..., d, d), mu_star (..., d), s_star (..., d, d); batch
    dims broadcast. Returns ``(A (..., d, d), b (..., d))`` in mu_hat's float dtype.
    """
    mu = _as_tensor("mu_hat", mu_hat)
    out_dtype = _out_dtype(mu)
    ms = _as_tensor("mu_star", mu_star)
    ss = _as_tensor("s_star", s_star)
    sig = _as_tensor("sigma_hat", sigma_hat)
    if mu.ndim < 1 or ms.ndim < 1 or sig.ndim < 2 or ss.ndim < 2:
        raise ValueError("ot_map expects mu_hat/mu_star (..., d) and sigma_hat/s_star (..., d, d).")
    d = mu.shape[-1]
    if ms.shape[-1] != d or sig.shape[-2:] != (d, d) or ss.shape[-2:] != (d, d):
        raise ValueError(
            f"Dimension mismatch: mu_hat {tuple(mu.shape)}, sigma_hat {tuple(sig.shape)}, "
            f"mu_star {tuple(ms.shape)}, s_star {tuple(ss.shape)}."
        )
    for name, t, tail in (("mu_hat", mu, 1), ("mu_star", ms, 1), ("s_star", ss, 2)):
        _check_finite(name, t, t.ndim - tail)
    dev = mu.device
    _, s_hat, inv_sqrt = regularize_covariance(sig.to(dev), eig_floor)
    a = _ot_map64(s_hat, inv_sqrt, ss.to(device=dev, dtype=_DTYPE))
    b = ms.to(device=dev, dtype=_DTYPE) - (a @ mu.to(_DTYPE).unsqueeze(-1)).squeeze(-1)
    return a.to(out_dtype), b.to(out_dtype)


def projection_objective(
    mu: Tensor, s: Tensor, mu_hat: Tensor, sigma_hat: Tensor, *, eig_floor: float = 1e-6
) -> Tensor:
    """``||mu - mu_hat||^2 + ||S - S_hat||_F^2`` with ``S_hat`` the root of the regularised sigma_hat.

    The quantity :func:`gaussian_projection` minimises; for tests and diagnostics.
    mu, mu_hat (..., d); s, sigma_hat (..., d, d). Returns (...) float64.
    """
    _, s_hat, _ = regularize_covariance(sigma_hat, eig_floor)
    mu64 = _as_tensor("mu", mu).to(_DTYPE)
    dmu = mu64 - _as_tensor("mu_hat", mu_hat).to(device=mu64.device, dtype=_DTYPE)
    ds = _as_tensor("s", s).to(device=mu64.device, dtype=_DTYPE) - s_hat.to(mu64.device)
    return (dmu * dmu).sum(-1) + (ds * ds).sum((-1, -2))


def chance_constraint_value(
    mu: Tensor, s: Tensor, theta: Tensor, theta0: Tensor | float, alpha: Alpha
) -> Tensor:
    """``theta0 + theta^T mu + alpha * ||S theta||``: <= 0 means the constraint holds.

    For ChanceLevel(gamma) and a Gaussian N(mu, S S^T), <= 0 is equivalent to the probe calling a
    sample desirable with probability >= 1 - gamma. mu (..., d), s (..., d, d), theta (..., d),
    theta0 (...). Returns (...) float64.
    """
    mult = _multiplier(alpha)
    mu64 = _as_tensor("mu", mu).to(_DTYPE)
    dev = mu64.device
    th = _as_tensor("theta", theta).to(device=dev, dtype=_DTYPE)
    th0 = _as_tensor("theta0", theta0).to(device=dev, dtype=_DTYPE)
    s64 = _as_tensor("s", s).to(device=dev, dtype=_DTYPE)
    st = (s64 @ th.unsqueeze(-1)).squeeze(-1).norm(dim=-1)
    return th0 + (th * mu64).sum(-1) + mult * st


def guarantee_rate(
    acts: Tensor, A: Tensor, b: Tensor, theta: Tensor, theta0: Tensor | float, *, mask: Tensor | None = None
) -> Tensor:
    """Fraction of mapped activations ``A a + b`` that the probe calls desirable (``< 0``), per head.

    Why: the chance constraint promises this fraction is >= 1 - gamma only if the flagged
    activations are Gaussian; on real held-out activations compare it with the nominal
    ``1 - gamma`` (RADIANT's own diagnostics found 53-82 % for a nominal 90 %). Not meaningful for
    CASE_COLLAPSE heads: they map every activation onto the boundary (score 0 up to rounding).

    acts (N, ..., d): held-out activations, normally only the ones the head's probe flags; or all of
    them together with ``mask`` (N, ...) bool selecting the flagged ones per head. A (..., d, d),
    b (..., d), theta (..., d), theta0 (...). Returns (...) float64 (NaN where a head has no sample).
    """
    x = _as_tensor("acts", acts).to(_DTYPE)
    dev = x.device
    a64 = _as_tensor("A", A).to(device=dev, dtype=_DTYPE)
    b64 = _as_tensor("b", b).to(device=dev, dtype=_DTYPE)
    th = _as_tensor("theta", theta).to(device=dev, dtype=_DTYPE)
    th0 = _as_tensor("theta0", theta0).to(device=dev, dtype=_DTYPE)
    # theta^T (A a + b) = (A^T theta)^T a + theta^T b: one dot product per activation.
    wt = (a64.transpose(-1, -2) @ th.unsqueeze(-1)).squeeze(-1)
    score = (x * wt).sum(-1) + (th * b64).sum(-1) + th0
    good = (score < 0).to(_DTYPE)
    if mask is None:
        return good.mean(0)
    m = _as_tensor("mask", mask).to(device=dev, dtype=torch.bool)
    m = m.expand_as(good).to(_DTYPE)
    return (good * m).sum(0) / m.sum(0)


@dataclass(frozen=True)
class TransportResult:
    """Stage-2 fit for a batch of heads: the edit ``a -> A a + b`` and the target Gaussian.

    A (..., d, d) symmetric PSD, b (..., d), mu_star (..., d), s_star (..., d, d) (symmetric PSD
    root of the target covariance), case (...) int64: CASE_SATISFIED (0, identity map),
    CASE_INTERIOR (1), CASE_COLLAPSE (2), or CASE_ADMM (3, reference constraint active).
    """

    A: Tensor
    b: Tensor
    mu_star: Tensor
    s_star: Tensor
    case: Tensor


def fit_head_maps(
    mu_hat: Tensor,
    sigma_hat: Tensor,
    theta: Tensor,
    theta0: Tensor | float,
    alpha: Alpha,
    ref_cov: Tensor | None = None,
    *,
    eig_floor: float = 1e-6,
    admm_rho: float | None = None,
    max_iter: int = 20000,
    tol: float = 1e-9,
) -> TransportResult:
    """:func:`gaussian_projection` then :func:`ot_map`, sharing one covariance regularisation.

    Same arguments and shapes as :func:`gaussian_projection`; everything is in mu_hat's float dtype
    except ``case``. With ``ref_cov``, heads whose unconstrained optimum already satisfies
    ``S >= R`` keep their closed-form case; the others report CASE_ADMM.
    """
    mult = _multiplier(alpha)
    _check_solver_args(admm_rho, max_iter, tol)
    prob = _prepare(mu_hat, sigma_hat, theta, theta0, ref_cov, eig_floor)
    mu, s, case = _solve(prob, mult, admm_rho, max_iter, tol)
    a = _ot_map64(prob.s_hat, prob.inv_sqrt, s)
    b = mu - (a @ prob.mu_hat.unsqueeze(-1)).squeeze(-1)
    shp, d, dt = prob.batch_shape, prob.d, prob.out_dtype
    return TransportResult(
        A=a.reshape(*shp, d, d).to(dt),
        b=b.reshape(*shp, d).to(dt),
        mu_star=mu.reshape(*shp, d).to(dt),
        s_star=s.reshape(*shp, d, d).to(dt),
        case=case.reshape(shp),
    )
