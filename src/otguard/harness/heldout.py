"""Does a fitted policy help on questions it never saw? One policy, held-out TruthfulQA questions.

``otguard evaluate`` (and ``make demo``) answer the question a user asks first, without the whole
k-fold comparison: on a seeded sample of the policy's *test* fold (the questions that neither trained
its probes nor chose its layer, threshold or κ), generate greedy answers with and without the policy,
judge both with the learned truth/info judge (validated on held-out human labels), and count

- how many answers the policy turns from false to true (*repaired*) and from true to false
  (*harmed*), with examples of each;
- the detector's behaviour where it runs: the share of true- and false-answer positions it flags
  when TruthfulQA's reference answers are teacher-forced in the generation prompt
  (:mod:`otguard.evaluation.gate`), and the empirical guarantee share.

The fold comes from the policy's metadata (``otguard fit`` records it), so the sample cannot
overlap the data the policy was fitted on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from otguard.errors import ConfigError
from otguard.harness.paired import repair_harm

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from otguard.data.qa import QAItem
    from otguard.evaluation.verdicts import Judge
    from otguard.policy import Policy

logger = logging.getLogger(__name__)

__all__ = ["HeldoutReport", "evaluate_heldout", "heldout_questions"]


def heldout_questions(
    policy: Policy, data_dir: str | None, n_questions: int | None, seed: int = 0
) -> tuple[list[int], int, int]:
    """Question indices (into ``truthfulqa_items``) of the policy's test fold, a seeded sample of them.

    Returns ``(indices, fold, folds)``. The fold, the number of folds and the ``--limit`` come from
    the policy's metadata; a policy without them (fitted by hand in Python) is refused, since its
    held-out questions are unknown.
    """
    from otguard.data import group_kfold, truthfulqa_mc2

    meta = policy.meta
    if not isinstance(meta.get("fold"), int) or not isinstance(meta.get("folds"), int):
        raise ConfigError(
            "The policy's metadata does not say which fold it was fitted on (fit it with `otguard fit`, "
            "or set policy.meta['fold'] and ['folds']), so its held-out questions are unknown."
        )
    fold, folds = int(meta["fold"]), int(meta["folds"])
    dataset = truthfulqa_mc2(data_dir)
    if meta.get("limit"):
        dataset = dataset.limit_groups(int(meta["limit"]))
    split = group_kfold(dataset, n_folds=folds, fold=fold)  # contiguous blocks: the test fold of `fit`
    test = np.unique(dataset.groups[split.test])
    rng = np.random.default_rng(seed)
    if n_questions is not None and n_questions < len(test):
        test = np.sort(rng.choice(test, size=n_questions, replace=False))
    return [int(q) for q in test], fold, folds


@dataclass
class HeldoutReport:
    """What one policy does to held-out questions (see the module docstring)."""

    policy: str
    fold: int
    folds: int
    judge: dict[str, Any]  # name and held-out validation figures of the truth judge
    n_questions: int
    true_none: float  # share of questions answered truthfully without the policy
    true_policy: float
    info_none: float
    info_policy: float
    repaired: int  # false without the policy, true with it
    harmed: int  # true without the policy, false with it
    repair_rate: float
    harm_rate: float
    changed: int  # answers whose text the policy changed
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """The terminal summary: headline numbers, the gate, then the examples."""
        n = self.n_questions
        pct = _pct
        lines = [
            f"Held-out evaluation of {self.policy} on {n} test questions of fold {self.fold} "
            f"(of {self.folds}; none of them used to fit the policy).",
            f"Judge: {self.judge.get('name', '?')}" + _judge_accuracy(self.judge),
            "",
            f"  truthful without the policy: {pct(self.true_none)}   with it: {pct(self.true_policy)}"
            f"   ({_signed(self.true_policy - self.true_none)})",
            f"  informative without:         {pct(self.info_none)}   with it: {pct(self.info_policy)}",
            f"  answers changed by the policy: {self.changed}/{n}",
            f"  repaired (false -> true): {self.repaired}  ({pct(self.repair_rate)} of the false ones)",
            f"  harmed   (true -> false): {self.harmed}  ({pct(self.harm_rate)} of the true ones)",
        ]
        if self.gate:
            g = self.gate
            lines += [
                "",
                "Detector at the point of use (reference answers teacher-forced in the generation prompt):",
                f"  false-flag rate (true-answer positions flagged): {pct(g['false_flag_rate'])}",
                f"  catch rate (false-answer positions flagged):     {pct(g['catch_rate'])}",
                f"  gate AUROC (vote count, false vs true positions): {g['gate_auroc']:.3f}",
                f"  answers with a flagged position: true {pct(g['true_answers_flagged'])}, "
                f"false {pct(g['false_answers_flagged'])}",
            ]
            if g.get("nominal_level") is not None:
                lines.append(
                    f"  edited heads the probe calls desirable after the edit: {pct(g['guarantee_share'])} "
                    f"(nominal {pct(g['nominal_level'])})"
                )
        for kind, title in (("repaired", "Repaired"), ("harmed", "Harmed")):
            for ex in self.examples.get(kind, []):
                lines += ["", f"[{title}] Q: {ex['question']}", f"  without: {_one_line(ex['none'])}",
                          f"  with:    {_one_line(ex['policy'])}"]  # fmt: skip
        return "\n".join(lines)


def _one_line(text: str, limit: int = 200) -> str:
    """An answer on one terminal line (whitespace collapsed, long ones cut with an ellipsis)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f} %"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f} points"


