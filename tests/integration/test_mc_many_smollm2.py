"""Many policies in one MC pass on the packaged SmolLM2-135M: equal to scoring each policy alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from otguard.data import truthfulqa_items
from otguard.evaluation.truthfulqa_mc import score_mc, score_mc_many
from otguard.policy import LayerEdit, Policy
from otguard.sites import find_head_sites, model_identity

pytestmark = pytest.mark.slow

D = torch.float64


def _policy(model, rule: str, layer: int, seed: int) -> Policy:
    """Always flagging; ``replace``: every head of ``layer`` through a mild random affine map;
    ``shift``: the first four heads shifted by a random vector."""
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(H, dtype=torch.bool) if rule == "replace" else torch.arange(H) < 4
    A = torch.eye(d) + 0.3 / d**0.5 * torch.randn(H, d, d, generator=gen) if rule == "replace" else None
    b = 0.5 * torch.randn(H, d, generator=gen)
    edit = LayerEdit(layer=layer, probe_weight=torch.zeros(H, d), probe_bias=torch.full((H,), 10.0),
                     threshold=None, head_mask=mask, b=b, A=A)  # fmt: skip
    return Policy(method=rule, rule=rule, layers=[edit], model=model_identity(model), scope="answer")


def test_many_equals_each_alone_smollm2(smollm2, data_dir: Path) -> None:
    model, tok = smollm2
    items = truthfulqa_items(data_dir)[:8]
    policies = {"replace": _policy(model, "replace", 10, 0), "shift": _policy(model, "shift", 14, 1)}
    many = score_mc_many(model, tok, items, policies, batch_size=64, question_batch=4, progress=False)
    assert list(many) == ["replace", "shift"]
    for name, policy in policies.items():
        # Alone, with each question's context run by itself (no packed contexts).
        alone = score_mc(model, tok, items, policy=policy, batch_size=64, question_batch=1, progress=False)
        got, want = many[name], alone
        assert got.info["shared_prefix_tokens"] > 100 and got.info["shared_prefix_fallbacks"] == 0
        assert got.info["padded_forwards"] == 0 and got.info["packed_forwards"] == len(items)
        # float32 forwards of different shapes (packed contexts of 4 questions vs one): answer scores
        # agree to 1e-4, MC2 to 1e-4, MC1/MC3 exactly.
        for a, b in zip(got.mc2_scores + got.mc1_scores, want.mc2_scores + want.mc1_scores, strict=True):
            torch.testing.assert_close(torch.tensor(a, dtype=D), torch.tensor(b, dtype=D), rtol=0, atol=1e-4)
        mc2 = torch.tensor(got.mc2_per_question, dtype=D), torch.tensor(want.mc2_per_question, dtype=D)
        torch.testing.assert_close(*mc2, rtol=0, atol=1e-4)
        assert got.mc1_per_question == want.mc1_per_question
        assert got.mc3_per_question == want.mc3_per_question
    diff = max(abs(x - y) for a, b in zip(many["replace"].mc2_scores, many["shift"].mc2_scores, strict=True)
               for x, y in zip(a, b, strict=True))  # fmt: skip
    assert diff > 0.05, "the two policies gave the same scores"
