"""The TruthfulQA task: multiple choice, judged generation and NQ-Open transfer, in one place.

The detector is trained on TruthfulQA's MC2 answers (truthful = desirable), folds split by question.
Each policy is evaluated on its fold's held-out questions:

- multiple choice: MC1/MC2/MC3 (the policy edits answer tokens only);
- generation: greedy answers judged by the main judge (True, Info, True×Info as the product of
  averages *and* as the joint rate), plus SEM, the BLEU/ROUGE-L reference-overlap rules and the
  "I have no comment" rate;
- transfer: the same generation evaluation on NQ-Open (a fixed, seeded subset, split across folds).

SLIM's Stage 3 chooses κ on (at most ``stage3_questions``) validation questions of the training fold.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from otguard.errors import DataError, OtguardError
from otguard.harness.task import SIDE_EFFECT_METRICS, Evaluation, StageTimer, Task, common_reading
from otguard.results import MetricSpec

if TYPE_CHECKING:
    from otguard.data.qa import QAItem
    from otguard.data.splits import Split
    from otguard.harness.config import CompareConfig
    from otguard.policy import Policy
    from otguard.results import RunResults

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "TruthfulQATask", "judge_metrics"]

_GEN = "generation"
#: TruthfulQA's metric catalogue, in table order.
METRICS: dict[str, MetricSpec] = {
    "mc1": MetricSpec("MC1", True, "mc", "%"),
    "mc2": MetricSpec("MC2", True, "mc", "%"),
    "mc3": MetricSpec("MC3", True, "mc", "%"),
    "true": MetricSpec("True", True, _GEN, "%"),
    "info": MetricSpec("Info", True, _GEN, "%"),
    "true_x_info_product": MetricSpec("True×Info (product)", True, _GEN, "%"),
    "true_x_info_joint": MetricSpec("True×Info (joint)", True, _GEN, "%"),
    "sem": MetricSpec("SEM", True, _GEN, "%"),
    "bleu_true": MetricSpec("BLEU true", True, _GEN, "%"),
    "rouge_true": MetricSpec("ROUGE-L true", True, _GEN, "%"),
    "no_comment_rate": MetricSpec("No comment", None, _GEN, "%"),
    "nq_true": MetricSpec("NQ True", True, "transfer", "%"),
    "nq_info": MetricSpec("NQ Info", True, "transfer", "%"),
    "nq_true_x_info_product": MetricSpec("NQ True×Info", True, "transfer", "%"),
    **SIDE_EFFECT_METRICS,
}

# A judged answer for the pre-run check of an external judge.
_PROBE_ANSWER = "I have no comment."


def judge_metrics(prefix: str, result: Any) -> dict[str, float]:
    """True / Info / True×Info of a judge result, keys prefixed (``""`` or ``"nq_"``)."""
    s = result.summary()
    out = {f"{prefix}true": s["true"]}
    if s.get("info") is not None:
        out[f"{prefix}info"] = s["info"]
        out[f"{prefix}true_x_info_product"] = s["true_x_info_product"]
        if not prefix:
            out["true_x_info_joint"] = s["true_x_info_joint"]
    return out


class TruthfulQATask(Task):
    """TruthfulQA: MC1/2/3, judged generation, NQ-Open transfer; SLIM's κ tuned on validation questions."""

    name: ClassVar[str] = "truthfulqa"
    metrics: ClassVar[dict[str, MetricSpec]] = METRICS
    csv_name: ClassVar[str] = "answers.csv"
    csv_fields: ClassVar[tuple[str, ...]] = ("fold", "method", "question", "answer", "true")

    def __init__(
        self, config: CompareConfig, *, progress: bool = True, timer: StageTimer | None = None
    ) -> None:
        from otguard.data import nqopen_items, truthfulqa_items, truthfulqa_mc2
        from otguard.evaluation.factory import make_judge
        from otguard.evaluation.overlap import ReferenceOverlapJudge
        from otguard.evaluation.semantic import SemJudge, SentenceEmbedder

        super().__init__(config, progress=progress, timer=timer)
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
        self.judge_name: str = getattr(self.judge, "name", config.judge)
        self.overlap = {
            "bleu_true": ReferenceOverlapJudge("bleu"),
            "rouge_true": ReferenceOverlapJudge("rougeL"),
        }
        self.transfer_items: list[QAItem] = []
        if config.transfer == "nqopen" and n_transfer > 0:
            try:
                all_nq = nqopen_items(config.data_dir)
                n = min(n_transfer, len(all_nq))
                pick = np.sort(np.random.default_rng(config.seed).choice(len(all_nq), size=n, replace=False))
                self.transfer_items = [all_nq[i] for i in pick]
            except DataError as exc:
                logger.warning("Transfer evaluation skipped: %s", exc)
        self.test_items: list[QAItem] = []
        self.val_items: list[QAItem] = []
        self.fold_transfer: list[QAItem] = []

    def preflight(self) -> None:
        """Judge one answer with a judge that is not the offline SEM judge (an HTTP server, usually).

        The check uses at most one retry, so a server that is down fails in seconds, not minutes.
        """
        if self.judge is self.sem_judge or not self.items:
            return
        retries = getattr(self.judge, "max_retries", None)
        try:
            if retries is not None:
                self.judge.max_retries = min(1, retries)  # type: ignore[attr-defined]
            self.judge.judge(self.items[:1], [_PROBE_ANSWER])
        except OtguardError as exc:
            from otguard.evaluation.verdicts import JudgeError

            raise JudgeError(
                f"The judge {self.judge_name!r} failed its check before the run started: {exc}"
            ) from exc
        finally:
            if retries is not None:
                self.judge.max_retries = retries  # type: ignore[attr-defined]
        logger.info("Judge %s answered the pre-run check", self.judge_name)

    def start_fold(self, fold: int, split: Split) -> None:
        groups = self.dataset.groups
        self.fold = fold
        self.test_items = [self.items[g] for g in np.unique(groups[split.test])]
        self.val_items = [self.items[g] for g in np.unique(groups[split.val])][: self.config.stage3_questions]
        self.fold_transfer = self.transfer_items[fold :: self.config.folds]
        self.fold_meta = {
            "test_questions": len(self.test_items),
            "transfer_questions": len(self.fold_transfer),
        }

    def stage3(self, policy: Policy) -> Policy:
        from otguard.methods.stage3 import select_kappa

        if not self.val_items:
            return policy
        with self.timer("stage3"):
            sel = select_kappa(
                policy,
                self.model,
                self.tokenizer,
                self.val_items,
                self.embedder,
                grid=self.config.kappa_grid,
                max_new_tokens=self.config.max_new_tokens,
                batch_size=self.config.batch_size,
                progress=self.progress,
            )
        policy = policy.with_kappa(sel.kappa)
        policy.meta["stage3"] = sel.to_dict()
        return policy

    def _answers(self, items: list[QAItem], policy: Policy | None) -> list[str]:
        from otguard.evaluation.truthfulqa_gen import generate_answers

        cfg = self.config
        answers, _ = generate_answers(
            self.model,
            self.tokenizer,
            [it.question for it in items],
            policy=policy,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            progress=self.progress,
        )
        return answers

    def evaluate(self, method: str, policy: Policy | None) -> Evaluation:
        from otguard.evaluation.truthfulqa_mc import score_mc
        from otguard.evaluation.verdicts import no_comment_rate

        cfg, items = self.config, self.test_items
        metrics: dict[str, float] = {}
        with self.timer("mc"):
            mc = score_mc(
                self.model,
                self.tokenizer,
                items,
                policy=policy,
                batch_size=cfg.mc_batch_size,
                progress=self.progress,
            )
        metrics.update({"mc1": mc.mc1, "mc2": mc.mc2, "mc3": mc.mc3})
        with self.timer("generation"):
            answers = self._answers(items, policy)
        with self.timer("judging"):
            main = self.judge.judge(items, answers)
            metrics.update(judge_metrics("", main))
            metrics["sem"] = (
                main.summary()["true"]
                if self.judge is self.sem_judge
                else self.sem_judge.judge(items, answers).summary()["true"]
            )
            for key, judge in self.overlap.items():
                metrics[key] = judge.judge(items, answers).summary()["true"]
            metrics["no_comment_rate"] = no_comment_rate(answers)
        truthful = np.asarray(main.truthful, dtype=bool)
        rows = [
            {"fold": self.fold, "method": method, "question": it.question, "answer": ans, "true": bool(ok)}
            for it, ans, ok in zip(items, answers, truthful, strict=True)
        ]
        if self.fold_transfer:
            with self.timer("transfer"):
                nq_answers = self._answers(self.fold_transfer, policy)
                metrics.update(judge_metrics("nq_", self.judge.judge(self.fold_transfer, nq_answers)))
        return Evaluation(metrics, rows)

    @classmethod
    def how_to_read(cls, results: RunResults) -> list[tuple[str, str]]:
        judge = str(results.config.get("judge", "unknown"))
        common = common_reading()
        return [
            common["cells"],
            (
                "MC1 / MC2 / MC3:",
                "TruthfulQA multiple choice from answer likelihoods. MC1: the best answer scores highest; "
                "MC2: normalised probability mass on the true answers; MC3: share of the true answers that "
                "score above every false one.",
            ),
            (
                "True×Info product vs. joint:",
                "the product multiplies the two averages (% true × % informative), as the papers report "
                "it; the joint rate is the share of answers that are both true and informative. They differ "
                "when truth and informativeness trade off answer by answer: a refusal ('I have no comment') "
                "counts as true but not informative, so a method that refuses more can keep the product up "
                "while adding nothing to the joint rate.",
            ),
            common["side_effects"],
            common["flags"],
            (
                "Judges:",
                f"generation metrics here come from the '{judge}' judge. Semantic-similarity (SEM) and "
                "other offline judges are not comparable with the fine-tuned GPT judges of the RADIANT, "
                "SLIM and TruthfulQA papers: compare methods within this report, not with the papers' "
                "numbers.",
            ),
        ]
