"""A policy on the packaged SmolLM2 edits every position of ``model.generate``, with or without a KV cache.

The transformers-5.2x regression this pins: ``generate`` passes the cache as ``cache=``, a hook that
read only ``past_key_values`` saw no cache and edited only the last prompt token (``positions`` 1
per row after 12 new tokens), and greedy tokens with and without the cache differed. Kept cheap:
two prompts, 12 new tokens, one edited layer.
"""

from __future__ import annotations

import pytest
import torch

from otguard.generation import generate_texts
from tests.integration.test_policy_reload import PROMPTS, smollm2_policy
from tests.reference.explicit_policy import ExplicitPolicy

pytestmark = pytest.mark.slow

NEW_TOKENS = 12


def test_generate_edits_every_position_with_and_without_cache(smollm2) -> None:
    model, tok = smollm2
    policy = smollm2_policy(model, tok)
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(PROMPTS, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = old_side
    B, width = enc["input_ids"].shape
    kw = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        plain = model.generate(**enc, **kw)
        with policy.attach(model) as handle:
            cached = model.generate(**enc, **kw)
            stats = handle.stats()
            uncached = model.generate(**enc, use_cache=False, **kw)
        with ExplicitPolicy(policy, model) as ref:
            reference = model.generate(**enc, **kw)
    new = cached.shape[1] - width
    assert new == NEW_TOKENS  # no row may stop the batch early for these prompts
    # One edited layer: per row, the last prompt token + the generated tokens fed back (all but the last).
    assert stats["positions"] == len(policy.layers) * B * new == ref.n_in_scope
    assert stats["flag_rate"] == ref.n_flagged / ref.n_in_scope
    assert stats["edited_heads_per_flag"] == ref.n_edited_heads / ref.n_flagged_positions
    assert 0 < ref.n_flagged < ref.n_in_scope
    assert torch.equal(cached, uncached), "greedy tokens differ with and without the KV cache"
    assert torch.equal(cached, reference)
    assert not torch.equal(plain, cached), "the policy does not change the generation; the test is vacuous"
    # generate_texts (otguard generate, Stage 3, the harness) runs the same edit.
    texts = generate_texts(model, tok, PROMPTS, policy=policy, max_new_tokens=NEW_TOKENS, batch_size=2)
    assert [t[0] for t in texts] == tok.batch_decode(cached[:, width:], skip_special_tokens=True)
