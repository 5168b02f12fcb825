"""Stage-2 solver: closed form and ADMM against cvxpy + Clarabel, the OT map, validation, guarantee."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from otguard.errors import OtguardError, SolverError
from otguard.transport import (
    CASE_ADMM,
    CASE_COLLAPSE,
    CASE_INTERIOR,
    CASE_SATISFIED,
    ChanceLevel,
    Margin,
    chance_constraint_value,
    fit_head_maps,
    gaussian_projection,
    guarantee_rate,
    ot_map,
    projection_objective,
    regularize_covariance,
    shrink_covariance,
)
from tests.reference.cvxpy_transport import psd_sqrt, solve_reference

torch.set_num_threads(1)

F64 = torch.float64
ALPHAS = [ChanceLevel(0.1), Margin(0.5), Margin(5.0), Margin(20.0)]
# Signed offset of the source mean from the boundary, in units of sigma_u, as a function of the
# multiplier m, chosen so that each case of docs/method.md §9.3 is guaranteed (2K / (n sigma_u) is in [1, 2]).
OFFSETS = {
    "satisfied": (lambda m: -m - 0.5, CASE_SATISFIED),
    "interior-below": (lambda m: -m / 2, CASE_INTERIOR),
    "interior-above": (lambda m: 0.5 / m, CASE_INTERIOR),
    "collapse": (lambda m: 3.0 / m, CASE_COLLAPSE),
}


def _rand_cov(rng: np.random.Generator, d: int, lo: float = 0.1, hi: float = 3.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    ev = np.exp(rng.uniform(np.log(lo), np.log(hi), d))
    return (q * ev) @ q.T


def _instance(seed: int, d: int, offset: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """mu_hat, sigma_hat, theta, theta0 with delta = offset * ||theta|| * sigma_u."""
    rng = np.random.default_rng(seed)
    sig = _rand_cov(rng, d)
    mu = rng.standard_normal(d)
    th = rng.standard_normal(d)
    th *= rng.uniform(0.5, 2.0) / np.linalg.norm(th)
    n = np.linalg.norm(th)
    sigma_u = math.sqrt(th @ sig @ th) / n
    th0 = float(n * sigma_u * offset - th @ mu)
    return mu, sig, th, th0


def _t(x: np.ndarray | float) -> torch.Tensor:
    return torch.as_tensor(x, dtype=F64)


def _check_against(ours: float, ref: float) -> None:
    """Equal within 1e-6 relative (1e-9 absolute near 0), and never worse beyond that."""
    tol = 1e-6 * abs(ref) + 1e-9
    assert abs(ours - ref) <= tol, (ours, ref)
    assert ours <= ref + tol


def _check_feasible(mu, s, theta, theta0, alpha, ref_sqrt=None) -> None:
    s64 = s.to(F64)
    scale = float(torch.linalg.matrix_norm(s64)) + 1.0
    con = float(chance_constraint_value(mu, s64, theta, theta0, alpha))
    assert con <= 1e-7 * scale * float(torch.linalg.vector_norm(_t(theta))), con
    assert torch.allclose(s64, s64.T, atol=1e-12 * scale, rtol=0)
    assert float(torch.linalg.eigvalsh(s64)[0]) >= -1e-10 * scale
    if ref_sqrt is not None:
        assert float(torch.linalg.eigvalsh(s64 - _t(ref_sqrt))[0]) >= -1e-8 * scale


# ----------------------------------------------------------------------------------------------
# closed form vs Clarabel
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [4, 8, 16, 32])
@pytest.mark.parametrize("alpha", ALPHAS, ids=lambda a: repr(a))
@pytest.mark.parametrize("where", list(OFFSETS))
def test_closed_form_matches_clarabel(d: int, alpha, where: str) -> None:
    pytest.importorskip("cvxpy")
    offset_fn, expected_case = OFFSETS[where]
    m = alpha.multiplier
    seed = 1000 * d + 10 * list(OFFSETS).index(where) + ALPHAS.index(alpha)
    mu, sig, th, th0 = _instance(seed, d, offset_fn(m))
    res = fit_head_maps(_t(mu), _t(sig), _t(th), th0, alpha)
    assert int(res.case) == expected_case
    ref = solve_reference(mu, psd_sqrt(sig, 1e-6), th, th0, m)
    ours = float(projection_objective(res.mu_star, res.s_star, _t(mu), _t(sig)))
    _check_against(ours, ref.objective)
    _check_feasible(res.mu_star, res.s_star, _t(th), th0, alpha)
    if expected_case == CASE_SATISFIED:
        assert ours == 0.0
        assert torch.allclose(res.A, torch.eye(d, dtype=F64), atol=1e-10)
        assert torch.allclose(res.b, torch.zeros(d, dtype=F64), atol=1e-9)
    elif expected_case == CASE_COLLAPSE:  # no variance left along theta, mean on the boundary
        assert float(torch.linalg.vector_norm(res.s_star @ _t(th))) < 1e-10
        assert abs(float(_t(th) @ res.mu_star) + th0) < 1e-10
    else:  # interior: constraint active
        assert abs(float(chance_constraint_value(res.mu_star, res.s_star, _t(th), th0, alpha))) < 1e-9


# ----------------------------------------------------------------------------------------------
# ADMM with the reference constraint vs Clarabel
# ----------------------------------------------------------------------------------------------

ADMM_CASES = [
    (d, alpha, where)
    for d in (4, 8, 16)
    for alpha in (ChanceLevel(0.1), Margin(5.0), Margin(20.0))
    for where in ("interior-below", "collapse")
] + [(32, Margin(20.0), "collapse")]


@pytest.mark.parametrize(("d", "alpha", "where"), ADMM_CASES, ids=lambda x: repr(x))
def test_admm_matches_clarabel(d: int, alpha, where: str) -> None:
    pytest.importorskip("cvxpy")
    m = alpha.multiplier
    seed = 7000 + 100 * d + 10 * ALPHAS.index(alpha) + (where == "collapse")
    mu, sig, th, th0 = _instance(seed, d, OFFSETS[where][0](m))
    ref_cov = _rand_cov(np.random.default_rng(seed + 1), d, 0.05, 1.0)
    r = psd_sqrt(ref_cov)
    res = fit_head_maps(_t(mu), _t(sig), _t(th), th0, alpha, _t(ref_cov))
    if where == "collapse":  # the unconstrained optimum has S* theta = 0, so S >= R must bind
        assert int(res.case) == CASE_ADMM
    ref = solve_reference(mu, psd_sqrt(sig, 1e-6), th, th0, m, r)
    ours = float(projection_objective(res.mu_star, res.s_star, _t(mu), _t(sig)))
    _check_against(ours, ref.objective)
    _check_feasible(res.mu_star, res.s_star, _t(th), th0, alpha, ref_sqrt=r)
    # The reference constraint prevents the collapse: the new mean sits past the boundary.
    if int(res.case) == CASE_ADMM:
        assert float(torch.linalg.vector_norm(res.s_star @ _t(th))) > 0


def test_admm_fixed_rho_agrees_with_adaptive() -> None:
    mu, sig, th, th0 = _instance(11, 8, 0.3)
    ref_cov = _t(_rand_cov(np.random.default_rng(12), 8, 0.05, 1.0))
    a = gaussian_projection(_t(mu), _t(sig), _t(th), th0, Margin(5.0), ref_cov)
    b = gaussian_projection(_t(mu), _t(sig), _t(th), th0, Margin(5.0), ref_cov, admm_rho=3.0)
    oa = float(projection_objective(*a, _t(mu), _t(sig)))
    ob = float(projection_objective(*b, _t(mu), _t(sig)))
    assert abs(oa - ob) <= 1e-7 * oa


def test_zero_reference_is_the_closed_form() -> None:
    # R = 0 makes S >= R the PSD constraint, which is never active (docs/method.md §9.2, fact 1).
    mu, sig, th, th0 = _instance(21, 8, 0.2)
    res0 = fit_head_maps(_t(mu), _t(sig), _t(th), th0, ChanceLevel(0.1))
    res1 = fit_head_maps(_t(mu), _t(sig), _t(th), th0, ChanceLevel(0.1), torch.zeros(8, 8, dtype=F64))
    assert int(res1.case) == int(res0.case) == CASE_INTERIOR
    assert torch.allclose(res0.s_star, res1.s_star, atol=1e-12)


def test_admm_out_of_iterations_warns_but_stays_feasible() -> None:
    mu, sig, th, th0 = _instance(31, 8, 1.0)
    ref_cov = _rand_cov(np.random.default_rng(32), 8, 0.05, 1.0)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        mu_s, s_s = gaussian_projection(_t(mu), _t(sig), _t(th), th0, Margin(20.0), _t(ref_cov), max_iter=3)
    _check_feasible(mu_s, s_s, _t(th), th0, Margin(20.0), ref_sqrt=psd_sqrt(ref_cov))


# ----------------------------------------------------------------------------------------------
# OT map
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [ChanceLevel(0.1), Margin(5.0)], ids=repr)
def test_ot_map_pushes_source_onto_target(alpha) -> None:
    d = 16
    mu, sig, th, th0 = _instance(41, d, 0.3)
    mu_s, s_s = gaussian_projection(_t(mu), _t(sig), _t(th), th0, alpha)
    a, b = ot_map(_t(mu), _t(sig), mu_s, s_s)
    sig_reg, _, _ = regularize_covariance(_t(sig))
    assert torch.allclose(a, a.T, atol=1e-13)
    assert float(torch.linalg.eigvalsh(a)[0]) >= -1e-12
    assert torch.allclose(a @ sig_reg @ a, s_s @ s_s, atol=1e-10)
    assert torch.allclose(a @ _t(mu) + b, mu_s, atol=1e-12)


def test_ot_map_is_identity_for_unchanged_gaussian() -> None:
    mu, sig, _, _ = _instance(42, 12, 0.0)
    _, s_hat, _ = regularize_covariance(_t(sig))
    a, b = ot_map(_t(mu), _t(sig), _t(mu), s_hat)
    assert torch.allclose(a, torch.eye(12, dtype=F64), atol=1e-12)
    assert torch.allclose(b, torch.zeros(12, dtype=F64), atol=1e-12)


def test_fit_head_maps_equals_projection_then_map() -> None:
    mu, sig, th, th0 = _instance(43, 8, 0.5)
    res = fit_head_maps(_t(mu), _t(sig), _t(th), th0, Margin(0.5))
    mu_s, s_s = gaussian_projection(_t(mu), _t(sig), _t(th), th0, Margin(0.5))
    a, b = ot_map(_t(mu), _t(sig), mu_s, s_s)
    assert torch.equal(res.mu_star, mu_s) and torch.equal(res.s_star, s_s)
    assert torch.allclose(res.A, a, atol=1e-13) and torch.allclose(res.b, b, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# degenerate inputs, batching, dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [ChanceLevel(0.1), Margin(20.0)], ids=repr)
@pytest.mark.parametrize("with_ref", [False, True])
def test_rank_deficient_covariance_gives_finite_maps(alpha, with_ref: bool) -> None:
    d, n = 16, 5  # fewer flagged samples than dimensions: singular ML covariance
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen, dtype=F64) * 2.0
    mu, sig = x.mean(0), torch.cov(x.T, correction=0)
    th = torch.randn(d, generator=gen, dtype=F64)
    th0 = float(-(th @ mu) + 1.0)
    ref = torch.cov(torch.randn(4, d, generator=gen, dtype=F64).T, correction=0) if with_ref else None
    res = fit_head_maps(mu, sig, th, th0, alpha, ref)
    for t in (res.A, res.b, res.mu_star, res.s_star):
        assert torch.isfinite(t).all()
    _check_feasible(res.mu_star, res.s_star, th, th0, alpha, None if ref is None else psd_sqrt(ref.numpy()))
    sig_reg, s_hat, _ = regularize_covariance(sig)
    assert torch.allclose(res.A @ sig_reg @ res.A, res.s_star @ res.s_star, atol=1e-8)
    a_id, b_id = ot_map(mu, sig, mu, s_hat)
    assert torch.allclose(a_id, torch.eye(d, dtype=F64), atol=1e-8)


def test_regularize_covariance_floors_relative_to_top_eigenvalue() -> None:
    sig = torch.diag(_t([100.0, 1.0, 0.0, -1e-3]))
    reg, root, inv_root = regularize_covariance(sig, 1e-6)
    ev = torch.linalg.eigvalsh(reg)
    assert torch.allclose(ev, _t([1e-4, 1e-4, 1.0, 100.0]))
    assert torch.allclose(root @ root, reg)
    assert torch.allclose(inv_root @ reg @ inv_root, torch.eye(4, dtype=F64))


# ----------------------------------------------------------------------------------------------
# covariance shrinkage (oracle-approximating, toward a scaled identity)
# ----------------------------------------------------------------------------------------------


def _oas_reference(sig: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """Chen, Wiesel, Eldar & Hero (2010), eq. 23, written out with NumPy traces."""
    p = sig.shape[0]
    tr, tr2 = float(np.trace(sig)), float(np.trace(sig @ sig))
    rho = min(1.0, ((1 - 2 / p) * tr2 + tr**2) / ((n + 1 - 2 / p) * (tr2 - tr**2 / p)))
    return (1 - rho) * sig + rho * tr / p * np.eye(p), rho


def test_shrink_covariance_matches_the_published_formula_batched() -> None:
    rng = np.random.default_rng(7)
    sigs = [_rand_cov(rng, 6, 0.01, 4.0) for _ in range(3)] + [np.diag([5.0, 1.0, 0.0, 0.0, 0.0, 0.0])]
    counts = [3, 40, 50000, 4]
    shrunk, rho = shrink_covariance(_t(np.stack(sigs)), torch.tensor(counts))
    assert shrunk.shape == (4, 6, 6) and rho.shape == (4,)
    for i, (sig, n) in enumerate(zip(sigs, counts, strict=True)):
        want, want_rho = _oas_reference(sig, n)
        assert float(rho[i]) == pytest.approx(want_rho, rel=1e-12)
        assert torch.allclose(shrunk[i], _t(want), rtol=1e-12, atol=1e-14)
    assert float(rho[2]) < 1e-3 < float(rho[1]) < 1.0  # falls with the number of rows
    assert float(rho[0]) == 1.0  # 3 rows in d = 6: all the way to the scaled identity
    # the trace (total variance) is kept, and the smallest eigenvalue is lifted to rho * tr / d
    for i, sig in enumerate(sigs):
        assert float(torch.trace(shrunk[i])) == pytest.approx(float(np.trace(sig)), rel=1e-12)
        floor = float(rho[i]) * float(np.trace(sig)) / 6
        assert float(torch.linalg.eigvalsh(shrunk[i])[0]) >= floor * (1 - 1e-12)


def test_shrink_covariance_leaves_scaled_identity_and_zero_alone() -> None:
    eye = 2.5 * torch.eye(4, dtype=F64)
    shrunk, rho = shrink_covariance(eye, 10)
    assert torch.equal(shrunk, eye) and float(rho) == 1.0
    zero, rho0 = shrink_covariance(torch.zeros(3, 3, dtype=F64), 1)
    assert torch.equal(zero, torch.zeros(3, 3, dtype=F64)) and float(rho0) == 0.0
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        shrink_covariance(eye, 0)
    with pytest.raises(SolverError, match="NaN"):
        shrink_covariance(torch.full((2, 2), math.nan, dtype=F64), 5)


def _few_rows_problem(n: int, d: int = 64, seed: int = 0):
    """n source rows of an anisotropic head (d = 64 as on SmolLM2), a desirable reference set of 400
    rows, and a probe whose boundary the source mean crosses by half a standard deviation."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1.5, d, dtype=F64)
    x = torch.randn(n, d, generator=gen, dtype=F64) * scales
    ref_rows = torch.randn(400, d, generator=gen, dtype=F64) * scales
    th = torch.randn(d, generator=gen, dtype=F64)
    mu, sig = x.mean(0), torch.cov(x.T, correction=0)
    th0 = float(-(th @ mu) + 0.5 * torch.sqrt(th @ sig @ th))
    return mu, sig, th, th0, torch.cov(ref_rows.T, correction=0)


