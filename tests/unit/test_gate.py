"""The gate at the point of use (otguard.evaluation.gate) against an explicit per-answer computation.

The explicit computation runs each reference answer alone, as one full sequence (no prefix cache,
no batch, no padding), through the reference hook (tests/reference/explicit_policy.py: one row,
position, layer and head at a time, float64) with the **generation** scope and the prompt length set
to the answer's first token: its log gives, at every answer position, the layer votes, the flags, the
edited heads and the edited heads whose probe logit after the edit (and after the full map) is < 0.
The batched, prefix-cached measurement must give the same per-position flags, vote counts and head
counts, and the rates computed from them by hand. Tiny random Llama / GPT-2 with a byte-level BPE
tokenizer trained offline on the prompt text (the MC tests' builder).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from otguard.data import QAItem
from otguard.errors import DataError
from otguard.evaluation.gate import auroc, bank_figures, gate_answers, measure_gate, nominal_level, summarize
from otguard.evaluation.truthfulqa_mc import answer_span
from otguard.policy import Policy
from otguard.prompts import qa_prompt
from otguard.sites import find_head_sites
from tests.reference.explicit_policy import ExplicitPolicy
from tests.tiny_models import tiny_lm
from tests.unit.test_policy import random_policy
from tests.unit.test_truthfulqa_mc import gpt2_style

torch.set_num_threads(1)

ITEMS = [
    QAItem("Where is Paris?", "Paris is in France.", ("Paris is in France.", "In France."),
           ("Paris is in Spain.", "Paris is on the moon, hello hello.")),
    QAItem("Is the sky blue?", "The sky is blue.", ("The sky is blue.",),
           ("No.", "The sky is green and 1992.")),
    QAItem("What is 1 + 1?", "It is 2.", ("It is 2.", "2"), ("It is 3.",)),
]  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return gpt2_style()


def make(kind: str, tok, rule: str, seed: int = 0) -> tuple[torch.nn.Module, Policy]:
    """A random two-layer policy whose probe logits are centred on the answers' own activations."""
    model = tiny_lm(kind, len(tok), tok.pad_token_id, seed=seed)
    policy = random_policy(model, rule=rule, thresholds=(2, 2), layers=(0, 1), scope="generation", seed=seed)
    sites = find_head_sites(model)
    acts: dict[int, list[torch.Tensor]] = {e.layer: [] for e in policy.layers}
    hooks = [sites.modules[layer].register_forward_pre_hook(
        lambda mod, args, layer=layer: acts[layer].append(args[0][0, -12:].reshape(12, sites.n_heads, -1)))
        for layer in acts]  # fmt: skip
    with torch.no_grad():
        for item in ITEMS:
            ids, _ = answer_span(tok, qa_prompt(item.question), " " + item.incorrect_answers[-1])
            model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    for edit in policy.layers:
        a = torch.cat(acts[edit.layer]).double()
        logits = torch.einsum("nhd,hd->nh", a, edit.probe_weight.double()) + edit.probe_bias.double()
        edit.probe_bias = (edit.probe_bias.double() - logits.mean(0)).float()  # no sample exactly at 0
    return model, policy


def explicit_gates(model, tok, policy, items, mode: str) -> list[dict]:
    """Each answer alone, through the reference hook in the generation scope."""
    out = []
    L = len(policy.layers)
    for q, item in enumerate(items):
        context = qa_prompt(item.question)
        for answers, false in ((item.correct_answers, False), (item.incorrect_answers, True)):
            for answer in answers:
                ids, start = answer_span(tok, context, " " + answer)
                with ExplicitPolicy(policy, model, scope="generation", mode=mode) as ref:
                    ref.set_prompt_length(start)  # in scope: positions >= start - 1
                    with torch.no_grad():
                        model(input_ids=torch.tensor([ids]))
                log = ref.log
                keys = sorted({k[2] for k in log})
                assert keys == list(range(start - 1, len(ids)))

                def column(name: str, positions: list[int], log=log) -> list[int]:
                    return [sum(log[(0, 0, p, layer)][name] for layer in range(L)) for p in positions]

                answer_pos = keys[1:]
                flags = [any(log[(0, 0, p, layer)]["flagged"] for layer in range(L)) for p in keys]
                out.append({
                    "question": q, "false": false, "positions": answer_pos, "flagged": flags[1:],
                    "votes": column("votes", answer_pos), "edited": column("edited", answer_pos),
                    "desirable": column("desirable", answer_pos),
                    "mapped_desirable": column("mapped_desirable", answer_pos),
                    "prompt_flagged": flags[0], "prompt_votes": column("votes", keys[:1])[0],
                })  # fmt: skip
    return out


