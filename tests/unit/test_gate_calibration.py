"""Gate calibration (otguard.gate_calibration) against an explicit, exact computation of the rule.

The reference computes the conformal-risk-control rule with fractions, threshold by threshold: the loss
of each true answer (share of its positions with votes >= tau, or "any position"), averaged per question
for the question unit, the bound (sum + 1) / (n + 1), and the smallest tau whose bound is <= alpha.
On the tiny model the vote counts come from an independent gate_answers pass, and the calibrated policy
is checked at use: its measured flags are exactly the validation table's row.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from otguard.data import QAItem
from otguard.errors import ConfigError, DataError
from otguard.evaluation.gate import gate_answers, summarize
from otguard.gate_calibration import answer_losses, calibrate_gate, choose_threshold, crc_bound, unit_losses
from otguard.policy import Policy
from tests.unit.test_gate import ITEMS, make
from tests.unit.test_truthfulqa_mc import gpt2_style

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return gpt2_style()


def brute_force(votes, questions, H, alpha, loss="positions", unit="question"):
    """(tau, feasible, bounds) by the rule's definition, in exact arithmetic."""
    alpha = Fraction(str(alpha))
    bounds = []
    for tau in range(H + 2):
        per_answer = []
        for v in votes:
            hits = sum(1 for x in v if x >= tau)
            per_answer.append(Fraction(hits, len(v)) if loss == "positions" else Fraction(int(hits > 0)))
        if unit == "question":
            groups: dict[int, list[Fraction]] = {}
            for q, value in zip(questions, per_answer, strict=True):
                groups.setdefault(q, []).append(value)
            units = [sum(g) / len(g) for g in groups.values()]
        else:
            units = per_answer
        bounds.append((sum(units) + 1) / (len(units) + 1))
    for tau, b in enumerate(bounds):
        if b <= alpha:
            return tau, True, bounds
    return H + 1, False, bounds


def test_hand_made_example():
    """H = 3; one answer per question; votes (0, 1, 3), (2, 2), (0)."""
    votes = [np.array([0, 1, 3]), np.array([2, 2]), np.array([0])]
    losses = unit_losses(answer_losses(votes, 3), [0, 1, 2])
    # tau 0: all flagged; 1: 2/3, 1, 0; 2: 1/3, 1, 0; 3: 1/3, 0, 0; 4: never.
    assert crc_bound(losses) == pytest.approx([1.0, 2 / 3, 7 / 12, 1 / 3, 1 / 4], abs=1e-15)
    assert choose_threshold(losses, 0.35) == (3, True)
    assert choose_threshold(losses, 7 / 12) == (2, True)  # equality meets the bound
    assert choose_threshold(losses, 0.2) == (4, False)  # 1 / (n + 1) = 0.25 > 0.2: off
    answer = answer_losses(votes, 3, "answer")  # any position >= tau
    assert answer.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]