@pytest.mark.parametrize("n", [4, 8, 32])
@pytest.mark.parametrize("alpha", [ChanceLevel(0.1), Margin(15.0)], ids=repr)
def test_few_rows_shrunk_covariance_keeps_the_map_bounded_and_feasible(n: int, alpha) -> None:
    """4-32 rows in d = 64: the raw estimate gives ||A|| up to ~1e3 with the reference constraint;
    the shrunk one keeps ||A|| <= sqrt(lambda_max(Sigma*) / lambda_min(Sigma_s)) <= 10, and the map
    still pushes N(mu_hat, Sigma_s) exactly onto a target that meets the chance constraint."""
    mu, sig, th, th0, ref = _few_rows_problem(n)
    ref = ref if isinstance(alpha, Margin) else None
    shrunk, rho = shrink_covariance(sig, n)
    res = fit_head_maps(mu, shrunk, th, th0, alpha, ref)
    a_norm = float(torch.linalg.matrix_norm(res.A, ord=2))
    target = res.s_star @ res.s_star
    ev = torch.linalg.eigvalsh(shrunk)
    assert a_norm <= math.sqrt(float(torch.linalg.eigvalsh(target)[-1]) / float(ev[0])) * (1 + 1e-9)
    assert float(ev[-1] / ev[0]) <= 1 + 64 * (1 - float(rho)) / float(rho) + 1e-9  # documented bound
    assert a_norm <= 10.0
    _check_feasible(res.mu_star, res.s_star, th, th0, alpha, None if ref is None else psd_sqrt(ref.numpy()))
    assert torch.allclose(res.A @ shrunk @ res.A, target, atol=1e-9 * float(target.norm()))
    assert torch.allclose(res.A @ mu + res.b, res.mu_star, atol=1e-10)
    if ref is not None and n == 4:  # the same problem without shrinkage: why it is needed
        raw = fit_head_maps(mu, sig, th, th0, alpha, ref)
        assert float(torch.linalg.matrix_norm(raw.A, ord=2)) > 100.0


