"""Benchmark: learned truth / info judges against held-out human labels, and the simpler candidates.

For each label file, on split (a) *seen questions, unseen answers* and split (b) *unseen questions*
(both folds) of :mod:`otguard.evaluation.learned_judge_data`, prints accuracy, AUROC, TPR, TNR, n
and the training wall time of:

- ``words``: step 1 of the judge alone (per-question TF-IDF word n-grams + logistic regression);
- ``judge``: the learned judge (:func:`otguard.evaluation.learned_judge.validate`);
- ``minilm-lr`` (``--embeddings``): logistic regression on frozen MiniLM embeddings of the answer and
  the question (the issue's floor; embedding ~16k answers takes minutes on one core).

    OMP_NUM_THREADS=1 python benchmarks/judges.py --data-dir ../shared/data
    python benchmarks/judges.py --data-dir ../shared/data --labels truth --embeddings
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("OTGUARD_DATA_DIR", "../shared/data"))
    p.add_argument(
        "--labels", nargs="+", default=["truth", "info", "nqopen"], choices=["truth", "info", "nqopen"]
    )
    p.add_argument("--embeddings", action="store_true", help="also measure LR on frozen MiniLM embeddings")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


ARGS = _parse()
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(ARGS.threads)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from otguard.data import nqopen_items, truthfulqa_items  # noqa: E402
from otguard.evaluation import learned_judge_model as model  # noqa: E402
from otguard.evaluation.learned_judge import JudgeSettings, rates, validate  # noqa: E402
from otguard.evaluation.learned_judge_data import (  # noqa: E402
    load_labels,
    split_seen_questions,
    split_unseen_questions,
)


def _splits(data, unseen: bool):
    yield "seen_questions", *split_seen_questions(data, 0)
    if unseen:
        for f in (0, 1):
            yield f"unseen_questions_fold{f}", *split_unseen_questions(data, f)


def _words_only(data, unseen: bool):
    s = JudgeSettings()
    for name, train, test in _splits(data, unseen):
        t0 = time.perf_counter()
        docs = model._docs([data.answers[i] for i in train], data.question_ids[train].tolist())
        fitted = model._fit_words(docs, data.labels[train], s.c_words)
        seconds = time.perf_counter() - t0
        q = np.full(len(test), -1) if name.startswith("unseen") else data.question_ids[test]
        score = model._score_words(fitted, model._docs([data.answers[i] for i in test], q.tolist()))
        yield {"split": name, **rates(data.labels[test], 1 / (1 + np.exp(-score))), "train_seconds": seconds}


def _minilm_lr(data, unseen: bool):
    from sklearn.linear_model import LogisticRegression

    from otguard.evaluation.semantic import SentenceEmbedder

    emb = SentenceEmbedder("minilm")
    t0 = time.perf_counter()
    texts = sorted(set(data.answers))
    index = {t: i for i, t in enumerate(texts)}
    a = emb.encode(texts).numpy()[[index[t] for t in data.answers]]
    qv = emb.encode(list(data.questions)).numpy()[data.question_ids]
    x = np.hstack([a, qv])
    embed_s = time.perf_counter() - t0
    print(f"  (MiniLM embedding of {len(texts)} answers + {len(data.questions)} questions: {embed_s:.0f} s)")
    for name, train, test in _splits(data, unseen):
        t0 = time.perf_counter()
        reg = LogisticRegression(max_iter=3000).fit(x[train], data.labels[train])
        seconds = time.perf_counter() - t0 + embed_s
        yield {
            "split": name,
            **rates(data.labels[test], reg.predict_proba(x[test])[:, 1]),
            "train_seconds": seconds,
        }


def main() -> None:
    print(
        f"torch {torch.__version__}, threads {ARGS.threads}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )
    tqa = truthfulqa_items(ARGS.data_dir)
    sources = {
        "truth": ("truthfulqa/finetune_truth.jsonl", tqa),
        "info": ("truthfulqa/finetune_info.jsonl", tqa),
        "nqopen": ("nqopen/finetune_truth.jsonl", None),
    }
    print("| labels | candidate | split | accuracy | AUROC | TPR | TNR | n | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in ARGS.labels:
        rel, items = sources[label]
        data = load_labels(
            Path(ARGS.data_dir) / rel, items if items is not None else nqopen_items(ARGS.data_dir)
        )
        unseen = bool((~data.is_reference).any())
        majority = max(data.labels.mean(), 1 - data.labels.mean())
        print(f"| {label} | (majority class, all labels) | | {majority:.3f} | | | | {len(data)} | |")
        kind = "info" if label == "info" else "truth"
        candidates = {"words": _words_only(data, unseen), "judge": validate(data, kind=kind, unseen=unseen)}
        if ARGS.embeddings:
            candidates["minilm-lr"] = _minilm_lr(data, unseen)
        for cand, results in candidates.items():
            for r in results:
                cells = [
                    label,
                    cand,
                    r["split"],
                    f"{r['accuracy']:.3f}",
                    f"{r['auroc']:.3f}",
                    f"{r['tpr']:.2f}",
                    f"{r['tnr']:.2f}",
                    str(r["n"]),
                    f"{r['train_seconds']:.0f}",
                ]
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
