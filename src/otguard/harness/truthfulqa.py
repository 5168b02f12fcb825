"""The TruthfulQA task: multiple choice, judged generation, transfer and the gate, in one place.

The detector is trained on TruthfulQA's MC2 answers (truthful = desirable), folds split by question.
Each policy is evaluated on its fold's held-out questions:

- multiple choice: MC1/MC2/MC3 (the policy edits answer tokens only);
- generation: greedy answers judged by the main judge (True, Info, True×Info as the product of the
  fold means *and* as the joint rate), plus SEM, the BLEU/ROUGE-L reference-overlap rules and the
  "I have no comment" rate; every column names its judge, and a column that would repeat the main
  judge (SEM when SEM is the main judge) is not computed twice;
- repair and harm: per question, the judged truth (and MC1) of the policy's answer against the
  unsteered answer of the same fold (computed by the fold loop from the per-question values);
- the gate at the point of use (gated methods): reference answers of the fold's test questions
  (a seeded sample, :func:`gate_sample`) teacher-forced in the generation prompt
  (:mod:`otguard.evaluation.gate`);
- transfer: the same generation evaluation on other question sets (NQ-Open, or CSV files in the
  TruthfulQA layout; a fixed, seeded subset of each, split across folds), judged by the learned judge
  trained on that set's labels where they exist, else by the main judge, with SEM next to it.

SLIM's Stage 3 chooses κ on a seeded random sample of (at most ``stage3_questions``) validation
questions of the training fold.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from otguard.errors import OtguardError
from otguard.harness.paired import ItemValues
from otguard.harness.task import (
    SIDE_EFFECT_METRICS,
    Evaluation,
    ProductSpec,
    RepairSpec,
    StageTimer,
    Task,
    common_reading,
)
from otguard.harness.transfer import TransferSet, build_transfer_sets
from otguard.harness.truthfulqa_sweep import TruthfulQASweeps, policy_key
from otguard.io import json_finite
from otguard.results import MetricSpec

if TYPE_CHECKING:
    from otguard.data.qa import QAItem
    from otguard.data.splits import Split
    from otguard.harness.config import CompareConfig
    from otguard.policy import Policy
    from otguard.results import RunResults

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "TransferSet", "TruthfulQATask", "gate_sample", "judge_metrics"]

_GEN, _REPAIR, _GATE = "generation", "repair", "gate"
TEST = "test"  # the item set of the fold's test questions
#: TruthfulQA's metric catalogue, in table order (a run's labels name its judges: ``metric_specs``).
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
    "repair_rate": MetricSpec("Repaired", True, _REPAIR, "%"),
    "harm_rate": MetricSpec("Harmed", False, _REPAIR, "%"),
    "mc1_repair_rate": MetricSpec("Repaired (MC1)", True, _REPAIR, "%"),
    "mc1_harm_rate": MetricSpec("Harmed (MC1)", False, _REPAIR, "%"),
    "nq_true": MetricSpec("NQ True", True, "transfer", "%"),
    "nq_info": MetricSpec("NQ Info", True, "transfer", "%"),
    "nq_true_x_info_product": MetricSpec("NQ True×Info", True, "transfer", "%"),
    "nq_sem": MetricSpec("NQ SEM", True, "transfer", "%"),
    "false_flag_rate": MetricSpec("False-flag rate (true answers)", False, _GATE, "%"),
    "catch_rate": MetricSpec("Catch rate (false answers)", True, _GATE, "%"),
    "gate_auroc": MetricSpec("Gate AUROC (votes)", True, _GATE, ""),
    "guarantee_share": MetricSpec("Desirable after edit", True, _GATE, "%"),
    "guarantee_nominal": MetricSpec("Nominal level", None, _GATE, "%"),
    **SIDE_EFFECT_METRICS,
}
_GATE_KEYS = ("false_flag_rate", "catch_rate", "gate_auroc", "guarantee_share")

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


def _floats(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


class TruthfulQATask(TruthfulQASweeps, Task):
    """TruthfulQA: MC1/2/3, judged generation, repair/harm, the gate at the point of use, transfer;
    SLIM's κ tuned on validation questions."""

    name: ClassVar[str] = "truthfulqa"
    metrics: ClassVar[dict[str, MetricSpec]] = METRICS
    csv_name: ClassVar[str] = "answers.csv"
    csv_fields: ClassVar[tuple[str, ...]] = ("fold", "method", "question", "answer", "true")

    def __init__(
        self, config: CompareConfig, *, progress: bool = True, timer: StageTimer | None = None
    ) -> None:
        from otguard.data import truthfulqa_items, truthfulqa_mc2
        from otguard.evaluation.overlap import ReferenceOverlapJudge
        from otguard.evaluation.semantic import SemJudge, SentenceEmbedder
        from otguard.harness.judges import build_main_judge

        super().__init__(config, progress=progress, timer=timer)
        self.dataset = truthfulqa_mc2(config.data_dir)
        self.items = truthfulqa_items(config.data_dir)
        n_transfer = int(config.transfer_questions)
        if config.limit:
            self.dataset = self.dataset.limit_groups(config.limit)
            self.items = self.items[: config.limit]
        self.embedder = SentenceEmbedder(config.embedder)
        self.sem_judge = SemJudge(self.embedder)
        self.choice = build_main_judge(config.judge, config, self.sem_judge)
        self.judge = self.choice.judge
        self.judge_name: str = getattr(self.judge, "name", config.judge)
        # Secondary columns; one that would repeat the main judge is left out.
        self.extra_sem = self.choice.kind != "sem"
        self.overlap = {}
        if self.choice.kind != "bleu":
            self.overlap["bleu_true"] = ReferenceOverlapJudge("bleu")
        if self.choice.kind != "rouge":
            self.overlap["rouge_true"] = ReferenceOverlapJudge("rougeL")
        self.transfer_sets = (
            build_transfer_sets(self.config, self.choice, self.judge, self.sem_judge, n_transfer, METRICS)
            if n_transfer > 0
            else []
        )
        self.test_items: list[QAItem] = []
        self.val_items: list[QAItem] = []
        self.fold_transfer: dict[str, list[QAItem]] = {}
        self.gate_items: list[QAItem] = []
        self.val_all: list[QAItem] = []  # every validation question of the fold
        self.sweep_items: list[QAItem] = []  # the seeded sample of them that scores grid points
        self.frontier_items: list[QAItem] = []
        self._mc_cache = {}
        # a policy's outputs on a question, computed once per run (keys: truthfulqa_sweep.policy_key):
        # the frontier reuses the test pass's MC scores and answers, the unsteered answers serve every
        # fold's and method's reference
        self._mc_memo = {}
        self._answer_memo: dict[str, dict[str, str]] = {}

    # ---- set-up ------------------------------------------------------------------------------------

    def preflight(self) -> None:
        """Judge one answer with a judge that is not the offline SEM judge (an HTTP server, usually).

        The check uses at most one retry, so a server that is down fails in seconds, not minutes.
        """
        if self.choice.kind != "openai" or not self.items:
            return
        retries = getattr(self.judge, "max_retries", None)
        try:
            if retries is not None:
                self.judge.max_retries = min(1, retries)
            self.judge.judge(self.items[:1], [_PROBE_ANSWER])
        except OtguardError as exc:
            from otguard.evaluation.verdicts import JudgeError

            raise JudgeError(
                f"The judge {self.judge_name!r} failed its check before the run started: {exc}"
            ) from exc
        finally:
            if retries is not None:
                self.judge.max_retries = retries
        logger.info("Judge %s answered the pre-run check", self.judge_name)

    # ---- catalogue and judges ----------------------------------------------------------------------

    def metric_specs(self) -> dict[str, MetricSpec]:
        """The catalogue with every generation column naming its judge; one entry per transfer set."""
        j, info = self.choice.label, self.choice.info_label
        both = j if j == info else f"{j} × {info}"
        joint = j if j == info else f"{j} & {info}"
        label = {
            "true": f"True ({j})",
            "info": f"Info ({info})",
            "true_x_info_product": f"True×Info product ({both})",
            "true_x_info_joint": f"True×Info joint ({joint})",
            "sem": "SEM (MiniLM)" if self.config.embedder == "minilm" else f"SEM ({self.config.embedder})",
            "bleu_true": "BLEU true (reference overlap)",
            "rouge_true": "ROUGE-L true (reference overlap)",
            "no_comment_rate": "No comment (refusal rule)",
            "repair_rate": f"Repaired ({j})",
            "harm_rate": f"Harmed ({j})",
            "mc1_repair_rate": "Repaired (MC1)",
            "mc1_harm_rate": "Harmed (MC1)",
        }
        out: dict[str, MetricSpec] = {}
        for key, spec in METRICS.items():
            if key.startswith("nq_"):
                continue
            if key == "sem" and not self.extra_sem:
                continue
            out[key] = MetricSpec(label.get(key, spec.label), spec.higher_is_better, spec.group, spec.unit)
            if key == "mc1_harm_rate":
                out.update(self._transfer_specs())
        return out

    def _transfer_specs(self) -> dict[str, MetricSpec]:
        out = {}
        for t in self.transfer_sets:
            out[f"{t.prefix}true"] = MetricSpec(f"{t.label} True ({t.judge_label})", True, "transfer", "%")
            out[f"{t.prefix}info"] = MetricSpec(f"{t.label} Info ({t.info_label})", True, "transfer", "%")
            out[f"{t.prefix}true_x_info_product"] = MetricSpec(f"{t.label} True×Info product", True,
                                                               "transfer", "%")  # fmt: skip
            if t.sem:
                out[f"{t.prefix}sem"] = MetricSpec(f"{t.label} SEM (MiniLM)", True, "transfer", "%")
        return out

    def judges(self) -> dict[str, dict[str, Any]]:
        from otguard.harness.judges import unvalidated

        out = dict(self.choice.records)
        if self.extra_sem:
            out["sem"] = unvalidated("sem", self.sem_judge.name)
        for key, judge in self.overlap.items():
            out[key] = unvalidated("bleu" if key.startswith("bleu") else "rouge", judge.name)
        out["no_comment_rate"] = unvalidated("refusal", "refusal rule")
        for t in self.transfer_sets:
            out[f"{t.prefix}true"] = {**t.record, "transfer_set": t.source}
        return out

    def repair_metrics(self) -> dict[str, RepairSpec]:
        return {
            "repair_rate": (TEST, "true", "repair"),
            "harm_rate": (TEST, "true", "harm"),
            "mc1_repair_rate": (TEST, "mc1", "repair"),
            "mc1_harm_rate": (TEST, "mc1", "harm"),
        }

    def product_metrics(self) -> dict[str, ProductSpec]:
        out = {"true_x_info_product": (TEST, "true", "info")}
        for t in self.transfer_sets:
            out[f"{t.prefix}true_x_info_product"] = (t.prefix, f"{t.prefix}true", f"{t.prefix}info")
        return out

    def examples(
        self, before: list[dict[str, Any]], after: list[dict[str, Any]]
    ) -> dict[str, list[dict[str, Any]]]:
        """Questions whose judged truth changed: repaired (false -> true) and harmed (true -> false)."""
        base = {r["question"]: r for r in before}
        out: dict[str, list[dict[str, Any]]] = {"repaired": [], "harmed": []}
        for r in after:
            b = base.get(r["question"])
            if b is None:
                continue
            was, now = _truth(b["true"]), _truth(r["true"])
            if was != now:
                kind = "repaired" if now else "harmed"
                out[kind].append({"question": r["question"], "before": b["answer"], "after": r["answer"]})
        return out

    # ---- the fold loop's calls ---------------------------------------------------------------------

    def start_fold(self, fold: int, split: Split) -> None:
        from otguard.methods.stage3 import sample_questions

        groups = self.dataset.groups
        self.fold = fold
        self.test_items = [self.items[g] for g in np.unique(groups[split.test])]
        val = [self.items[g] for g in np.unique(groups[split.val])]
        # A seeded sample of all validation questions (TruthfulQA is sorted by category).
        self.val_items = sample_questions(val, self.config.stage3_questions, self.config.seed + fold)
        self.val_all = val
        n_sweep = int(self.config.sweep_questions)  # 0: every validation question
        self.sweep_items = sample_questions(val, n_sweep, self.config.seed + 200 + fold) if n_sweep else val
        n_frontier = int(self.config.frontier_questions)  # scaled with --limit by the configuration
        self.frontier_items = (
            sample_questions(self.test_items, n_frontier, self.config.seed + 100 + fold) if n_frontier else []
        )
        self._mc_cache = {}
        self.fold_transfer = {t.prefix: t.items[fold :: self.config.folds] for t in self.transfer_sets}
        self.gate_items = gate_sample(self.test_items, self.config.gate_questions, self.config.gate_answers,
                                      seed=self.config.seed + fold)  # fmt: skip
        self.fold_meta = {
            "test_questions": len(self.test_items),
            "stage3_questions": len(self.val_items),
            "gate_questions": len(self.gate_items),
            "sweep_questions": len(self.sweep_items),
            "frontier_questions": len(self.frontier_items),
            "transfer_questions": {t.source: len(self.fold_transfer[t.prefix]) for t in self.transfer_sets},
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
        """Greedy answers of ``policy`` to ``items``; each (policy, question) is generated once per run."""
        from otguard.evaluation.truthfulqa_gen import generate_answers

        cfg = self.config
        memo = self._answer_memo.setdefault(policy_key(policy), {})
        todo = list(dict.fromkeys(it.question for it in items if it.question not in memo))
        if len(todo) < len(items):
            logger.debug("%d of %d answers reused from earlier passes", len(items) - len(todo), len(items))
        if todo:
            answers, _ = generate_answers(
                self.model,
                self.tokenizer,
                todo,
                policy=policy,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size,
                progress=self.progress,
            )
            memo.update(zip(todo, answers, strict=True))
        return [memo[it.question] for it in items]

    def evaluate(self, method: str, policy: Policy | None) -> Evaluation:
        from otguard.evaluation.truthfulqa_mc import score_mc
        from otguard.evaluation.verdicts import is_refusal

        cfg, items = self.config, self.test_items
        metrics: dict[str, float] = {}
        mc = self._mc_cache.get(policy_key(policy))  # the fold's shared MC pass (prepare_test), when it ran
        if mc is None:
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
        per_item: dict[str, list[float]] = {
            "mc1": _floats(mc.mc1_per_question),
            "mc2": _floats(mc.mc2_per_question),
            "mc3": _floats(mc.mc3_per_question),
        }
        with self.timer("generation"):
            answers = self._answers(items, policy)
        with self.timer("judging"):
            main = self.judge.judge(items, answers)
            metrics.update(judge_metrics("", main))
            per_item["true"] = _floats(main.truthful)
            if main.informative is not None:
                per_item["info"] = _floats(main.informative)
                per_item["true_x_info_joint"] = _floats(main.truthful & main.informative)
            if self.extra_sem:
                sem = self.sem_judge.judge(items, answers)
                metrics["sem"], per_item["sem"] = sem.summary()["true"], _floats(sem.truthful)
            for key, judge in self.overlap.items():
                verdicts = judge.judge(items, answers)
                metrics[key], per_item[key] = verdicts.summary()["true"], _floats(verdicts.truthful)
            per_item["no_comment_rate"] = [float(is_refusal(a)) for a in answers]
            metrics["no_comment_rate"] = (
                float(np.mean(per_item["no_comment_rate"])) if answers else float("nan")
            )
        truthful = np.asarray(main.truthful, dtype=bool)
        rows = [
            {"fold": self.fold, "method": method, "question": it.question, "answer": ans, "true": bool(ok)}
            for it, ans, ok in zip(items, answers, truthful, strict=True)
        ]
        out = Evaluation(metrics, rows, {TEST: ItemValues([it.question for it in items], per_item)})
        if policy is not None and cfg.gate and any(e.threshold is not None for e in policy.layers):
            self._gate(policy, out)
        for t in self.transfer_sets:
            fold_items = self.fold_transfer.get(t.prefix) or []
            if not fold_items:
                continue
            with self.timer("transfer"):
                t_answers = self._answers(fold_items, policy)
                verdicts = t.judge.judge(fold_items, t_answers)
                metrics.update(judge_metrics(t.prefix, verdicts))
                values = {f"{t.prefix}true": _floats(verdicts.truthful)}
                if verdicts.informative is not None:
                    values[f"{t.prefix}info"] = _floats(verdicts.informative)
                if t.sem:
                    sem = self.sem_judge.judge(fold_items, t_answers)
                    metrics[f"{t.prefix}sem"], values[f"{t.prefix}sem"] = (
                        sem.summary()["true"],
                        _floats(sem.truthful),
                    )
            out.items[t.prefix] = ItemValues([it.question for it in fold_items], values)
        return out

    def _gate(self, policy: Policy, out: Evaluation) -> None:
        """The gate at the point of use on the fold's test questions (reference answers teacher-forced
        in the generation prompt): rates into the metrics, the whole record into the fold's facts."""
        from otguard.evaluation.gate import measure_gate

        with self.timer("gate"):
            gate = measure_gate(self.model, self.tokenizer, policy, self.gate_items,
                                batch_size=self.config.batch_size)  # fmt: skip
        for key in _GATE_KEYS:
            out.metrics[key] = float(getattr(gate, key))
        if gate.nominal_level is not None:
            out.metrics["guarantee_nominal"] = float(gate.nominal_level)
        record = json_finite(gate.to_dict())
        record.pop("info", None)
        out.meta["gate"] = record

    @classmethod
    def how_to_read(cls, results: RunResults) -> list[tuple[str, str]]:
        judge = str(results.config.get("judge", "unknown"))
        common = common_reading()
        validated = [
            f"{role} ({rec.get('name')})" for role, rec in results.judges.items() if rec.get("validated")
        ]
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
                "the product multiplies the two averages (% true × % informative, each averaged over the "
                "folds), as the papers report it; the joint rate is the share of answers that are both true "
                "and informative. They differ when truth and informativeness trade off answer by answer: a "
                "refusal ('I have no comment') counts as true but not informative, so a method that refuses "
                "more can keep the product up while adding nothing to the joint rate.",
            ),
            (
                "Repaired and harmed:",
                "per test question, the policy's answer against the unsteered model's answer to the same "
                "question (same fold). Repaired: share of the questions the unsteered model answered falsely "
                "that the policy answers truthfully; harmed: share of those answered truthfully that become "
                "false. The MC1 columns do the same with MC1's per-question verdict (no judge involved). A "
                "policy helps only where repairs clearly outnumber harms.",
            ),
            common["deltas"],
            (
                "The gate at the point of use:",
                "for gated methods, TruthfulQA's correct and incorrect reference answers of the test "
                f"questions ({_gate_sample_text(results.config)}) are teacher-forced inside the exact "
                "generation prompt with the policy attached. "
                "False-flag rate: share of true-answer tokens flagged; catch rate: share of false-answer "
                "tokens flagged; gate AUROC: of the vote count, false answers as positives. 'Desirable after "
                "edit' is the share of edited head activations the head's own probe calls desirable after "
                "the edit, against the nominal level the method's chance constraint promises (SLIM: "
                "1 − γ; RADIANT: Φ(margin)). The bank-level validation figures are those of the detector "
                "plot (last token of Q/A bank texts).",
            ),
            common["side_effects"],
            common["flags"],
            (
                "Judges:",
                f"the main judge is '{judge}'; every column names the judge behind it. "
                + (
                    "Validated against held-out human labels: " + ", ".join(validated) + " (figures under "
                    "'Judges' above). "
                    if validated
                    else "No judge of this run was validated against human labels. "
                )
                + "SEM, BLEU/ROUGE-L and the refusal rule are not validated; compare methods within this "
                "report, not with the papers' GPT-judge numbers.",
            ),
        ]