@pytest.mark.parametrize("alpha", [ChanceLevel(0.1), Margin(5.0)], ids=repr)
def test_many_rows_shrinkage_changes_the_fit_by_at_most_a_few_rho(alpha) -> None:
    """50,000 rows in d = 16: rho < 1e-3, and A, b and mu* move by at most 10 rho (relative; measured:
    up to 6 rho for A with the reference constraint, 1-3 rho otherwise)."""
    d, n = 16, 50000
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    scales = torch.logspace(0, -1, d, dtype=F64)
    x = (torch.randn(n, d, generator=gen, dtype=F64) * scales) @ q.T
    ref_rows = (torch.randn(n, d, generator=gen, dtype=F64) * 0.8 * scales) @ q.T
    th = torch.randn(d, generator=gen, dtype=F64)
    mu, sig = x.mean(0), torch.cov(x.T, correction=0)
    th0 = float(-(th @ mu) + 0.5 * torch.sqrt(th @ sig @ th))
    ref = torch.cov(ref_rows.T, correction=0) if isinstance(alpha, Margin) else None
    shrunk, rho = shrink_covariance(sig, n)
    assert 0.0 < float(rho) < 1e-3
    raw, new = fit_head_maps(mu, sig, th, th0, alpha, ref), fit_head_maps(mu, shrunk, th, th0, alpha, ref)
    tol = 10 * float(rho)
    assert float(torch.linalg.matrix_norm(new.A - raw.A, ord=2)) <= tol * float(
        torch.linalg.matrix_norm(raw.A, ord=2)
    )
    assert float((new.b - raw.b).norm()) <= tol * float(raw.b.norm())
    assert float((new.mu_star - raw.mu_star).norm()) <= tol * float((raw.mu_star - mu).norm())