@pytest.mark.parametrize("loss", ["positions", "answer"])
@pytest.mark.parametrize("unit", ["question", "answer"])
def test_rule_equals_brute_force(loss, unit):
    rng = np.random.default_rng(3)
    H = 6
    for trial in range(40):
        n = int(rng.integers(1, 25))
        questions = sorted(rng.integers(0, max(1, n // 2), n).tolist())
        votes = [rng.integers(0, H + 1, int(rng.integers(1, 9))) for _ in range(n)]
        for alpha in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8):
            want_tau, want_ok, want_bounds = brute_force(votes, questions, H, alpha, loss, unit)
            losses = unit_losses(answer_losses(votes, H, loss), questions, unit)
            assert choose_threshold(losses, alpha) == (want_tau, want_ok), (trial, alpha)
            bound = crc_bound(losses)
            assert bound.tolist() == pytest.approx([float(b) for b in want_bounds], abs=1e-12)
            assert np.all(np.diff(bound) <= 1e-15), "the bound is non-increasing in tau"
            assert bound[0] == 1.0 and bound[-1] == pytest.approx(1 / (len(losses) + 1), abs=1e-15)


def one_layer(tok, seed=1):
    model, policy = make("llama", tok, "replace", seed=seed)
    policy.layers = policy.layers[1:]
    return model, policy


def test_calibrated_one_layer_policy(tok, tmp_path):
    model, policy = one_layer(tok)
    H = policy.model.n_heads
    before = {"threshold": policy.layers[0].threshold, "meta": dict(policy.meta)}
    gates = gate_answers(model, tok, policy, ITEMS)
    true = [g for g in gates if not g.false]
    alpha = 0.5  # 3 questions: the bound is >= 1/4
    want_tau, want_ok, want_bounds = brute_force([g.votes.tolist() for g in true], [g.question for g in true],
                                                 H, alpha)  # fmt: skip
    assert want_ok and 0 < want_tau <= H, "the test needs a threshold that flags some positions"
    new, cal = calibrate_gate(policy, model, tok, ITEMS, max_false_flag_rate=alpha, batch_size=4)
    assert new.layers[0].threshold == cal.layers[0].threshold == want_tau
    assert cal.thresholds == {1: want_tau} and cal.previous_thresholds == {1: before["threshold"]}
    assert (cal.n_questions, cal.n_units, cal.n_true_answers, cal.n_false_answers) == (3, 3, 5, 5)
    bounds = [r["bound"] for r in cal.layers[0].table]
    assert bounds == pytest.approx([float(b) for b in want_bounds], abs=1e-12)
    # The input is unchanged; the new policy differs in thresholds and the calibration record only.
    assert policy.layers[0].threshold == before["threshold"] and policy.meta == before["meta"]
    assert new.meta == {**before["meta"], "gate_calibration": cal.to_dict()}
    for key in ("method", "rule", "model", "params", "kappa", "scope"):
        assert getattr(new, key) == getattr(policy, key)
    for a, b in zip(new.layers, policy.layers, strict=True):
        assert a.layer == b.layer
        for name in ("probe_weight", "probe_bias", "head_mask", "b", "A"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y)
    # At use, the calibrated gate flags exactly the table's chosen row.
    measured = summarize(gate_answers(model, tok, new, ITEMS), new)
    row = cal.layers[0].row()
    assert measured.false_flag_rate == row["false_flag_rate"] and measured.catch_rate == row["catch_rate"]
    assert measured.true_answers_flagged == row["true_answers_flagged"]
    assert measured.false_answers_flagged == row["false_answers_flagged"]
    # policy.json accepts it and keeps the record.
    loaded = Policy.load(new.save(tmp_path / "p"))
    assert loaded.layers[0].threshold == want_tau and loaded.meta["gate_calibration"] == cal.to_dict()


def test_answer_loss_and_answer_unit(tok):
    model, policy = one_layer(tok)
    gates = gate_answers(model, tok, policy, ITEMS)
    true = [g for g in gates if not g.false]
    H = policy.model.n_heads
    for loss, unit, alpha in (("answer", "question", 0.8), ("positions", "answer", 0.4)):
        want_tau, want_ok, _ = brute_force([g.votes.tolist() for g in true], [g.question for g in true], H,
                                           alpha, loss, unit)  # fmt: skip
        assert want_ok and 0 < want_tau <= H, "the test needs a threshold that flags some positions"
        new, cal = calibrate_gate(policy, model, tok, ITEMS, max_false_flag_rate=alpha, loss=loss, unit=unit)
        assert (new.layers[0].threshold, cal.layers[0].feasible) == (want_tau, want_ok)
        assert cal.n_units == (5 if unit == "answer" else 3)


def test_two_layers_in_forward_order_with_split_budget(tok):
    """Layer 0 first at alpha / 2; layer 1 on the votes it gets with layer 0's new threshold attached."""
    model, policy = make("llama", tok, "replace")
    H, alpha = policy.model.n_heads, 0.9
    new, cal = calibrate_gate(policy, model, tok, ITEMS, max_false_flag_rate=alpha)
    assert [c.layer for c in cal.layers] == [0, 1] and all(c.alpha == alpha / 2 for c in cal.layers)

    def want(p, k):
        gates = [g for g in gate_answers(model, tok, p, ITEMS) if not g.false]
        return brute_force([g.layer_votes[:, k].tolist() for g in gates], [g.question for g in gates], H,
                           alpha / 2)[0]  # fmt: skip

    tau0 = want(policy, 0)
    assert new.layers[0].threshold == tau0
    layers = [
        dataclasses.replace(e, threshold=tau0 if i == 0 else e.threshold) for i, e in enumerate(policy.layers)
    ]
    step = dataclasses.replace(policy, layers=layers)
    assert new.layers[1].threshold == want(step, 1)
    assert [e.threshold for e in policy.layers] == [2, 2]  # the input is unchanged


def test_infeasible_switches_the_layer_off(tok):
    model, policy = one_layer(tok)
    H = policy.model.n_heads
    new, cal = calibrate_gate(policy, model, tok, ITEMS, max_false_flag_rate=0.2)  # 1/(3+1) > 0.2
    assert (new.layers[0].threshold, cal.layers[0].feasible) == (H + 1, False)
    assert cal.to_dict()["layers"][0]["feasible"] is False
    result = summarize(gate_answers(model, tok, new, ITEMS), new)
    assert (result.false_flag_rate, result.catch_rate) == (0.0, 0.0)


@pytest.mark.parametrize("alpha", [0, 1, 1.0, -0.1, 1.5, math.nan, math.inf, True, "0.3", None])
def test_alpha_out_of_range_is_a_config_error(tok, alpha):
    model, policy = one_layer(tok)
    with pytest.raises(ConfigError, match=r"max_false_flag_rate must be a number in \(0, 1\)") as err:
        calibrate_gate(policy, model, tok, ITEMS, max_false_flag_rate=alpha)
    assert "\n" not in str(err.value)


def test_empty_items_and_bad_options(tok):
    model, policy = one_layer(tok)
    with pytest.raises(DataError, match="validation QAItems"):
        calibrate_gate(policy, model, tok, [], max_false_flag_rate=0.3)
    with pytest.raises(DataError, match="no correct reference answer"):
        calibrate_gate(policy, model, tok, [QAItem("Where?", "", (), ("Nowhere.",))], max_false_flag_rate=0.3)
    with pytest.raises(ConfigError, match="unit"):
        calibrate_gate(policy, model, tok, ITEMS, max_false_flag_rate=0.3, unit="token")  # type: ignore[arg-type]
    ungated = dataclasses.replace(
        policy, layers=[dataclasses.replace(e, threshold=None) for e in policy.layers]
    )
    with pytest.raises(ConfigError, match="no gated layer"):
        calibrate_gate(ungated, model, tok, ITEMS, max_false_flag_rate=0.3)


def test_layer_votes_and_precomputed_records(tok):
    """layer_votes holds each hooked layer's count (summing to votes); records passed in give the same
    calibration as a fresh pass, and records of another policy are refused."""
    model, policy = make("llama", tok, "replace")
    both = gate_answers(model, tok, policy, ITEMS, mode="monitor")
    model1, alone = one_layer(tok, seed=0)  # the same model and layer 1 of the same policy
    only1 = gate_answers(model1, tok, alone, ITEMS, mode="monitor")
    for a, b in zip(both, only1, strict=True):
        assert a.layers == (0, 1) and b.layers == (1,)
        assert torch.equal(a.layer_votes.sum(-1), a.votes)
        assert torch.equal(a.layer_votes[:, 1], b.votes) and torch.equal(b.layer_votes[:, 0], b.votes)
    model, policy = one_layer(tok)
    gates = gate_answers(model, tok, policy, ITEMS)
    fresh, cal = calibrate_gate(policy, model, tok, ITEMS, max_false_flag_rate=0.5)
    reused, cal2 = calibrate_gate(policy, model, tok, ITEMS, max_false_flag_rate=0.5, gates=gates)
    assert cal2.to_dict() == cal.to_dict() and reused.layers[0].threshold == fresh.layers[0].threshold
    with pytest.raises(ConfigError, match="not computed with this policy"):
        calibrate_gate(policy, model, tok, ITEMS, max_false_flag_rate=0.5, gates=both)
