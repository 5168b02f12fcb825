"""``otguard compare``: the folds in one process with T threads vs T forked worker processes of one thread.

A = ``--workers 1 --threads T`` (the fold loop in this process, T torch threads per forward);
B = ``--workers T --threads T`` (each fold in its own forked process with one thread,
:mod:`otguard.harness.parallel`). Both run the same command otherwise (the packaged SmolLM2 in
bfloat16, the default methods and grids, two folds, ``--limit``), each into a fresh output folder with
the activation and judge caches warm (a first untimed run fills them). The runs are interleaved (the
order alternates each round) and the medians of wall time are reported, with the ratio A / B, and the
two runs' ``results.json`` are compared figure by figure (every forward of a fold is the same
computation, on one thread in B and on T threads in A, so they agree up to floating-point summation
order: a greedy near-tie can fall the other way, as the full run showed for 12 of 4,902 answers).

This benchmark needs at least T free cores: on a shared machine, run it when nothing else runs.

    python benchmarks/compare_workers.py [--limit 100] [--rounds 2] [--threads 2] [--data-dir ../shared/data]

Measured on the project's 2-core machine (2026-12-05, nothing else running, torch 2.13.0+cpu, the
shared trunk in both ways), ``--limit 40 --rounds 2 --threads 2``::

    torch 2.13.0+cpu, 2 CPUs, x86_64; A = --workers 1 --threads 2, B = --workers 2 (one thread each);
    --limit 40, 2 folds, methods none,iti,iti@paper,mean-shift,radiant,slim, 2 rounds after a warm-up run

    round 1: A 178.1 s, B 137.8 s
    round 2: B 137.6 s, A 183.5 s

    way                          wall s (median)
    A: 1 process, 2 threads           180.8
    B: 2 workers, 1 thread each       137.7
    speed-up of the workers: 1.31x wall; 136 of 136 per-fold figures identical
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
METHODS = "none,iti,iti@paper,mean-shift,radiant,slim"


def run(out: Path, workers: int, args: argparse.Namespace) -> float:
    cmd = [
        sys.executable, "-m", "otguard.cli", "compare", "--model", "smollm2-135m", "--dataset", "truthfulqa",
        "--data-dir", str(args.data_dir), "--out", str(out), "--methods", METHODS, "--folds", "2",
        "--limit", str(args.limit), "--threads", str(args.threads), "--workers", str(workers), "--force",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def figures(out: Path) -> dict[str, Any]:
    """Every per-fold figure of every method in ``results.json``."""
    data = json.loads((out / "results.json").read_text())
    return {m: {k: v.get("folds") for k, v in r["summary"].items()} for m, r in data["methods"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.machine()}; A = --workers 1 "
          f"--threads {args.threads}, B = --workers {args.threads} (one thread each); --limit {args.limit}, "
          f"2 folds, methods {METHODS}, {args.rounds} rounds after a warm-up run\n")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="otguard-bench-workers-"))
    try:
        run(root / "warm", args.threads, args)  # fills the activation and judge caches
        times: dict[str, list[float]] = {"A": [], "B": []}
        outs = {"A": root / "a", "B": root / "b"}
        workers = {"A": 1, "B": args.threads}
        for r in range(args.rounds):
            order = ["A", "B"] if r % 2 == 0 else ["B", "A"]
            for way in order:
                times[way].append(run(outs[way], workers[way], args))
            print(f"round {r + 1}: " + ", ".join(f"{w} {times[w][-1]:.1f} s" for w in order), flush=True)
        a, b = statistics.median(times["A"]), statistics.median(times["B"])
        print(f"\nway                          wall s (median)\nA: 1 process, {args.threads} threads"
              f"{a:>16.1f}\nB: {args.threads} workers, 1 thread each{b:>12.1f}")  # fmt: skip
        fa, fb = figures(outs["A"]), figures(outs["B"])
        same = sum(fa[m][k] == fb[m].get(k) for m in fa for k in fa[m])
        total = sum(len(fa[m]) for m in fa)
        print(f"speed-up of the workers: {a / b:.2f}x wall; {same} of {total} per-fold figures identical")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
