"""TruthfulQA answer generation: row-dropping decoder vs ``model.generate``, float32 vs bfloat16 (CPU).

A = :func:`otguard.evaluation.truthfulqa_gen.generate_answers` with its default decoder
(:func:`otguard.decoding.decode`, which drops finished rows from the batch and KV cache);
B = the same function with ``evict=False`` (``model.generate`` with a ``"Q:"`` stop string: finished
rows are computed until the batch's longest answer is done). Both share the primer KV cache, so the
ratio isolates the decoder. Each is run in float32 and, where the CPU computes it natively,
bfloat16 (what ``otguard compare --dtype auto`` picks). The answers of A and B are compared.

Runs are interleaved (order rotated each round), medians of per-round ratios of wall time;
threads pinned (default 1, ``--threads``).

    python benchmarks/decoding.py [--n-questions 64] [--reps 3] [--batch-size 32] [--threads 1]
"""

from __future__ import annotations

import os
import sys

_threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
os.environ["OMP_NUM_THREADS"] = _threads  # before torch is imported
os.environ["MKL_NUM_THREADS"] = _threads

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from otguard.data import truthfulqa_items  # noqa: E402
from otguard.evaluation.truthfulqa_gen import generate_answers  # noqa: E402
from otguard.models import auto_dtype, load_model  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-questions", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    questions = [it.question for it in truthfulqa_items(args.data_dir)[: args.n_questions]]
    dtypes = [torch.float32] + ([torch.bfloat16] if auto_dtype("cpu") == torch.bfloat16 else [])
    models = {dt: load_model("smollm2-135m", dtype=dt)[0] for dt in dtypes}
    tok = load_model("smollm2-135m")[1]
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()} (OMP_NUM_THREADS="
        f"{os.environ['OMP_NUM_THREADS']}), {platform.processor() or platform.machine()}; "
        f"bf16 native: {torch.bfloat16 in dtypes}"
    )
    print(f"SmolLM2-135M-Instruct, {len(questions)} TruthfulQA questions, batch {args.batch_size}, "
          f"50 new tokens max, {args.reps} interleaved rounds\n")  # fmt: skip

    variants = [(dt, evict) for dt in dtypes for evict in (True, False)]
    times: dict[tuple[torch.dtype, bool], list[float]] = {v: [] for v in variants}
    answers: dict[tuple[torch.dtype, bool], list[str]] = {}
    generate_answers(models[dtypes[0]], tok, questions[:4], batch_size=4, progress=False)  # warm-up
    for rep in range(args.reps):
        order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
        for dt, evict in order:
            t0 = time.perf_counter()
            out, _ = generate_answers(models[dt], tok, questions, batch_size=args.batch_size, progress=False,
                                      evict=evict)  # fmt: skip
            times[(dt, evict)].append(time.perf_counter() - t0)
            answers[(dt, evict)] = out

    print("| dtype | decoder | median s | min s | max s |")
    print("|---|---|---|---|---|")
    for dt, evict in variants:
        t = times[(dt, evict)]
        name = "row-dropping (otguard)" if evict else "model.generate"
        print(f"| {str(dt).replace('torch.', '')} | {name} | {statistics.median(t):.2f} | {min(t):.2f} | "
              f"{max(t):.2f} |")  # fmt: skip
    print()
    for dt in dtypes:
        ratios = [b / a for a, b in zip(times[(dt, True)], times[(dt, False)], strict=True)]
        same = sum(x == y for x, y in zip(answers[(dt, True)], answers[(dt, False)], strict=True))
        name = str(dt).replace("torch.", "")
        print(f"{name}: model.generate / row-dropping = {statistics.median(ratios):.2f}x "
              f"(median of per-round ratios); identical answers {same}/{len(questions)}")  # fmt: skip
    if len(dtypes) == 2:
        ratios = [
            a / b for a, b in zip(times[(torch.float32, True)], times[(torch.bfloat16, True)], strict=True)
        ]
        same = sum(x == y for x, y in zip(answers[(torch.float32, True)], answers[(torch.bfloat16, True)],
                                          strict=True))  # fmt: skip
        print(
            f"row-dropping decoder: float32 / bfloat16 = {statistics.median(ratios):.2f}x; "
            f"bf16 answers equal to float32 answers: {same}/{len(questions)}"
        )


if __name__ == "__main__":
    main()