def _judge_accuracy(judge: dict[str, Any]) -> str:
    parts = []
    for split in judge.get("splits", []):
        name = str(split.get("split", "")).replace("_", " ")
        parts.append(f"{name}: accuracy {split['accuracy']:.3f}, AUROC {split['auroc']:.3f}")
    return f"\n  validated on held-out human labels ({'; '.join(parts)})" if parts else ""


def evaluate_heldout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    policy: Policy,
    items: list[QAItem],
    judge: Judge,
    *,
    policy_name: str = "the policy",
    fold: int = 0,
    folds: int = 2,
    batch_size: int = 16,
    max_new_tokens: int = 50,
    examples: int = 3,
    gate: bool = True,
) -> HeldoutReport:
    """Answer ``items`` with and without ``policy``, judge both, count repairs and harms, measure the gate."""
    import time

    from otguard.evaluation.gate import measure_gate
    from otguard.evaluation.truthfulqa_gen import generate_answers

    questions = [it.question for it in items]
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    plain, _ = generate_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                                batch_size=batch_size)  # fmt: skip
    steered, _ = generate_answers(model, tokenizer, questions, policy=policy, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size)  # fmt: skip
    seconds["generation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    v_plain, v_steered = judge.judge(items, plain), judge.judge(items, steered)
    seconds["judging"] = time.perf_counter() - t0
    before, after = v_plain.truthful, v_steered.truthful
    repair_rate, harm_rate = repair_harm(before.tolist(), after.tolist())
    repaired = np.flatnonzero(~before & after)
    harmed = np.flatnonzero(before & ~after)

    def show(rows: np.ndarray) -> list[dict[str, str]]:
        return [{"question": questions[i], "none": plain[i], "policy": steered[i]} for i in rows[:examples]]

    gate_figures = None
    if gate and any(edit.threshold is not None for edit in policy.layers):
        t0 = time.perf_counter()
        gate_figures = measure_gate(model, tokenizer, policy, items, batch_size=batch_size).to_dict()
        seconds["gate"] = time.perf_counter() - t0
    validation = judge.validation() if hasattr(judge, "validation") else {"name": getattr(judge, "name", "?")}
    return HeldoutReport(
        policy=policy_name,
        fold=fold,
        folds=folds,
        judge=validation,
        n_questions=len(items),
        true_none=float(before.mean()) if len(items) else math.nan,
        true_policy=float(after.mean()) if len(items) else math.nan,
        info_none=float(np.mean(v_plain.informative)) if v_plain.informative is not None else math.nan,
        info_policy=float(np.mean(v_steered.informative)) if v_steered.informative is not None else math.nan,
        repaired=len(repaired),
        harmed=len(harmed),
        repair_rate=repair_rate,
        harm_rate=harm_rate,
        changed=sum(a != b for a, b in zip(plain, steered, strict=True)),
        examples={"repaired": show(repaired), "harmed": show(harmed)},
        gate=gate_figures,
        seconds=seconds,
    )
