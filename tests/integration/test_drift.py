"""CE/KL side effects on natural text, with the real SmolLM2 tokenizer and model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from otguard.evaluation.drift import load_documents, measure_drift, measure_drift_many, sample_documents
from otguard.policy import LayerEdit, Policy
from otguard.sites import model_identity

pytestmark = pytest.mark.slow

DOCS = [
    "The river flooded the valley after three days of rain, and the villagers moved to higher ground.",
    "Photosynthesis converts light energy into chemical energy stored in sugars.",
    "A short one.",
]


def shift_policy(model, strength: float) -> Policy:
    ident = model_identity(model)
    H, d = ident.n_heads, ident.head_dim
    g = torch.Generator().manual_seed(0)
    edit = LayerEdit(
        layer=3,
        probe_weight=torch.zeros(H, d),
        probe_bias=torch.zeros(H),
        threshold=None,
        head_mask=torch.ones(H, dtype=torch.bool),
        b=strength * torch.randn(H, d, generator=g),
    )
    return Policy("test", "shift", [edit], ident)


def test_no_policy_has_zero_kl_and_equal_ce(smollm2) -> None:
    model, tok = smollm2
    res = measure_drift(model, tok, DOCS, None, max_tokens=32)
    assert res.kl == 0.0 and res.ce == res.ce_original
    assert 0 < res.ce < 20 and res.n_docs == 3


def test_kl_matches_direct_computation_and_grows_with_strength(smollm2) -> None:
    model, tok = smollm2
    weak = measure_drift(model, tok, DOCS[:1], shift_policy(model, 0.5), max_tokens=32)
    strong = measure_drift(model, tok, DOCS[:1], shift_policy(model, 5.0), max_tokens=32)
    assert 0 < weak.kl < strong.kl
    assert strong.flag_rate == 1.0
    # Direct computation for one document, batch 1, no padding.
    ids = tok(DOCS[0], return_tensors="pt", truncation=True, max_length=32)["input_ids"]
    with torch.no_grad():
        lo = F.log_softmax(model(ids).logits.float(), -1)
        with shift_policy(model, 5.0).attach(model, scope="all"):
            ls = F.log_softmax(model(ids).logits.float(), -1)
    kl = (lo.exp() * (lo - ls)).sum(-1).mean()
    assert abs(float(kl) - strong.kl) < 1e-4


def test_batching_does_not_change_results(smollm2) -> None:
    model, tok = smollm2
    policy = shift_policy(model, 2.0)
    a = measure_drift(model, tok, DOCS, policy, max_tokens=32, batch_size=1)
    b = measure_drift(model, tok, DOCS, policy, max_tokens=32, batch_size=3)
    assert abs(a.kl - b.kl) < 1e-4 and abs(a.ce - b.ce) < 1e-4


def test_many_policies_share_the_original_forward_with_the_same_results(smollm2) -> None:
    model, tok = smollm2
    policies = {"none": None, "weak": shift_policy(model, 0.5), "strong": shift_policy(model, 3.0)}
    many = measure_drift_many(model, tok, DOCS, policies, max_tokens=32, batch_size=2)
    for name, policy in policies.items():
        one = measure_drift(model, tok, DOCS, policy, max_tokens=32, batch_size=2)
        a, b = many[name].to_dict(), one.to_dict()
        for key in a:
            assert (a[key] is None) == (b[key] is None), (name, key)
            if a[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (name, key)
    assert many["none"].kl == 0.0 < many["weak"].kl < many["strong"].kl


def test_text_sources(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("doc one\n\ndoc two\n\n\ndoc three")
    (tmp_path / "b.jsonl").write_text('{"text": "doc four"}\n{"document": "doc five"}\n')
    docs = load_documents(str(tmp_path))
    assert docs == ["doc one", "doc two", "doc three", "doc four", "doc five"]
    assert sample_documents(docs, 3, seed=1) == sample_documents(docs, 3, seed=1)
    with pytest.raises(FileNotFoundError):
        load_documents(str(tmp_path / "missing.txt"))
