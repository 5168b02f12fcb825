"""TruthfulQA MC for several policies: one ``score_mc`` call per policy vs one ``score_mc_many`` pass.

``score_mc_many`` runs each question's context once with no policy (answer scope never edits it) and
scores every policy's answers on that shared cache; ``score_mc`` is its one-policy case, so scoring
P policies with it runs every context P times. Both pack the contexts of ``--question-batch``
questions into one forward. Workload: the packaged SmolLM2-135M, the first N TruthfulQA questions,
P policies: none + synthetic always-on policies (a replace map on layer 10, a shift of four heads
on layer 14, a replace map on layer 20) — the edit's cost is the hook's, whatever the fit.

Runs are interleaved (the order alternates each round) and medians reported; the speed-up is the
median of the per-round ratios of process CPU time (one thread; less disturbed than wall time on
the shared machine), wall time is shown too. The max |difference| of the answer scores and of MC2
between the two ways is printed (float32 forwards of different shapes: ~1e-5).

    python benchmarks/bench_mc_many.py [--n-questions 40] [--reps 3] [--data-dir ../shared/data]

Measured on the project's 2-core machine (2026-12-05, 1 thread, torch 2.13.0+cpu, other jobs
running: load average 2-3), 40 questions (305 distinct answers), 4 policies, 3 rounds::

    round 1: 4 x score_mc 78.3s, 1 x score_mc_many 68.7s
    round 2: 4 x score_mc 78.9s, 1 x score_mc_many 68.4s
    round 3: 4 x score_mc 82.2s, 1 x score_mc_many 71.5s
    way                   CPU s (median)  wall s (median)
    4 x score_mc                   78.89           149.13
    1 x score_mc_many              68.68           103.42
    speed-up of score_mc_many: 1.15x CPU (1.51x wall); max |d score| 0.0e+00, max |dMC2| 0.0e+00

The CPU ratio is the figure (the wall ratio was inflated by a test run beside rounds 2-3). The
scores are bit-identical: both ways pack the same contexts. The shared contexts are ~17 % of one
policy's cost ((78.9 - 68.7) / 3 = 3.4 of 19.7 s), as packing 8 contexts per forward (also in
``score_mc``) already made them cheap; the rest is the answers, run once per policy. Projected
with P policies: 19.7 P / (3.4 + 16.3 P), ~1.19x at P = 15. A larger saving needs the answer
forwards shared too: every layer below a policy's first edited layer computes the same thing for
every policy (not done here).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported
os.environ["MKL_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from otguard.data import truthfulqa_items  # noqa: E402
from otguard.evaluation.truthfulqa_mc import MCResult, mc_answers, score_mc, score_mc_many  # noqa: E402
from otguard.models import load_model  # noqa: E402
from otguard.policy import LayerEdit, Policy  # noqa: E402
from otguard.sites import find_head_sites, model_identity  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def synthetic_policy(model, rule: str, layer: int, seed: int) -> Policy:
    """Always flagging: ``replace`` maps every head of ``layer``; ``shift`` moves its first four heads."""
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(H, dtype=torch.bool) if rule == "replace" else torch.arange(H) < 4
    A = torch.eye(d) + 0.3 / d**0.5 * torch.randn(H, d, d, generator=gen) if rule == "replace" else None
    b = 0.5 * torch.randn(H, d, generator=gen)
    edit = LayerEdit(layer=layer, probe_weight=torch.zeros(H, d), probe_bias=torch.full((H,), 10.0),
                     threshold=None, head_mask=mask, b=b, A=A)  # fmt: skip
    return Policy(method=rule, rule=rule, layers=[edit], model=model_identity(model), scope="answer")


def max_diff(a: MCResult, b: MCResult) -> tuple[float, float]:
    """Max |difference| of the answer scores and of the per-question MC2 values."""
    pairs = zip(a.mc2_scores + a.mc1_scores, b.mc2_scores + b.mc1_scores, strict=True)
    scores = max(abs(x - y) for sa, sb in pairs for x, y in zip(sa, sb, strict=True))
    mc2 = max(abs(x - y) for x, y in zip(a.mc2_per_question, b.mc2_per_question, strict=True))
    return scores, mc2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-questions", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--question-batch", type=int, default=8)
    args = parser.parse_args()

    model, tok = load_model("smollm2-135m")
    items = truthfulqa_items(args.data_dir)[: args.n_questions]
    policies: dict[str, Policy | None] = {
        "none": None,
        "replace@10": synthetic_policy(model, "replace", 10, 0),
        "shift@14": synthetic_policy(model, "shift", 14, 1),
        "replace@20": synthetic_policy(model, "replace", 20, 2),
    }
    n_answers = sum(len(mc_answers(item)) for item in items)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (OMP_NUM_THREADS="
          f"{os.environ['OMP_NUM_THREADS']}), {platform.processor() or platform.machine()}")  # fmt: skip
    print(f"model {model.config._name_or_path}; {len(items)} TruthfulQA questions, {n_answers} answers; "
          f"{len(policies)} policies ({', '.join(policies)}); batch size {args.batch_size}, question batch "
          f"{args.question_batch}; {args.reps} interleaved rounds\n")  # fmt: skip
    kw = dict(batch_size=args.batch_size, question_batch=args.question_batch, progress=False)

    def alone() -> dict[str, MCResult]:
        return {name: score_mc(model, tok, items, policy=p, **kw) for name, p in policies.items()}  # type: ignore[arg-type]

    def many() -> dict[str, MCResult]:
        return score_mc_many(model, tok, items, policies, **kw)  # type: ignore[arg-type]

    runs = {f"{len(policies)} x score_mc": alone, "1 x score_mc_many": many}
    cpu: dict[str, list[float]] = {m: [] for m in runs}
    wall: dict[str, list[float]] = {m: [] for m in runs}
    results: dict[str, dict[str, MCResult]] = {}
    score_mc(model, tok, items[:2], progress=False)  # warm-up
    for rep in range(args.reps):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for mode in order:
            c0, t0 = time.process_time(), time.perf_counter()
            results[mode] = runs[mode]()
            cpu[mode].append(time.process_time() - c0)
            wall[mode].append(time.perf_counter() - t0)
        print(f"  round {rep + 1}: " + ", ".join(f"{m} {cpu[m][-1]:.1f}s" for m in runs), flush=True)

    print(f"\n{'way':<20}{'CPU s (median)':>16}{'wall s (median)':>17}")
    for m in runs:
        print(f"{m:<20}{statistics.median(cpu[m]):>16.2f}{statistics.median(wall[m]):>17.2f}")
    a, b = list(runs)
    ratio = statistics.median(x / y for x, y in zip(cpu[a], cpu[b], strict=True))
    wall_ratio = statistics.median(x / y for x, y in zip(wall[a], wall[b], strict=True))
    diffs = [max_diff(results[a][name], results[b][name]) for name in policies]
    d_score, d_mc2 = max(d[0] for d in diffs), max(d[1] for d in diffs)
    print(f"\nspeed-up of score_mc_many: {ratio:.2f}x CPU ({wall_ratio:.2f}x wall); "
          f"max |d score| {d_score:.1e}, max |dMC2| {d_mc2:.1e}")  # fmt: skip
    for name in policies:
        r = results[b][name]
        print(f"  {name:<12} MC1 {r.mc1:.4f}  MC2 {r.mc2:.4f}  MC3 {r.mc3:.4f}")


if __name__ == "__main__":
    main()
