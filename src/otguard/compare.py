"""``otguard compare``: fit every method on every fold and evaluate them side by side.

For each fold (k-fold by question, validation split inside the training fold, everything seeded):
fit each method on the fold's activations (collected once per model and reused by all methods and
folds), then evaluate it on the held-out questions:

- multiple choice: MC1/MC2/MC3 (policy edits answer tokens only);
- generation: greedy answers judged by the main judge (True, Info, True×Info as the product of
  averages *and* as the joint rate), plus SEM, the BLEU/ROUGE-L reference-overlap rules and the
  "I have no comment" rate;
- transfer: the same generation evaluation on NQ-Open (a fixed, seeded subset, split across folds);
- side effects: CE and KL on a seeded sample of natural text (policy on every position; split across
  folds), the detector's flag rate and edited heads per flagged token.

Writes ``results.json`` (per method and metric: mean, std and per-fold values, plus the run's
configuration and versions), ``answers.csv``, ``report.md`` and ``report.html``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otguard.errors import DataError

logger = logging.getLogger(__name__)

METRICS: dict[str, dict[str, Any]] = {
    "mc1": {"label": "MC1", "higher_is_better": True, "group": "mc", "unit": "%"},
    "mc2": {"label": "MC2", "higher_is_better": True, "group": "mc", "unit": "%"},
    "mc3": {"label": "MC3", "higher_is_better": True, "group": "mc", "unit": "%"},
    "true": {"label": "True", "higher_is_better": True, "group": "generation", "unit": "%"},
    "info": {"label": "Info", "higher_is_better": True, "group": "generation", "unit": "%"},
    "true_x_info_product": {"label": "True×Info (product)", "higher_is_better": True, "group": "generation",
                            "unit": "%"},
    "true_x_info_joint": {"label": "True×Info (joint)", "higher_is_better": True, "group": "generation",
                          "unit": "%"},
    "sem": {"label": "SEM", "higher_is_better": True, "group": "generation", "unit": "%"},
    "bleu_true": {"label": "BLEU true", "higher_is_better": True, "group": "generation", "unit": "%"},
    "rouge_true": {"label": "ROUGE-L true", "higher_is_better": True, "group": "generation", "unit": "%"},
    "no_comment_rate": {"label": "No comment", "higher_is_better": None, "group": "generation", "unit": "%"},
    "nq_true": {"label": "NQ True", "higher_is_better": True, "group": "transfer", "unit": "%"},
    "nq_info": {"label": "NQ Info", "higher_is_better": True, "group": "transfer", "unit": "%"},
    "nq_true_x_info_product": {"label": "NQ True×Info", "higher_is_better": True, "group": "transfer",
                               "unit": "%"},
    "ce": {"label": "CE", "higher_is_better": False, "group": "side-effects", "unit": "nats"},
    "kl": {"label": "KL", "higher_is_better": False, "group": "side-effects", "unit": "nats"},
    "flag_rate": {"label": "Flag rate", "higher_is_better": None, "group": "side-effects", "unit": "%"},
    "edited_heads": {"label": "Edited heads / flag", "higher_is_better": None, "group": "side-effects",
                     "unit": ""},
}  # fmt: skip


@dataclass
class CompareConfig:
    """Everything that defines a comparison run (recorded verbatim in ``results.json``)."""

    model: str = "smollm2-135m"
    dataset: str = "truthfulqa"
    data_dir: str | None = None
    methods: tuple[str, ...] = ("none", "iti", "mean-shift", "radiant", "slim")
    folds: int = 2
    limit: int | None = None
    judge: str = "sem"
    embedder: str = "minilm"
    seed: int = 0
    split_seed: int = 42
    val_ratio: float = 0.2
    batch_size: int = 32
    mc_batch_size: int = 64
    max_new_tokens: int = 50
    transfer: str | None = "nqopen"
    transfer_questions: int = 200  # in all, split across the folds
    drift_source: str | None = "xsum"
    drift_docs: int = 100  # in all, split across the folds
    drift_tokens: int = 128
    stage3_questions: int = 24
    kappa_grid: tuple[float, ...] = (5.0, 10.0, 20.0, 40.0)
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    judge_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from otguard import __version__

    return {"otguard": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}  # fmt: skip


def _summary(values: Sequence[float]) -> dict[str, Any]:
    vals = [float(v) for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else float("nan")
    std = float(np.std(finite)) if len(finite) > 1 else 0.0
    return {"mean": _clean(mean), "std": _clean(std), "folds": [_clean(v) for v in vals]}


def _clean(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _judge_metrics(prefix: str, result: Any) -> dict[str, float]:
    s = result.summary()
    out = {f"{prefix}true": s["true"]}
    if s.get("info") is not None:
        out[f"{prefix}info"] = s["info"]
        out[f"{prefix}true_x_info_product"] = s["true_x_info_product"]
        if not prefix:
            out["true_x_info_joint"] = s["true_x_info_joint"]
    return out


def _fit_policies(model: Any, tokenizer: Any, config: CompareConfig, acts: Any, split: Any,
                  stage3: Any, progress: bool) -> dict[str, Any]:  # fmt: skip
    """Fit every method of ``config`` on one fold; ``stage3(policy)`` tunes SLIM's κ (or returns it)."""
    from otguard.methods import get_method

    policies: dict[str, Any] = {}
    for name in config.methods:
        t0 = time.time()
        params = {"seed": config.seed, **config.method_params.get(name, {})}
        method = get_method(name)
        params = {k: v for k, v in params.items() if k in method.get_params()}
        if "progress" in method.get_params():
            params["progress"] = progress
        policy = method.set_params(**params).fit(acts, split.train, split.val).policy_
        if name == "slim" and "kappa" not in config.method_params.get("slim", {}):
            policy = stage3(policy)
        policy.meta["fit_seconds"] = time.time() - t0
        policies[name] = policy
    return policies


