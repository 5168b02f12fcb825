"""``otguard evaluate``: held-out questions only, and repairs/harms counted from the two answer sets."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
import torch

from otguard.data import group_kfold, truthfulqa_mc2
from otguard.data.qa import QAItem
from otguard.errors import ConfigError
from otguard.evaluation.truthfulqa_gen import generate_answers
from otguard.evaluation.verdicts import JudgeResult
from otguard.harness.heldout import evaluate_heldout, heldout_questions
from tests.tiny_models import tiny_lm
from tests.unit.test_truthfulqa_gen import QUESTIONS
from tests.unit.test_truthfulqa_mc import always_on_policy, llama2_style

torch.set_num_threads(1)


class ParityJudge:
    """Truthful iff the CRC of the answer is even: arbitrary but fixed, so counts can be recomputed."""

    name = "parity"

    def judge(self, items, answers) -> JudgeResult:
        truthful = np.array([zlib.crc32(a.encode()) % 2 == 0 for a in answers])
        return JudgeResult(self.name, truthful, np.ones(len(answers), dtype=bool))

    def validation(self) -> dict:
        return {"name": self.name, "splits": []}


def _items() -> list[QAItem]:
    return [QAItem(q, "yes", ("yes",), ("no",)) for q in QUESTIONS]


def test_repairs_and_harms_are_counted_from_the_two_answer_sets() -> None:
    tok = llama2_style()
    model = tiny_lm("llama", len(tok), tok.pad_token_id).double()
    policy = always_on_policy(model)
    policy = dataclasses.replace(policy, scope="generation")
    items = _items()
    report = evaluate_heldout(model, tok, policy, items, ParityJudge(), batch_size=4, max_new_tokens=8,
                              gate=False)  # fmt: skip
    plain, _ = generate_answers(model, tok, QUESTIONS, max_new_tokens=8, batch_size=4, progress=False)
    steered, _ = generate_answers(model, tok, QUESTIONS, policy=policy, max_new_tokens=8, batch_size=4,
                                  progress=False)  # fmt: skip
    before = ParityJudge().judge(items, plain).truthful
    after = ParityJudge().judge(items, steered).truthful
    assert report.changed == sum(a != b for a, b in zip(plain, steered, strict=True)) > 0
    assert report.repaired == int((~before & after).sum())
    assert report.harmed == int((before & ~after).sum())
    assert report.true_none == pytest.approx(before.mean())
    assert report.true_policy == pytest.approx(after.mean())
    if (~before).any():
        assert report.repair_rate == pytest.approx((~before & after).sum() / (~before).sum())
    assert [e["question"] for e in report.examples["repaired"]] == [
        QUESTIONS[i] for i in np.flatnonzero(~before & after)[:3]
    ]
    assert report.gate is None
    text = report.render()
    assert f"repaired (false -> true): {report.repaired}" in text


def test_heldout_questions_come_from_the_policy_test_fold_only(data_dir) -> None:
    tok = llama2_style()
    policy = always_on_policy(tiny_lm("llama", len(tok), tok.pad_token_id))
    policy.meta.update({"fold": 1, "folds": 2, "limit": 60})
    dataset = truthfulqa_mc2(data_dir).limit_groups(60)
    split = group_kfold(dataset, n_folds=2, fold=1)
    fitted_on = set(np.unique(dataset.groups[np.concatenate([split.train, split.val])]).tolist())
    everything, fold, folds = heldout_questions(policy, str(data_dir), None)
    assert (fold, folds) == (1, 2)
    assert everything == list(range(30, 60))  # the second contiguous block of 60 questions
    assert not fitted_on & set(everything)
    sample, _, _ = heldout_questions(policy, str(data_dir), 10, seed=3)
    assert len(sample) == 10 and set(sample) <= set(everything) and sample == sorted(sample)
    assert heldout_questions(policy, str(data_dir), 10, seed=3)[0] == sample  # seeded
    assert heldout_questions(policy, str(data_dir), 10, seed=4)[0] != sample


def test_a_policy_without_its_fold_is_refused(data_dir) -> None:
    tok = llama2_style()
    policy = always_on_policy(tiny_lm("llama", len(tok), tok.pad_token_id))
    with pytest.raises(ConfigError, match="which fold"):
        heldout_questions(policy, str(data_dir), 10)
