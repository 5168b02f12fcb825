"""Benchmark: Stage-2 solve per head, otguard (closed form / ADMM) vs cvxpy + Clarabel.

A: ``otguard.transport.fit_head_maps`` on one head (projection *and* OT map, float64).
B: ``tests/reference/cvxpy_transport.py``: the original conic formulation (SOC chance constraint,
   PSD variable, optional LMI S >= R) built with cvxpy and solved by Clarabel; timed is the whole
   ``solve`` call (Clarabel's own solve time is shown in brackets). The original code used MOSEK
   (commercial, ~50 s per head at d = 128 per the SLIM paper); Clarabel is the open-source stand-in.
Same random instances for A and B, interleaved per instance; medians reported, and the relative
objective gap (A - B) / B (negative = otguard better). Threads pinned to 1 unless ``--threads``.

    python benchmarks/transport.py                     # d = 64, 3 SLIM instances + 1 RADIANT (S >= R)
    python benchmarks/transport.py --instances 5 --ref-instances 0
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=64, help="head dimension d")
    p.add_argument("--heads", type=int, default=9, help="heads of one layer for the batched timing")
    p.add_argument("--instances", type=int, default=3, help="instances without S >= R (SLIM, gamma = 0.1)")
    p.add_argument("--ref-instances", type=int, default=1, help="instances with S >= R (RADIANT, alpha = 20)")
    p.add_argument("--reps", type=int, default=20, help="repetitions of A per instance (B runs once)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


ARGS = _parse()
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(ARGS.threads)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.reference.cvxpy_transport import psd_sqrt, solve_reference  # noqa: E402

from otguard.transport import ChanceLevel, Margin, fit_head_maps, projection_objective  # noqa: E402


def instance(rng: np.random.Generator, d: int, offset: float):
    """A flagged-head-like problem: random covariance (eigenvalues 0.1-3), mean ``offset`` sigma_u
    from the boundary on the undesirable side, and a reference covariance of the desirable class."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    sig = (q * np.exp(rng.uniform(np.log(0.1), np.log(3.0), d))) @ q.T
    q2, _ = np.linalg.qr(rng.standard_normal((d, d)))
    ref = (q2 * np.exp(rng.uniform(np.log(0.05), np.log(1.0), d))) @ q2.T
    mu = rng.standard_normal(d)
    th = rng.standard_normal(d)
    th0 = float(np.sqrt(th @ sig @ th) * offset - th @ mu)  # delta = offset * ||theta|| * sigma_u
    return mu, sig, th, th0, ref


def time_ours(args: tuple, reps: int) -> tuple[list[float], object]:
    times = []
    res = None
    for _ in range(reps):
        t0 = time.perf_counter()
        res = fit_head_maps(*args)
        times.append(time.perf_counter() - t0)
    return times, res


def main() -> None:
    d = ARGS.dim
    rng = np.random.default_rng(ARGS.seed)
    rows = []
    plan = [("SLIM", ChanceLevel(0.1), False)] * ARGS.instances + [("RADIANT", Margin(20.0), True)] * (
        ARGS.ref_instances
    )
    t64 = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    fit_head_maps(t64(np.zeros(d)), t64(np.eye(d)), t64(np.ones(d)), 1.0, ChanceLevel(0.1))  # warm-up
    for i, (variant, alpha, with_ref) in enumerate(plan):
        m = alpha.multiplier
        offset = 0.3 if variant == "SLIM" else 1.0
        mu, sig, th, th0, ref = instance(rng, d, offset)
        args = (t64(mu), t64(sig), t64(th), th0, alpha) + ((t64(ref),) if with_ref else ())
        reps = ARGS.reps if not with_ref else max(3, ARGS.reps // 5)
        t_a1, res = time_ours(args, reps // 2)
        t0 = time.perf_counter()
        ref_sol = solve_reference(mu, psd_sqrt(sig, 1e-6), th, th0, m, psd_sqrt(ref) if with_ref else None)
        t_b = time.perf_counter() - t0
        t_a2, _ = time_ours(args, reps - reps // 2)
        obj = float(projection_objective(res.mu_star, res.s_star, t64(mu), t64(sig)))
        gap = (obj - ref_sol.objective) / abs(ref_sol.objective)
        t_a = statistics.median(t_a1 + t_a2)
        rows.append(
            dict(i=i, variant=variant, alpha=repr(alpha), case=int(res.case), a=t_a, a_min=min(t_a1 + t_a2),
                 b=t_b, b_solver=ref_sol.solve_time, gap=gap)
        )  # fmt: skip
        print(f"instance {i} done: A {rows[-1]['a'] * 1e3:.2f} ms, B {t_b:.2f} s", flush=True)

    # All H heads of one layer at once (SLIM setting), per-head cost.
    heads = [instance(rng, d, 0.3) for _ in range(ARGS.heads)]
    stack = [t64(np.stack([h[k] for h in heads])) for k in range(5)]
    batched_args = (stack[0], stack[1], stack[2], stack[3], ChanceLevel(0.1))
    times, res_b = time_ours(batched_args, ARGS.reps)
    t_batch = statistics.median(times)
    batched_ref_args = (*batched_args[:4], Margin(20.0), stack[4])
    t_batch_ref = statistics.median(time_ours(batched_ref_args, max(3, ARGS.reps // 5))[0])

    print()
    print(
        f"Stage-2 solve per head, d = {d}, torch {torch.__version__}, {ARGS.threads} thread(s), "
        f"CPU float64; A = otguard fit_head_maps (projection + OT map), B = cvxpy + Clarabel "
        "(projection only)."
    )
    print()
    print(
        "| # | variant | alpha | case | otguard median (best) ms | cvxpy+Clarabel s (Clarabel alone) "
        "| speed-up (median) | rel. objective gap |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        variant = r["variant"] + (" (S >= R)" if r["variant"] == "RADIANT" else "")
        ours = f"{r['a'] * 1e3:.2f} ({r['a_min'] * 1e3:.2f})"
        theirs = f"{r['b']:.2f} ({r['b_solver']:.2f})"
        print(
            f"| {r['i']} | {variant} | {r['alpha']} | {r['case']} | {ours} | {theirs} "
            f"| {r['b'] / r['a']:,.0f}x | {r['gap']:+.1e} |"
        )
    for variant in ("SLIM", "RADIANT"):
        sel = [r for r in rows if r["variant"] == variant]
        if sel:
            med_a = statistics.median(r["a"] for r in sel)
            med_b = statistics.median(r["b"] for r in sel)
            print(
                f"\n{variant}: median otguard {med_a * 1e3:.2f} ms vs Clarabel {med_b:.2f} s per head "
                f"-> {med_b / med_a:,.0f}x; worst relative objective gap {max(r['gap'] for r in sel):+.1e}"
            )
    print(
        f"\nBatched, all H = {ARGS.heads} heads of one layer (d = {d}): SLIM {t_batch * 1e3:.2f} ms "
        f"({t_batch / ARGS.heads * 1e3:.2f} ms per head, cases {res_b.case.tolist()}); "
        f"RADIANT with S >= R {t_batch_ref * 1e3:.0f} ms ({t_batch_ref / ARGS.heads * 1e3:.1f} ms per head)."
    )


if __name__ == "__main__":
    main()