def _batch(seed: int, shape: tuple[int, ...], d: int, offsets: list[float]):
    mus, sigs, ths, th0s = [], [], [], []
    for i in range(math.prod(shape)):
        mu, sig, th, th0 = _instance(seed + i, d, offsets[i % len(offsets)])
        mus.append(mu), sigs.append(sig), ths.append(th), th0s.append(th0)
    return (
        _t(np.stack(mus)).reshape(*shape, d),
        _t(np.stack(sigs)).reshape(*shape, d, d),
        _t(np.stack(ths)).reshape(*shape, d),
        _t(np.array(th0s)).reshape(shape),
    )


@pytest.mark.parametrize("with_ref", [False, True])
def test_batched_equals_per_head_loop(with_ref: bool) -> None:
    shape, d = (2, 3), 6
    mu, sig, th, th0 = _batch(50, shape, d, [-3.0, -0.5, 0.4, 3.0, 0.1, -0.2])
    ref = _t(np.stack([_rand_cov(np.random.default_rng(60 + i), d, 0.05, 1.0) for i in range(6)]))
    ref = ref.reshape(*shape, d, d) if with_ref else None
    alpha = Margin(5.0) if with_ref else ChanceLevel(0.1)
    res = fit_head_maps(mu, sig, th, th0, alpha, ref)
    assert res.A.shape == (*shape, d, d) and res.b.shape == (*shape, d) and res.case.shape == shape
    if not with_ref:
        assert set(res.case.flatten().tolist()) == {CASE_SATISFIED, CASE_INTERIOR, CASE_COLLAPSE}
    for idx in np.ndindex(*shape):
        one = fit_head_maps(mu[idx], sig[idx], th[idx], th0[idx], alpha, None if ref is None else ref[idx])
        assert int(one.case) == int(res.case[idx])
        for name in ("A", "b", "mu_star", "s_star"):
            assert torch.allclose(getattr(one, name), getattr(res, name)[idx], atol=1e-8, rtol=1e-8), name


