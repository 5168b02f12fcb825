"""Throughput of ``otguard.collect`` relative to a plain batched forward pass, measured side by side.

    python benchmarks/collect.py [--n-texts 256] [--batch-size 16] [--repeats 5] [--data-dir DIR]

Three timed variants over the same TruthfulQA MC2 texts ("Q: {question} A: {answer}"), the same
batch size and the same batching (sorted by token count, longest first, padded by the tokenizer):

- ``collect``: ``otguard.collect(..., cache=False)`` end to end (tokenisation, padding, model
  identity, the per-layer pre-hooks, the copy into the (N, L, H, d) result), default dtype;
- ``lm``: ``model(**batch, use_cache=False)``, the full causal LM including the LM head, on batches
  tokenised and padded beforehand (so the baseline pays for none of collect's bookkeeping);
- ``base``: the same with the base model (no LM head), which is what collect runs, so this ratio
  shows the cost of the hooks themselves.

Repetitions are interleaved (one warm-up round first, then the order rotates every round) and
medians are reported, of wall time and of process CPU time (with one thread, CPU time is far less
disturbed by other jobs on a shared machine). One thread: ``OMP_NUM_THREADS=1`` and
``torch.set_num_threads(1)``.
Target: collect throughput >= 0.9 x the ``lm`` throughput.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def truthfulqa_texts(data_dir: Path, n: int) -> list[str]:
    """The first ``n`` MC2 answer texts of TruthfulQA, in file order."""
    path = data_dir / "truthfulqa" / "mc_task.json"
    if not path.is_file():
        sys.exit(f"{path} not found; pass --data-dir (a folder with truthfulqa/mc_task.json).")
    texts: list[str] = []
    for entry in json.loads(path.read_text()):
        for answer in entry["mc2_targets"]:
            texts.append(f"Q: {entry['question']} A: {answer}")
            if len(texts) == n:
                return texts
    return texts


def batches(tok: Any, texts: list[str], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """collect's batching: tokenise with special tokens, longest first (stable), pad each batch."""
    encoded = tok(texts, add_special_tokens=True)["input_ids"]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    return [
        tok.pad({"input_ids": [encoded[i] for i in order[s : s + batch_size]]}, return_tensors="pt")
        for s in range(0, len(order), batch_size)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--n-texts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args(argv)

    import transformers

    from otguard.activations import collect
    from otguard.models import load_model

    model, tok = load_model(args.model)
    texts = truthfulqa_texts(args.data_dir, args.n_texts)
    prepared = batches(tok, texts, args.batch_size)
    base = model.base_model
    n_tokens = sum(int(b["attention_mask"].sum()) for b in prepared)
    padded = sum(b["input_ids"].numel() for b in prepared)

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )
    print(
        f"model {model.config._name_or_path} ({type(model).__name__}, {next(model.parameters()).dtype}), "
        f"{len(texts)} texts, {n_tokens} tokens ({padded} with padding), batch size {args.batch_size}, "
        f"{len(prepared)} batches, {args.repeats} timed rounds"
    )

    @torch.no_grad()
    def run_collect() -> None:
        collect(model, tok, texts, batch_size=args.batch_size, cache=False, progress=False)

    @torch.no_grad()
    def run_lm() -> None:
        for batch in prepared:
            model(**batch, use_cache=False)

    @torch.no_grad()
    def run_base() -> None:
        for batch in prepared:
            base(**batch, use_cache=False)

    variants: dict[str, Callable[[], None]] = {"collect": run_collect, "lm": run_lm, "base": run_base}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_ in range(args.repeats + 1):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            variants[name]()
            if round_ > 0:  # round 0 warms up
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)

    print(
        f"{'variant':<9}{'wall median s':>15}{'min':>8}{'max':>8}{'texts/s':>9}"
        f"{'CPU median s':>14}{'texts/CPU-s':>13}"
    )
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(
            f"{name:<9}{w:>15.2f}{min(wall[name]):>8.2f}{max(wall[name]):>8.2f}{len(texts) / w:>9.2f}"
            f"{c:>14.2f}{len(texts) / c:>13.2f}"
        )
    for label, t in (("wall", wall), ("CPU", cpu)):
        med = {name: statistics.median(v) for name, v in t.items()}
        print(
            f"[{label:>4}] collect throughput / plain forward (full LM, incl. LM head): "
            f"{med['lm'] / med['collect']:.3f} (target >= 0.9); / base-model forward (no LM head): "
            f"{med['base'] / med['collect']:.3f}"
        )


if __name__ == "__main__":
    main()