def _gate_sample_text(config: dict[str, Any]) -> str:
    q, a = config.get("gate_questions"), config.get("gate_answers")
    qs = "all of them" if not q else f"a seeded sample of up to {q} per fold"
    answers = "all their reference answers" if not a else f"up to {a} correct and {a} incorrect answers each"
    return f"{qs}, {answers}"


def gate_sample(items: list[QAItem], questions: int, answers: int, *, seed: int) -> list[QAItem]:
    """The gate measurement's items: a seeded sample of ``questions`` items (0: all), each with a seeded
    sample of at most ``answers`` correct and ``answers`` incorrect reference answers (0: all).

    The teacher-forced forward passes cost in proportion to the reference answers (about eight per
    TruthfulQA question); the rates pool thousands of answer tokens even from the sample.
    """
    import dataclasses

    from otguard.methods.stage3 import sample_questions

    rng = np.random.default_rng(seed)
    picked = sample_questions(items, questions, seed) if questions else list(items)

    def some(refs: tuple[str, ...]) -> tuple[str, ...]:
        if not answers or len(refs) <= answers:
            return tuple(refs)
        return tuple(refs[i] for i in sorted(rng.choice(len(refs), size=answers, replace=False)))

    return [dataclasses.replace(it, correct_answers=some(it.correct_answers),
                                incorrect_answers=some(it.incorrect_answers)) for it in picked]  # fmt: skip


def _truth(value: Any) -> bool:
    """A CSV row's truth verdict (bool, or its text after a round trip through a file)."""
    return value is True or str(value).strip().lower() in ("true", "1", "yes")
