"""The TruthfulQA task computes each (policy, question) output once per run: MC scores and greedy answers
are memoised by the policy's fingerprint, so the frontier reuses the test pass and the unsteered answers
serve every method. Checked against the calls a stand-in scorer and generator receive."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

import otguard.evaluation.truthfulqa_gen as gen_module
import otguard.evaluation.truthfulqa_mc as mc_module
from otguard.data.qa import QAItem
from otguard.evaluation.truthfulqa_mc import score_mc
from otguard.harness.truthfulqa import TruthfulQATask
from otguard.harness.truthfulqa_sweep import policy_key
from tests.unit.test_policy import random_policy, tiny_llama


def _item(k: int) -> QAItem:
    mc1 = ((f"right {k}", 1), (f"wrong {k}", 0))
    mc2 = ((f"right {k}", 1), (f"also right {k}", 1), (f"wrong {k}", 0))
    return QAItem(f"question {k}?", f"right {k}", (f"right {k}",), (f"wrong {k}",), None, mc1, mc2)


ITEMS = [_item(k) for k in range(6)]


def _task() -> TruthfulQATask:
    task = object.__new__(TruthfulQATask)  # the memo needs none of the data or judges
    task.config = SimpleNamespace(mc_batch_size=4, batch_size=4, max_new_tokens=5)
    task._model, task._tokenizer, task.progress = object(), object(), False
    task._mc_memo, task._answer_memo, task._mc_cache = {}, {}, {}
    return task


@pytest.fixture(scope="module")
def policies() -> dict[str, Any]:
    model = tiny_llama(0)
    return {"none": None, "a": random_policy(model, seed=0), "b": random_policy(model, seed=1)}


def test_mc_is_scored_once_per_policy_and_question(monkeypatch, policies) -> None:
    calls: list[tuple[list[str], list[str]]] = []

    def fake_many(model, tokenizer, items, named, **kw):  # a score that depends on policy and answer
        calls.append(([it.question for it in items], sorted(named)))
        return {
            name: mc_module.MCResult.from_scores(
                items, [{a: -float(len(a) + len(name) % 7) for a in mc_module.mc_answers(it)} for it in items]
            )
            for name in named
        }

    monkeypatch.setattr(mc_module, "score_mc_many", fake_many)
    task = _task()
    test = task._score_many(ITEMS, {"none": None, "a": policies["a"]})  # the test pass
    a_copy = random_policy(tiny_llama(0), seed=0)  # another object with the same content
    front = task._score_many(ITEMS[:3], {"a": a_copy, "b": policies["b"], "ref": None})  # the frontier
    keys = {k: policy_key(p) for k, p in policies.items()}
    assert calls == [
        ([it.question for it in ITEMS], sorted([keys["none"], keys["a"]])),
        ([it.question for it in ITEMS[:3]], [keys["b"]]),
    ]  # only b is new
    for k in ("none", "a"):  # the memoised figures are the test pass's, question by question
        assert front[keys[k]].mc2_per_question == test[keys[k]].mc2_per_question[:3]
        assert front[keys[k]].mc1_scores == test[keys[k]].mc1_scores[:3]
    assert set(front) == {keys["a"], keys["b"], keys["none"]}


def test_answers_are_generated_once_per_policy_and_question(monkeypatch, policies) -> None:
    calls: list[tuple[list[str], str]] = []

    def fake_generate(model, tokenizer, questions, policy=None, **kw):
        calls.append((list(questions), policy_key(policy)))
        return [f"{q} / {policy_key(policy)[:6]}" for q in questions], None

    monkeypatch.setattr(gen_module, "generate_answers", fake_generate)
    task = _task()
    first = task._answers(ITEMS[:2], None)
    both = task._answers(ITEMS[:4], None)
    steered = task._answers(ITEMS[1:3], policies["a"])
    assert both[:2] == first and steered[0] != both[1]
    assert calls == [
        ([ITEMS[0].question, ITEMS[1].question], "none"),
        ([ITEMS[2].question, ITEMS[3].question], "none"),
        ([ITEMS[1].question, ITEMS[2].question], policy_key(policies["a"])),
    ]
    assert task._answers(ITEMS[:4], None) == both and len(calls) == 3  # all from the memo


def test_the_memo_equals_scoring_alone() -> None:
    """On a real tiny model: the test pass and the memoised frontier both equal score_mc per policy."""
    from tests.tiny_models import tiny_lm
    from tests.unit.test_truthfulqa_mc import ITEMS as MC_ITEMS
    from tests.unit.test_truthfulqa_mc import always_on_policy, assert_same, llama2_style

    tok = llama2_style()
    model = tiny_lm("llama", len(tok), tok.pad_token_id)
    policy = always_on_policy(model)
    task = _task()
    task.bind(model, tok)
    test = task._score_many(MC_ITEMS, {"none": None, "p": policy})
    front = task._score_many(MC_ITEMS[1:], {"p": policy})
    for p in (None, policy):
        alone = score_mc(model, tok, MC_ITEMS, policy=p, batch_size=4, progress=False)
        assert_same(test[policy_key(p)], alone)
    assert_same(front[policy_key(policy)], score_mc(model, tok, MC_ITEMS[1:], policy=policy, progress=False))
    assert front[policy_key(policy)].info["memoised"] is True
