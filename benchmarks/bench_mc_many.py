"""TruthfulQA MC for several policies: ``score_mc`` per policy vs one ``score_mc_many`` pass, without
and with the shared trunk.

``score_mc_many`` runs each question's context once with no policy (answer scope never edits it) and
scores every policy's answers on that shared cache; ``score_mc`` is its one-policy case, so scoring
P policies with it runs every context P times. Both pack the contexts of ``--question-batch``
questions into one forward. With ``share_trunk=True`` (the default) the answer forwards share their
unedited lower layers too: per chunk of answers one forward with no policy records the hidden state
entering each policy's first edited layer (and scores the ``none`` policy), and each policy's forward
resumes there (``otguard.trunk``). Workload: the packaged SmolLM2-135M in bfloat16 (as ``compare``
runs it), the first N TruthfulQA questions, P = 5 policies: none + synthetic always-on policies whose
first edited layers are like the comparison harness's (replace maps on layers 3, 16 and 23, a shift
of four heads on layer 11) — the edit's cost is the hook's, whatever the fit.

Runs are interleaved (the order alternates each round) and medians reported; a speed-up is the
median of the per-round ratios of process CPU time (one thread; less disturbed than wall time on
the shared machine), wall time is shown too. The max |difference| of the answer scores and of MC2
between consecutive ways is printed.

    python benchmarks/bench_mc_many.py [--n-questions 32] [--reps 3] [--ways alone,many,trunk]
                                       [--dtype bfloat16] [--data-dir ../shared/data]

Measured on the project's 2-core machine (2026-12-05, 1 thread, torch 2.13.0+cpu, load average 2-4
from other jobs), ``--n-questions 32 --reps 3`` (about 6.5 minutes with the model load; the speed-up
lines were printed on one line each then)::

    round 1: 5 x score_mc 45.3s, many, no trunk 37.0s, many, shared trunk 27.5s
    round 2: 5 x score_mc 43.6s, many, no trunk 36.3s, many, shared trunk 26.8s
    round 3: 5 x score_mc 43.6s, many, no trunk 35.9s, many, shared trunk 26.3s
    way                     CPU s (median)  wall s (median)
    5 x score_mc                     43.63            45.77
    many, no trunk                   36.28            37.25
    many, shared trunk               26.81            27.42
    many, no trunk vs 5 x score_mc: speed-up 1.21x CPU (1.21x wall);
        max |d score| 0.0e+00, max |dMC2| 0.0e+00
    many, shared trunk vs many, no trunk: speed-up 1.35x CPU (1.35x wall);
        max |d score| 0.0e+00, max |dMC2| 0.0e+00

The shared trunk saves 26 % of the pass (9.5 of 36.3 s): the resumed forwards skip 3 + 11 + 16 + 23
= 53 of the 150 decoder-layer passes of the five policies' answer forwards (the LM head, about 7
layers' worth for SmolLM2's 49k vocabulary, still runs per policy), ~29 % of the answer compute. The
scores are bit-identical: the resumed layers get the very same inputs (also in bfloat16). The gain
grows with the depth of the policies' first edited layers, and with no ``none`` policy the recording
forward stops after the highest layer needed (no LM head).

Earlier (float32, 40 questions, 4 policies at layers 10/14/20, before the shared trunk):
``score_mc_many`` was 1.15x faster than 4 x ``score_mc`` (68.7 vs 78.9 s CPU), bit-identical; the
shared contexts were ~17 % of one policy's cost, the rest its answer forwards.
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


WAYS = ("alone", "many", "trunk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-questions", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--question-batch", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated subset of {', '.join(WAYS)}")
    args = parser.parse_args()
    ways = [w for w in args.ways.split(",") if w]
    if not set(ways) <= set(WAYS) or len(ways) < 2:
        parser.error(f"--ways: two or more of {', '.join(WAYS)}")

    model, tok = load_model("smollm2-135m", dtype=args.dtype)
    items = truthfulqa_items(args.data_dir)[: args.n_questions]
    # First edited layers like the comparison harness's policies (3 ... 23 of SmolLM2's 30).
    policies: dict[str, Policy | None] = {
        "none": None,
        "replace@3": synthetic_policy(model, "replace", 3, 0),
        "shift@11": synthetic_policy(model, "shift", 11, 1),
        "replace@16": synthetic_policy(model, "replace", 16, 2),
        "replace@23": synthetic_policy(model, "replace", 23, 3),
    }
    n_answers = sum(len(mc_answers(item)) for item in items)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} (OMP_NUM_THREADS="
          f"{os.environ['OMP_NUM_THREADS']}), {platform.processor() or platform.machine()}")  # fmt: skip
    print(f"model {model.config._name_or_path} ({args.dtype}); {len(items)} TruthfulQA questions, "
          f"{n_answers} answers; {len(policies)} policies ({', '.join(policies)}); batch size "
          f"{args.batch_size}, question batch {args.question_batch}; {args.reps} rounds\n")  # fmt: skip
    kw = dict(batch_size=args.batch_size, question_batch=args.question_batch, progress=False)

    def alone() -> dict[str, MCResult]:
        return {name: score_mc(model, tok, items, policy=p, **kw) for name, p in policies.items()}  # type: ignore[arg-type]

    def many() -> dict[str, MCResult]:
        return score_mc_many(model, tok, items, policies, share_trunk=False, **kw)  # type: ignore[arg-type]

    def trunk() -> dict[str, MCResult]:
        return score_mc_many(model, tok, items, policies, share_trunk=True, **kw)  # type: ignore[arg-type]

    label = {"alone": f"{len(policies)} x score_mc", "many": "many, no trunk", "trunk": "many, shared trunk"}
    funcs = {"alone": alone, "many": many, "trunk": trunk}
    runs = {label[w]: funcs[w] for w in ways}
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

    print(f"\n{'way':<22}{'CPU s (median)':>16}{'wall s (median)':>17}")
    for m in runs:
        print(f"{m:<22}{statistics.median(cpu[m]):>16.2f}{statistics.median(wall[m]):>17.2f}")
    print()
    names = list(runs)
    for a, b in zip(names, names[1:], strict=False):
        ratio = statistics.median(x / y for x, y in zip(cpu[a], cpu[b], strict=True))
        wall_ratio = statistics.median(x / y for x, y in zip(wall[a], wall[b], strict=True))
        diffs = [max_diff(results[a][name], results[b][name]) for name in policies]
        d_score, d_mc2 = max(d[0] for d in diffs), max(d[1] for d in diffs)
        print(f"{b} vs {a}: speed-up {ratio:.2f}x CPU ({wall_ratio:.2f}x wall);\n"
              f"    max |d score| {d_score:.1e}, max |dMC2| {d_mc2:.1e}")  # fmt: skip
    last = results[names[-1]]
    for name in policies:
        r = last[name]
        print(f"  {name:<12} MC1 {r.mc1:.4f}  MC2 {r.mc2:.4f}  MC3 {r.mc3:.4f}  (trunk layer "
              f"{r.info['trunk_layer']})")  # fmt: skip


if __name__ == "__main__":
    main()
