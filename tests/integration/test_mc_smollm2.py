"""TruthfulQA MC on the packaged SmolLM2-135M with real questions: cached scorer == naive scorer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from otguard.data import truthfulqa_items
from otguard.evaluation.truthfulqa_mc import answer_span, mc_answers, score_mc
from otguard.policy import LayerEdit, Policy
from otguard.prompts import qa_prompt
from otguard.sites import find_head_sites, model_identity
from tests.reference.naive_mc import score_mc_naive

pytestmark = pytest.mark.slow

D = torch.float64


@pytest.fixture(scope="module")
def items(data_dir: Path):
    return truthfulqa_items(data_dir)


def test_answer_spans_smollm2_tokenizer(smollm2, items) -> None:
    """Every answer of the first 100 questions starts right after the context's own tokens."""
    _, tok = smollm2
    for item in items[:100]:
        context = qa_prompt(item.question)
        ctx_ids = tok(context)["input_ids"]
        for answer in mc_answers(item):
            ids, start = answer_span(tok, context, " " + answer)
            assert start == len(ctx_ids) and ids[:start] == ctx_ids
            assert tok.decode(ids[start:]) == " " + answer


def mild_policy(model, layer: int = 10, seed: int = 0) -> Policy:
    """RADIANT rule, always flagging, every head of ``layer`` replaced by a mild random affine map."""
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    gen = torch.Generator().manual_seed(seed)
    edit = LayerEdit(
        layer=layer,
        probe_weight=torch.zeros(H, d),
        probe_bias=torch.full((H,), 10.0),
        threshold=None,
        head_mask=torch.ones(H, dtype=torch.bool),
        b=0.5 * torch.randn(H, d, generator=gen),
        A=torch.eye(d) + 0.3 / d**0.5 * torch.randn(H, d, d, generator=gen),
    )
    return Policy(method="random", rule="replace", layers=[edit], model=model_identity(model), scope="answer")


@pytest.mark.parametrize("with_policy", [False, True], ids=["plain", "policy"])
def test_cached_equals_naive_smollm2(smollm2, items, with_policy) -> None:
    model, tok = smollm2
    sample = items[:5]
    policy = mild_policy(model) if with_policy else None
    fast = score_mc(model, tok, sample, policy=policy, batch_size=8, progress=False)
    naive = score_mc_naive(model, tok, sample, policy=policy)
    assert fast.info["shared_prefix_tokens"] > 100 and fast.info["shared_prefix_fallbacks"] == 0
    assert fast.info["padded_forwards"] == 0 and fast.info["packed_forwards"] >= len(sample)
    # float32 forwards of different shapes: answer scores (sums of ~5-30 log-probs) agree to 1e-4
    # (measured: 3e-5), MC2 to 1e-4 (measured: 7e-6).
    for a, b in zip(fast.mc2_scores + fast.mc1_scores, naive.mc2_scores + naive.mc1_scores, strict=True):
        torch.testing.assert_close(torch.tensor(a, dtype=D), torch.tensor(b, dtype=D), rtol=0, atol=1e-4)
    torch.testing.assert_close(
        torch.tensor(fast.mc2_per_question, dtype=D), torch.tensor(naive.mc2_per_question, dtype=D),
        rtol=0, atol=1e-4,
    )  # fmt: skip
    assert fast.mc1_per_question == naive.mc1_per_question
    assert fast.mc3_per_question == naive.mc3_per_question
    if with_policy:
        plain = score_mc(model, tok, sample, batch_size=8, progress=False)
        diff = max(abs(x - y) for a, b in zip(plain.mc2_scores, fast.mc2_scores, strict=True)
                   for x, y in zip(a, b, strict=True))  # fmt: skip
        assert diff > 0.05, "the policy did not change the scores"