def test_batch_dims_broadcast_scalar_theta0() -> None:
    mu, sig, th, _ = _batch(70, (3,), 5, [0.0])
    mu_s, s_s = gaussian_projection(mu, sig, th[0], 0.5, ChanceLevel(0.2))
    assert mu_s.shape == (3, 5) and s_s.shape == (3, 5, 5)
    mu_1, s_1 = gaussian_projection(mu[1], sig[1], th[0], 0.5, ChanceLevel(0.2))
    assert torch.allclose(mu_s[1], mu_1) and torch.allclose(s_s[1], s_1)


def test_float32_inputs_return_float32_close_to_float64() -> None:
    mu, sig, th, th0 = _batch(80, (4,), 8, [-0.5, 0.5, 3.0, -5.0])
    r64 = fit_head_maps(mu, sig, th, th0, ChanceLevel(0.1))
    r32 = fit_head_maps(mu.float(), sig.float(), th.float(), th0.float(), ChanceLevel(0.1))
    for name in ("A", "b", "mu_star", "s_star"):
        t32 = getattr(r32, name)
        assert t32.dtype == torch.float32
        assert torch.allclose(t32.double(), getattr(r64, name), atol=1e-4, rtol=1e-4), name
    mu_s, s_s = gaussian_projection(mu.float(), sig.float(), th.float(), th0.float(), ChanceLevel(0.1))
    assert mu_s.dtype == s_s.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def test_alpha_types_and_multipliers() -> None:
    assert ChanceLevel(0.1).multiplier == pytest.approx(1.2815515655446004, abs=1e-12)
    assert ChanceLevel(0.5 - 1e-9).multiplier > 0
    assert Margin(15).multiplier == 15.0 and isinstance(Margin(15).value, float)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.7, -0.1, math.nan, math.inf, True, "0.1"])
