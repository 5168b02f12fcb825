"""TruthfulQA MC scoring time: cached scorer vs per-question cache vs naive (SmolLM2-135M, CPU).

Three scorers on the first N TruthfulQA questions (every distinct MC1/MC2 answer of each):

- ``cached``: :func:`otguard.evaluation.truthfulqa_mc.score_mc`: the instruction + primer prefix is
  run once per call and its KV cache shared; each question once on top of it; its answers in one
  right-padded batch on top of the question's cache;
- ``per-question``: the same without the shared prefix (``share_prefix=False``): each question's
  whole context runs once, its answers batched on top;
- ``naive``: ``tests/reference/naive_mc.py``: one full forward per (question, answer).

Runs are interleaved (the order rotates each round) and the medians reported; speed-ups are medians
of the per-round ratios of process CPU time (with one thread it is what the run costs, and it is
less disturbed than wall time when other jobs share the machine); wall times are shown too.

    python benchmarks/mc.py [--n-questions 40] [--reps 3] [--data-dir ../shared/data]
                            [--modes cached per-question naive] [--batch-size 16]
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported
os.environ["MKL_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # for tests.reference

from tests.reference.naive_mc import score_mc_naive  # noqa: E402

from otguard.data import truthfulqa_items  # noqa: E402
from otguard.evaluation.truthfulqa_mc import MCResult, mc_answers, score_mc  # noqa: E402
from otguard.models import load_model  # noqa: E402

torch.set_num_threads(1)

MODES = ("cached", "per-question", "naive")


def max_diff(a: MCResult, b: MCResult) -> tuple[float, float]:
    """Max |difference| of the per-question MC2 values and of the answer scores."""
    mc2 = max(abs(x - y) for x, y in zip(a.mc2_per_question, b.mc2_per_question, strict=True))
    scores = max(
        abs(x - y)
        for sa, sb in zip(a.mc2_scores + a.mc1_scores, b.mc2_scores + b.mc1_scores, strict=True)
        for x, y in zip(sa, sb, strict=True)
    )
    return mc2, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-questions", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    model, tok = load_model("smollm2-135m")
    items = truthfulqa_items(args.data_dir)[: args.n_questions]
    n_answers = sum(len(mc_answers(item)) for item in items)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()} (OMP_NUM_THREADS="
        f"{os.environ['OMP_NUM_THREADS']}), {platform.processor() or platform.machine()}"
    )
    print(
        f"model {model.config._name_or_path}; {len(items)} TruthfulQA questions, {n_answers} distinct "
        f"answers; batch size {args.batch_size}; {args.reps} interleaved repetitions\n"
    )

    runs = {
        "cached": lambda: score_mc(model, tok, items, batch_size=args.batch_size, progress=False),
        "per-question": lambda: score_mc(
            model, tok, items, batch_size=args.batch_size, progress=False, share_prefix=False
        ),
        "naive": lambda: score_mc_naive(model, tok, items),
    }
    modes = [m for m in MODES if m in args.modes]
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    wall: dict[str, list[float]] = {m: [] for m in modes}
    results: dict[str, MCResult] = {}
    with torch.no_grad():
        score_mc(model, tok, items[:2], progress=False)  # warm-up
        for rep in range(args.reps):
            order = modes[rep % len(modes) :] + modes[: rep % len(modes)]
            for mode in order:
                c0, t0 = time.process_time(), time.perf_counter()
                results[mode] = runs[mode]()
                cpu[mode].append(time.process_time() - c0)
                wall[mode].append(time.perf_counter() - t0)
            print(f"  round {rep + 1}: " + ", ".join(f"{m} {cpu[m][-1]:.1f}s" for m in modes), flush=True)

    print(
        f"\n{'scorer':<14}{'CPU s (median)':>16}{'wall s (median)':>17}{'ms/answer':>11}"
        f"{'MC1':>8}{'MC2':>8}{'MC3':>8}"
    )
    for m in modes:
        r = results[m]
        print(
            f"{m:<14}{statistics.median(cpu[m]):>16.2f}{statistics.median(wall[m]):>17.2f}"
            f"{1e3 * statistics.median(cpu[m]) / n_answers:>11.1f}{r.mc1:>8.4f}{r.mc2:>8.4f}{r.mc3:>8.4f}"
        )
    if "cached" in modes:
        print()
        for m in modes:
            if m == "cached":
                continue
            ratios = [b / a for a, b in zip(cpu["cached"], cpu[m], strict=True)]
            wall_ratios = [b / a for a, b in zip(wall["cached"], wall[m], strict=True)]
            d_mc2, d_score = max_diff(results["cached"], results[m])
            print(
                f"cached vs {m}: speed-up {statistics.median(ratios):.1f}x CPU "
                f"({statistics.median(wall_ratios):.1f}x wall); max |dMC2| {d_mc2:.2e}, "
                f"max |d score| {d_score:.2e}"
            )


if __name__ == "__main__":
    main()
