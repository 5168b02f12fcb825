"""The gate at the point of use on the packaged SmolLM2-135M: a RADIANT policy fitted on fold 0,
30 held-out TruthfulQA questions, their reference answers teacher-forced in the generation prompt.

The policy is fitted on the first 200 questions (fold 0 of 2: the first 100 are the test fold, the
other 100 the training pool, 80 train / 20 validation), so that the activation bank of the training
pool (736 texts) is collected in a few minutes on a CPU the first time and read from the otguard
cache afterwards. Prints the figures (run with ``-s``); checks the per-position record of the first
two questions against the explicit reference hook (generation scope, whole sequences, float64).
"""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch

from otguard.activations import collect
from otguard.data import group_kfold, load_dataset, truthfulqa_items
from otguard.evaluation.gate import gate_answers, summarize
from otguard.evaluation.truthfulqa_mc import answer_span
from otguard.methods import get_method
from otguard.prompts import qa_prompt
from tests.reference.explicit_policy import ExplicitPolicy

pytestmark = pytest.mark.slow

N_GROUPS, N_QUESTIONS = 200, 30


@pytest.fixture(scope="module")
def fitted(smollm2, data_dir: Path):
    model, tok = smollm2
    ds = load_dataset("truthfulqa", data_dir=data_dir).limit_groups(N_GROUPS)
    split = group_kfold(ds, n_folds=2, fold=0, val_ratio=0.2, seed=42)
    pool = np.sort(np.concatenate([split.train, split.val]))
    acts = collect(model, tok, ds.subset(pool), cache=True, progress=False)
    where = {int(i): k for k, i in enumerate(pool)}
    train = np.array([where[int(i)] for i in split.train])
    val = np.array([where[int(i)] for i in split.val])
    policy = get_method("radiant", progress=False).fit(acts, train, val).policy_
    items = truthfulqa_items(data_dir)
    test_groups = np.unique(ds.groups[split.test])
    assert not set(test_groups) & set(np.unique(ds.groups[pool]))
    chosen = sorted(np.random.default_rng(0).choice(test_groups, N_QUESTIONS, replace=False).tolist())
    return policy, [items[g] for g in chosen]


def test_gate_on_held_out_questions(smollm2, fitted) -> None:
    model, tok = smollm2
    policy, items = fitted
    gates = gate_answers(model, tok, policy, items)
    result = summarize(gates, policy)
    print(f"\n{policy.summary()}")
    keys = ("false_flag_rate", "catch_rate", "gate_auroc", "true_answers_flagged", "false_answers_flagged",
            "prompt_flag_rate", "guarantee_share", "mapped_share", "nominal_level", "edited_heads",
            "n_true_positions", "n_false_positions")  # fmt: skip
    for key in keys:
        print(f"{key}: {getattr(result, key)}")
    print(f"bank (validation, last token of bank texts): {result.bank}")

    # Every reference answer of the 30 questions, every one of its tokens.
    n_answers = sum(len(it.correct_answers) + len(it.incorrect_answers) for it in items)
    assert len(gates) == n_answers and result.n_questions == N_QUESTIONS
    n_true = sum(len(answer_span(tok, qa_prompt(it.question), " " + a)[0])
                 - answer_span(tok, qa_prompt(it.question), " " + a)[1]
                 for it in items for a in it.correct_answers)  # fmt: skip
    assert result.n_true_positions == n_true
    assert result.nominal_level == NormalDist().cdf(15.0)
    assert result.bank["layer"] == policy.layers[0].layer

    # The first two questions against the explicit reference hook.
    checked = flagged = 0
    for gate in gates:
        if gate.question > 1:
            continue
        ids, start = answer_span(tok, qa_prompt(items[gate.question].question), " " + gate.answer)
        with ExplicitPolicy(policy, model, scope="generation") as ref, torch.no_grad():
            ref.set_prompt_length(start)
            model(input_ids=torch.tensor([ids]))
        layer = 0
        want = [ref.log[(0, 0, p, layer)] for p in range(start, len(ids))]
        assert gate.votes.tolist() == [w["votes"] for w in want]
        assert gate.flagged.tolist() == [bool(w["flagged"]) for w in want]
        assert gate.desirable.tolist() == [w["desirable"] for w in want]
        assert gate.prompt_votes == ref.log[(0, 0, start - 1, layer)]["votes"]
        checked += len(want)
        flagged += sum(w["flagged"] for w in want)
    assert checked > 20 and flagged > 0