def test_chance_level_rejects_out_of_range(gamma) -> None:
    with pytest.raises(ValueError, match="ChanceLevel.gamma"):
        ChanceLevel(gamma)


@pytest.mark.parametrize("value", [0.0, -1.0, math.inf, math.nan, None])
def test_margin_rejects_non_positive(value) -> None:
    with pytest.raises(ValueError, match="Margin.value"):
        Margin(value)


def test_bare_float_alpha_raises_type_error() -> None:
    mu, sig, th, th0 = _instance(90, 4, 0.0)
    for fn in (gaussian_projection, fit_head_maps):
        with pytest.raises(TypeError, match=r"ChanceLevel\(gamma\).*Margin\(value\)"):
            fn(_t(mu), _t(sig), _t(th), th0, 1.28)
    with pytest.raises(TypeError, match="Margin"):
        chance_constraint_value(_t(mu), _t(sig), _t(th), th0, 5)


def test_zero_theta_raises_solver_error_naming_the_head() -> None:
    mu, sig, th, th0 = _batch(91, (2, 3), 4, [0.0])
    th[1, 2] = 0.0
    with pytest.raises(SolverError, match=r"\(1, 2\)") as info:
        gaussian_projection(mu, sig, th, th0, ChanceLevel(0.1))
    assert isinstance(info.value, ArithmeticError) and isinstance(info.value, OtguardError)


@pytest.mark.parametrize("arg", ["mu_hat", "sigma_hat", "theta", "theta0", "ref_cov"])
def test_non_finite_input_raises_solver_error(arg: str) -> None:
    mu, sig, th, th0 = _batch(92, (3,), 4, [0.0])
    kw = {"mu_hat": mu, "sigma_hat": sig, "theta": th, "theta0": th0, "ref_cov": torch.eye(4, dtype=F64)}
    bad = kw[arg].clone()
    bad.view(-1)[-1] = math.nan
    kw[arg] = bad
    with pytest.raises(SolverError, match=f"{arg} contains NaN"):
        gaussian_projection(alpha=Margin(5.0), **kw)


