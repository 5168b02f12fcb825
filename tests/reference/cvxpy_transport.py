"""Reference Stage-2 solver: the original conic formulation, solved by cvxpy + Clarabel.

Slow (seconds at d = 64) but independent of otguard's closed form and ADMM: variables mu and a
symmetric PSD S, objective ||mu - mu_hat||^2 + ||S - S_hat||_F^2, second-order-cone chance
constraint theta0 + theta^T mu + alpha ||S theta|| <= 0, and optionally S - R >= 0 (an LMI).
Works on one head at a time, in NumPy float64.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReferenceSolution:
    """Optimum of one head: mu (d,), s (d, d), objective value, solver status, Clarabel's own time (s)."""

    mu: np.ndarray
    s: np.ndarray
    objective: float
    status: str
    solve_time: float


def psd_sqrt(sigma: np.ndarray, eig_floor: float | None = None) -> np.ndarray:
    """Symmetric PSD square root; with ``eig_floor``, eigenvalues floored at eig_floor * max(1, max eig).

    Mirrors otguard's regularisation in plain NumPy so the reference sees the same S_hat.
    """
    evals, evecs = np.linalg.eigh(0.5 * (sigma + sigma.T))
    if eig_floor is None:
        evals = np.clip(evals, 0.0, None)
    else:
        evals = np.maximum(evals, eig_floor * max(1.0, float(evals[-1])))
    root = (evecs * np.sqrt(evals)) @ evecs.T
    return 0.5 * (root + root.T)


def solve_reference(
    mu_hat: np.ndarray,
    s_hat: np.ndarray,
    theta: np.ndarray,
    theta0: float,
    alpha: float,
    r: np.ndarray | None = None,
) -> ReferenceSolution:
    """Solve one head's Stage-2 problem with Clarabel.

    mu_hat (d,), s_hat (d, d) = Sigma_hat^{1/2}, theta (d,), theta0 scalar, alpha the multiplier,
    r (d, d) = Sigma_ref^{1/2} or None.
    """
    import cvxpy as cp

    d = mu_hat.shape[0]
    mu = cp.Variable(d)
    s = cp.Variable((d, d), PSD=True)
    objective = cp.Minimize(cp.sum_squares(mu - mu_hat) + cp.sum_squares(s - s_hat))
    constraints = [theta0 + theta @ mu + alpha * cp.norm(s @ theta, 2) <= 0]
    if r is not None:
        constraints.append(s - r >> 0)
    prob = cp.Problem(objective, constraints)
    with warnings.catch_warnings():
        # "Solution may be inaccurate" is accepted: callers compare objectives with a tolerance.
        warnings.simplefilter("ignore", UserWarning)
        prob.solve(solver=cp.CLARABEL)
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"Clarabel failed: {prob.status}")
    s_val = 0.5 * (s.value + s.value.T)
    mu_val = np.asarray(mu.value)
    obj = float(np.sum((mu_val - mu_hat) ** 2) + np.sum((s_val - s_hat) ** 2))
    solve_time = float(prob.solver_stats.solve_time or float("nan"))
    return ReferenceSolution(mu_val, s_val, obj, prob.status, solve_time)