@pytest.mark.parametrize("mode", ["repair", "monitor"])
@pytest.mark.parametrize(("kind", "rule"), [("llama", "replace"), ("llama", "kappa-p"), ("gpt2", "kappa-p")])
def test_gate_matches_explicit_per_position(tok, kind, rule, mode):
    model, policy = make(kind, tok, rule)
    want = explicit_gates(model, tok, policy, ITEMS, mode)
    got = gate_answers(model, tok, policy, ITEMS, mode=mode, batch_size=4)
    assert len(got) == len(want) == 10
    for g, w in zip(got, want, strict=True):
        assert (g.question, g.false) == (w["question"], w["false"])
        assert g.positions.tolist() == w["positions"]
        assert g.flagged.tolist() == w["flagged"]
        assert g.votes.tolist() == w["votes"]
        assert g.edited.tolist() == w["edited"]
        assert g.desirable.tolist() == w["desirable"]
        assert g.mapped_desirable.tolist() == w["mapped_desirable"]
        assert (g.prompt_flagged, g.prompt_votes) == (w["prompt_flagged"], w["prompt_votes"])
    flags = [f for w in want for f in w["flagged"]]
    assert any(flags) and not all(flags), "both branches of the gate must be exercised"
    assert 0 < sum(sum(w["desirable"]) for w in want) < sum(sum(w["edited"]) for w in want)

    # The rates, by hand from the explicit record.
    result = summarize(got, policy, mode=mode)
    true = [w for w in want if not w["false"]]
    false = [w for w in want if w["false"]]
    t_flags = [f for w in true for f in w["flagged"]]
    f_flags = [f for w in false for f in w["flagged"]]
    assert result.false_flag_rate == sum(t_flags) / len(t_flags)
    assert result.catch_rate == sum(f_flags) / len(f_flags)
    assert (result.n_true_positions, result.n_false_positions) == (len(t_flags), len(f_flags))
    pairs = [(fv, tv) for w in false for fv in w["votes"] for x in true for tv in x["votes"]]
    assert result.gate_auroc == pytest.approx(
        sum(1.0 if fv > tv else 0.5 if fv == tv else 0.0 for fv, tv in pairs) / len(pairs), abs=1e-12
    )
    assert result.true_answers_flagged == sum(any(w["flagged"]) for w in true) / len(true)
    assert result.false_answers_flagged == sum(any(w["flagged"]) for w in false) / len(false)
    edited = sum(sum(w["edited"]) for w in want)
    assert result.edited_heads == edited
    assert result.guarantee_share == sum(sum(w["desirable"]) for w in want) / edited
    assert result.mapped_share == sum(sum(w["mapped_desirable"]) for w in want) / edited
    prompt = {}
    for w in want:
        prompt[w["question"]] = prompt.get(w["question"], False) or w["prompt_flagged"]
    assert result.prompt_flag_rate == sum(prompt.values()) / len(ITEMS)
    if rule == "replace":  # the edit is the full map
        assert result.guarantee_share == result.mapped_share


def test_fallback_without_shared_cache_matches_explicit(tok, monkeypatch):
    """Answers whose prompt tokens cannot share a cache run whole: same records."""
    import otguard.evaluation.gate as gate

    model, policy = make("llama", tok, "kappa-p", seed=2)
    shared = gate_answers(model, tok, policy, ITEMS)
    monkeypatch.setattr(gate, "_question_context", lambda rows, prefix_ids: None)
    alone = gate_answers(model, tok, policy, ITEMS, batch_size=3)
    want = explicit_gates(model, tok, policy, ITEMS, "repair")
    for a, b, w in zip(shared, alone, want, strict=True):
        for g in (a, b):
            assert g.flagged.tolist() == w["flagged"] and g.votes.tolist() == w["votes"]
            assert g.desirable.tolist() == w["desirable"] and g.prompt_votes == w["prompt_votes"]
    assert any(f for w in want for f in w["flagged"])