def test_shape_mismatch_raises_value_error() -> None:
    mu, sig, th, th0 = _batch(93, (3,), 4, [0.0])
    with pytest.raises(ValueError, match="Dimension mismatch"):
        gaussian_projection(mu, sig, th[:, :3], th0, Margin(1.0))
    with pytest.raises(ValueError, match="broadcast"):
        gaussian_projection(mu, sig[:2], th, th0, Margin(1.0))
    with pytest.raises(ValueError, match="eig_floor"):
        gaussian_projection(mu, sig, th, th0, Margin(1.0), eig_floor=0.0)


# ----------------------------------------------------------------------------------------------
# diagnostics and the guarantee
# ----------------------------------------------------------------------------------------------


def test_objective_and_constraint_helpers() -> None:
    mu, sig, th, th0 = _instance(94, 6, 0.5)
    _, s_hat, _ = regularize_covariance(_t(sig))
    assert float(projection_objective(_t(mu), s_hat, _t(mu), _t(sig))) == pytest.approx(0.0, abs=1e-20)
    value = float(chance_constraint_value(_t(mu), s_hat, _t(th), th0, Margin(2.0)))
    expected = th0 + th @ mu + 2.0 * math.sqrt(th @ sig @ th)
    assert value == pytest.approx(expected, rel=1e-10)


def test_guarantee_rate_matches_nominal_level_on_exact_gaussian() -> None:
    d, n = 8, 20_000
    mu, sig, th, th0 = _instance(95, d, 0.3)
    res = fit_head_maps(_t(mu), _t(sig), _t(th), th0, ChanceLevel(0.1))
    assert int(res.case) == CASE_INTERIOR
    gen = torch.Generator().manual_seed(0)
    sig_reg, s_hat, _ = regularize_covariance(_t(sig))
    acts = _t(mu) + torch.randn(n, d, generator=gen, dtype=F64) @ s_hat
    rate = guarantee_rate(acts, res.A, res.b, _t(th), th0)
    assert rate.shape == () and abs(float(rate) - 0.9) < 0.03
    before = guarantee_rate(acts, torch.eye(d, dtype=F64), torch.zeros(d, dtype=F64), _t(th), th0)
    assert float(before) < 0.5
    # Per-head masks over a shared set of activations: (N, H) with H = 2 copies of the head.
    acts2 = torch.stack([acts, acts], 1)
    mask = torch.zeros(n, 2, dtype=torch.bool)
    mask[: n // 2, 0] = True
    mask[:, 1] = True
    a2, b2 = res.A.expand(2, d, d), res.b.expand(2, d)
    rates = guarantee_rate(acts2, a2, b2, _t(th).expand(2, d), _t([th0, th0]), mask=mask)
    assert rates.shape == (2,)
    assert float(rates[1]) == pytest.approx(float(rate))
    assert float(rates[0]) == pytest.approx(float(guarantee_rate(acts[: n // 2], res.A, res.b, _t(th), th0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    mu, sig, th, th0 = _batch(96, (4,), 16, [-5.0, -0.3, 0.3, 3.0])
    ref = _t(np.stack([_rand_cov(np.random.default_rng(97 + i), 16, 0.05, 1.0) for i in range(4)]))
    for alpha, rc in ((ChanceLevel(0.1), None), (Margin(20.0), ref)):
        cpu = fit_head_maps(mu, sig, th, th0, alpha, rc)
        rc_gpu = None if rc is None else rc.cuda()
        gpu = fit_head_maps(mu.cuda(), sig.cuda(), th.cuda(), th0.cuda(), alpha, rc_gpu)
        assert gpu.A.is_cuda and torch.equal(gpu.case.cpu(), cpu.case)
        for name in ("A", "b", "mu_star", "s_star"):
            assert torch.allclose(getattr(gpu, name).cpu(), getattr(cpu, name), atol=1e-7, rtol=1e-7), name
        rate = guarantee_rate(mu.cuda()[None], gpu.A, gpu.b, th.cuda(), th0.cuda())
        assert rate.shape == (4,)