def _fold_info(fold: int, policy: Any, seconds: float) -> dict[str, Any]:
    det = policy.meta.get("detector_val")
    return {
        "fold": fold,
        "seconds": seconds,
        "fit_seconds": policy.meta.get("fit_seconds"),
        "policy": {"layers": [e.layer for e in policy.layers],
                   "threshold": policy.layers[0].threshold if policy.layers else None,
                   "kappa": policy.kappa, "rule": policy.rule},
        "detector": ({"layer": policy.meta.get("layer"),
                      "per_layer": {k: det[k] for k in ("fpr", "fnr", "accuracy", "f1", "threshold")
                                    if k in det}} if det else None),
    }  # fmt: skip


def run_compare(
    model: Any,
    tokenizer: Any,
    config: CompareConfig,
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the comparison and write its outputs into ``out_dir``; returns the results dict.

    Per fold, every method is fitted first; then the side effects of all policies are measured in
    one pass over the natural-text sample (the original model's forward is shared), and each policy
    is evaluated on the fold's held-out questions. The transfer questions and the natural-text
    documents are split across the folds like the questions (fold ``k`` uses items ``k::folds``), so
    every item is evaluated once per method, with the policy of the fold it falls in.
    """
    from otguard.activations import collect
    from otguard.data import group_kfold, nqopen_items, truthfulqa_items, truthfulqa_mc2
    from otguard.evaluation.drift import load_documents, measure_drift_many, sample_documents
    from otguard.evaluation.judges import ReferenceOverlapJudge, SemJudge, make_judge, no_comment_rate
    from otguard.evaluation.semantic import SentenceEmbedder
    from otguard.evaluation.truthfulqa_gen import generate_answers
    from otguard.evaluation.truthfulqa_mc import score_mc
    from otguard.methods.stage3 import select_kappa
    from otguard.report import atomic_write_bytes, write_report

    if config.dataset not in ("truthfulqa", "truthfulqa-mc2"):
        raise DataError(f"compare supports --dataset truthfulqa for now, got {config.dataset!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    dataset = truthfulqa_mc2(config.data_dir)
    items = truthfulqa_items(config.data_dir)
    n_transfer, n_docs = config.transfer_questions, config.drift_docs
    if config.limit:
        dataset = dataset.limit_groups(config.limit)
        items = items[: config.limit]
        # A quick run scales the side evaluations with it (one transfer question per two questions).
        n_transfer = min(n_transfer, max(1, config.limit // 2))
        n_docs = min(n_docs, max(10, config.limit // 4))
    acts = collect(model, tokenizer, dataset, batch_size=config.batch_size, progress=progress)
    timings: dict[str, float] = {"collect": time.time() - started}

    embedder = SentenceEmbedder(config.embedder)
    sem_judge = SemJudge(embedder)
    main_judge = sem_judge if config.judge == "sem" else make_judge(config.judge, **config.judge_options)
    overlap = {"bleu_true": ReferenceOverlapJudge("bleu"), "rouge_true": ReferenceOverlapJudge("rougeL")}

    transfer_items: list[Any] = []
    if config.transfer == "nqopen":
        try:
            all_nq = nqopen_items(config.data_dir)
            n = min(n_transfer, len(all_nq))
            pick = np.sort(np.random.default_rng(config.seed).choice(len(all_nq), size=n, replace=False))
            transfer_items = [all_nq[i] for i in pick]
        except DataError as exc:
            logger.warning("Transfer evaluation skipped: %s", exc)
    docs: list[str] = []
    if config.drift_source:
        try:
            docs = sample_documents(load_documents(config.drift_source), n_docs, seed=config.seed)
        except DataError as exc:
            logger.warning("CE/KL skipped: %s", exc)

    def add_time(key: str, t0: float) -> None:
        timings[key] = timings.get(key, 0.0) + time.time() - t0

    per_method: dict[str, dict[str, list[float]]] = {m: {} for m in config.methods}
    fold_info: dict[str, list[dict[str, Any]]] = {m: [] for m in config.methods}
    answer_rows: list[dict[str, Any]] = []
    for fold in range(config.folds):
        split = group_kfold(dataset, n_folds=config.folds, fold=fold, val_ratio=config.val_ratio,
                            seed=config.split_seed)  # fmt: skip
        test_items = [items[g] for g in np.unique(dataset.groups[split.test])]
        val_items = [items[g] for g in np.unique(dataset.groups[split.val])][: config.stage3_questions]
        fold_transfer = transfer_items[fold :: config.folds]
        fold_docs = docs[fold :: config.folds]

        def stage3(policy: Any, val_items: list[Any] = val_items) -> Any:
            if not val_items:
                return policy
            t0 = time.time()
            sel = select_kappa(policy, model, tokenizer, val_items, embedder, grid=config.kappa_grid,
                               max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                               progress=progress)  # fmt: skip
            add_time("stage3", t0)
            policy = policy.with_kappa(sel.kappa)
            policy.meta["stage3"] = sel.to_dict()
            return policy

        t0 = time.time()
        policies = _fit_policies(model, tokenizer, config, acts, split, stage3, progress)
        add_time("fit", t0)
        active = {name: (p if p.layers else None) for name, p in policies.items()}
        drift = {}
        if fold_docs:
            t0 = time.time()
            drift = measure_drift_many(model, tokenizer, fold_docs, active, max_tokens=config.drift_tokens,
                                       batch_size=8, progress=progress)  # fmt: skip
            add_time("side_effects", t0)
        for name in config.methods:
            t_method = time.time()
            policy = active[name]
            metrics: dict[str, float] = {}
            t0 = time.time()
            mc = score_mc(model, tokenizer, test_items, policy=policy, batch_size=config.mc_batch_size,
                          progress=progress)  # fmt: skip
            add_time("mc", t0)
            metrics.update({"mc1": mc.mc1, "mc2": mc.mc2, "mc3": mc.mc3})
            t0 = time.time()
            answers, _ = generate_answers(model, tokenizer, [it.question for it in test_items], policy=policy,
                                          max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                                          progress=progress)  # fmt: skip
            add_time("generation", t0)
            t0 = time.time()
            main = main_judge.judge(test_items, answers)
            metrics.update(_judge_metrics("", main))
            metrics["sem"] = (
                main.summary()["true"] if main_judge is sem_judge
                else sem_judge.judge(test_items, answers).summary()["true"]
            )  # fmt: skip
            for key, judge in overlap.items():
                metrics[key] = judge.judge(test_items, answers).summary()["true"]
            metrics["no_comment_rate"] = no_comment_rate(answers)
            add_time("judging", t0)
            truthful = np.asarray(main.truthful, dtype=bool)
            for it, ans, ok in zip(test_items, answers, truthful, strict=True):
                answer_rows.append({"fold": fold, "method": name, "question": it.question, "answer": ans,
                                    "true": bool(ok)})  # fmt: skip
            if fold_transfer:
                t0 = time.time()
                nq_answers, _ = generate_answers(model, tokenizer, [it.question for it in fold_transfer],
                                                 policy=policy, max_new_tokens=config.max_new_tokens,
                                                 batch_size=config.batch_size, progress=progress)  # fmt: skip
                metrics.update(_judge_metrics("nq_", main_judge.judge(fold_transfer, nq_answers)))
                add_time("transfer", t0)
            if name in drift:
                d = drift[name]
                metrics["ce"], metrics["kl"] = d.ce, d.kl
                if policy is not None and d.flag_rate is not None:
                    metrics["flag_rate"] = d.flag_rate
                    metrics["edited_heads"] = d.edited_heads_per_flag or 0.0
            for key, value in metrics.items():
                per_method[name].setdefault(key, []).append(float(value))
            fold_info[name].append(_fold_info(fold, policies[name], time.time() - t_method))
            shown = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())
            logger.info("fold %d %s: %s (%.0f s)", fold, name, shown, time.time() - t_method)

    results = {
        "config": {**config.to_dict(), "model": getattr(model.config, "_name_or_path", config.model),
                   "judge": main_judge.name if hasattr(main_judge, "name") else config.judge,
                   "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                   "threads": torch.get_num_threads(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                   "seconds": time.time() - started, "timings": timings, "versions": _versions(),
                   "methods": list(config.methods)},
        "metrics": {k: v for k, v in METRICS.items() if any(k in per_method[m] for m in config.methods)},
        "methods": {m: {"summary": {k: _summary(v) for k, v in per_method[m].items()}, "folds": fold_info[m]}
                    for m in config.methods},
    }  # fmt: skip
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2, default=str).encode("utf-8"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["fold", "method", "question", "answer", "true"])
    writer.writeheader()
    writer.writerows(answer_rows)
    atomic_write_bytes(out / "answers.csv", buf.getvalue().encode("utf-8"))
    write_report(out / "results.json", out)
    logger.info("Wrote %s (%.0f s)", out / "results.json", time.time() - started)
    return results