def test_batch_size_and_measure_gate(tok):
    model, policy = make("llama", tok, "replace", seed=1)
    one = gate_answers(model, tok, policy, ITEMS, batch_size=1)
    many = gate_answers(model, tok, policy, ITEMS, batch_size=32)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a.flagged, b.flagged) and torch.equal(a.votes, b.votes)
    result = measure_gate(model, tok, policy, ITEMS, batch_size=32)
    assert result.to_dict() == summarize(many, policy).to_dict()
    assert result.n_questions == 3 and result.n_true_answers == 5 and result.n_false_answers == 5


def test_monitor_and_repair_records(tok):
    """An edit at layer l reaches only later layers, so a one-layer policy's teacher-forced record is
    the same in both modes; with two layers, repair's edits at layer 0 change what layer 1 sees."""
    model, policy = make("llama", tok, "replace")
    rep = gate_answers(model, tok, policy, ITEMS, mode="repair")
    mon = gate_answers(model, tok, policy, ITEMS, mode="monitor")
    assert any(not torch.equal(a.votes, b.votes) for a, b in zip(rep, mon, strict=True))
    policy.layers = policy.layers[1:]
    rep = gate_answers(model, tok, policy, ITEMS, mode="repair")
    mon = gate_answers(model, tok, policy, ITEMS, mode="monitor")
    for a, b in zip(rep, mon, strict=True):
        for key in ("flagged", "votes", "edited", "desirable", "mapped_desirable"):
            assert torch.equal(getattr(a, key), getattr(b, key))
    assert any(bool(g.flagged.any()) for g in rep)


def test_auroc_hand_made():
    assert auroc([3, 2, 2], [1, 2]) == pytest.approx(5 / 6)  # 2 + 1 + 1/2 + 1 + 1/2 of 6 pairs
    assert auroc([1, 1], [1]) == 0.5
    assert auroc([0], [5, 6]) == 0.0
    assert math.isnan(auroc([], [1.0]))
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 6, 40), rng.integers(0, 6, 30)
    want = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])
    assert auroc(pos, neg) == pytest.approx(want, abs=1e-12)


def test_nominal_level_and_bank_figures(tok):
    model = tiny_lm("llama", len(tok), tok.pad_token_id)
    policy = random_policy(model, layers=(0,), thresholds=(2,), with_A=(True,))
    assert nominal_level(policy) is None
    slim = Policy(**{**policy.__dict__, "params": {"gamma": 0.1}, "meta": {}})
    assert nominal_level(slim) == pytest.approx(0.9, abs=1e-15)
    slim.meta["alpha_multiplier"] = NormalDist().inv_cdf(0.9)
    assert nominal_level(slim) == pytest.approx(0.9, abs=1e-12)
    radiant = Policy(**{**policy.__dict__, "params": {"margin": 1.5}, "meta": {}})
    assert nominal_level(radiant) == NormalDist().cdf(1.5)
    radiant.meta.update({"layer": 1, "detector_val": {"fpr": [0.5, 0.2], "fnr": [0.1, 0.3]},
                         "guarantee_rate_val": [0.5, None, 1.0]})  # fmt: skip
    assert bank_figures(radiant) == {"false_flag_rate": 0.2, "catch_rate": 0.7, "layer": 1,
                                     "guarantee_rate_val_mean": 0.75,
                                     "guarantee_rate_val": [0.5, None, 1.0]}  # fmt: skip
    assert bank_figures(policy) == {}


def test_no_answers_is_a_data_error(tok):
    model, policy = make("llama", tok, "replace")
    with pytest.raises(DataError, match="truthfulqa_items"):
        gate_answers(model, tok, policy, [QAItem("Where?", "", (), ())])
