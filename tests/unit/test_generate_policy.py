"""A policy attached to ``model.generate`` checks and edits every generated position.

transformers renamed the KV-cache argument ``past_key_values`` to ``cache`` (5.2x) and ``generate``
passes the new name; a hook that reads only the old one sees a cache of length 0 at every decoding
step, so every generated position falls outside scope ``"generation"`` and only the last prompt
token is edited. These tests pin the exact behaviour on tiny Llama and GPT-2 models:

- the number of positions the hook saw (``handle.stats()["positions"]``) follows the exact rule:
  per edited layer and batch row, the last prompt token plus every generated token that went
  through a forward call (all but the last one, which is never fed back), i.e. as many positions as
  ``generate`` returned new tokens: ``n_edited_layers * batch * new_tokens``;
- greedy tokens with a policy equal an oracle that runs the whole sequence at every step without a
  KV cache, edited at the positions ``>= prompt_len - 1`` by the explicit reference hook; and equal
  ``generate(use_cache=False)``, with left padding in a batch;
- the cache is found under either name or positionally, and a chunked prefill
  (``prefill_chunk_size``) does not move the start of the edited positions.
"""

from __future__ import annotations

import pytest
import torch

from otguard.decoding import cache_arg_index, cache_kwarg
from tests.reference.explicit_policy import ExplicitPolicy
from tests.unit.test_policy import PAD, VOCAB, left_padded, random_policy, tiny_gpt2, tiny_llama

torch.set_num_threads(1)

PROMPTS = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(20 + n)) for n in (5, 9, 7)]
NEW = 8
GEN = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": PAD}


def model_and_policy(kind: str, rule: str):
    if kind == "llama":
        model = tiny_llama(0)
        return model, random_policy(model, rule=rule, layers=(0, 2), scope="generation")
    model = tiny_gpt2(0)
    return model, random_policy(model, rule=rule, layers=(0, 1), scope="generation")


@torch.no_grad()
def oracle_generate(model, policy, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a KV cache: the whole sequence at every step, edited by the explicit
    reference from the last prompt column on (scope "answer" at ``width - 1``: no cache to read)."""
    width = ids.shape[1]
    with ExplicitPolicy(policy, model, scope="answer") as ref:
        ref.set_answer_start(width - 1)
        for _ in range(new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("rule", ["replace", "kappa-p"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_edits_every_generated_position(kind: str, rule: str) -> None:
    model, policy = model_and_policy(kind, rule)
    ids, mask = left_padded(PROMPTS)
    B, width = ids.shape
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, **GEN)
        with policy.attach(model) as handle:
            cached = model.generate(input_ids=ids, attention_mask=mask, **GEN)
            stats = handle.stats()
            uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **GEN)
        with ExplicitPolicy(policy, model) as ref:
            reference = model.generate(input_ids=ids, attention_mask=mask, **GEN)
    want = oracle_generate(model, policy, ids, mask, NEW)
    assert cached.shape == (B, width + NEW)
    assert torch.equal(cached, want), "generate with the policy != the uncached, explicitly edited oracle"
    assert torch.equal(uncached, want)
    assert torch.equal(reference, want)
    assert not torch.equal(plain, cached), "the policy does not change the generation; the test is vacuous"
    # The exact count, per edited layer and row: the last prompt token + the NEW - 1 tokens fed back.
    assert stats["positions"] == len(policy.layers) * B * NEW
    assert ref.n_in_scope == stats["positions"]
    assert stats["flag_rate"] == pytest.approx(ref.n_flagged / ref.n_in_scope, abs=0)
    assert stats["edited_heads_per_flag"] == ref.n_edited_heads / ref.n_flagged_positions
    assert 0 < ref.n_flagged < ref.n_in_scope  # both branches of the gate are exercised


def test_generate_stopped_by_eos_counts_the_positions_it_ran() -> None:
    """A row that stops early: the hook saw exactly as many positions as tokens were generated."""
    model, policy = model_and_policy("llama", "replace")
    prompt = PROMPTS[1][None]
    with torch.no_grad(), policy.attach(model):
        free = model.generate(input_ids=prompt, **GEN)[0, prompt.shape[1] :].tolist()
    # The first generated token that does not occur before it, at step >= 2, becomes the EOS.
    k = next(i for i in range(2, NEW - 1) if free[i] not in free[:i])
    model.generation_config.eos_token_id = free[k]
    try:
        with torch.no_grad(), policy.attach(model) as handle:
            out = model.generate(input_ids=prompt, **GEN)
            stats = handle.stats()
    finally:
        model.generation_config.eos_token_id = None
    assert out[0, prompt.shape[1] :].tolist() == free[: k + 1]
    assert stats["positions"] == len(policy.layers) * (k + 1)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cache_found_under_either_name_and_positionally(kind: str) -> None:
    """A prompt forward, then one decoding step whose cache is passed as ``cache=``,
    ``past_key_values=`` (deprecated) or positionally: the step is in scope "generation" each time."""
    from transformers import DynamicCache

    model, policy = model_and_policy(kind, "replace")
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    step = torch.randint(3, VOCAB, (2, 1), generator=torch.Generator().manual_seed(5))
    index = cache_arg_index(model)
    assert cache_kwarg(model) == "cache" and index is not None

    def run(form: str) -> tuple[torch.Tensor, dict[str, float], int]:
        with torch.no_grad(), policy.attach(model) as handle:
            cache = DynamicCache()
            model(input_ids=ids, cache=cache, use_cache=True)
            if form == "positional":
                logits = model(step, *([None] * (index - 1)), cache, use_cache=True).logits
            elif form == "past_key_values":
                with pytest.warns(FutureWarning, match="past_key_values"):
                    logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits
            else:
                logits = model(input_ids=step, cache=cache, use_cache=True).logits
            return logits, handle.stats(), handle.state.past_len

    with torch.no_grad(), ExplicitPolicy(policy, model) as ref:
        cache = DynamicCache()
        model(input_ids=ids, cache=cache, use_cache=True)
        want = model(input_ids=step, cache=cache, use_cache=True).logits
    for form in ("cache", "past_key_values", "positional"):
        logits, stats, past_len = run(form)
        assert past_len == ids.shape[1], form
        # 2 edited layers x 2 rows x (the last prompt token + the step)
        assert stats["positions"] == ref.n_in_scope == 2 * 2 * 2, form
        torch.testing.assert_close(logits, want, atol=2e-5, rtol=1e-4)


def test_chunked_prefill_edits_from_the_last_prompt_token() -> None:
    """``prefill_chunk_size`` splits the prompt over several forward calls; the prompt length still
    comes from the whole prompt, so the tokens and the positions equal an unchunked run."""
    model, policy = model_and_policy("llama", "replace")
    prompt = PROMPTS[1][None]  # 9 tokens: chunks of 4, 4 and 1
    with torch.no_grad(), policy.attach(model) as handle:
        whole = model.generate(input_ids=prompt, **GEN)
        positions = handle.stats()["positions"]
        chunked = model.generate(input_ids=prompt, prefill_chunk_size=4, **GEN)
        assert handle.state.prompt_len == prompt.shape[1]
        assert handle.stats()["positions"] == 2 * positions == 2 * len(policy.layers) * NEW
    assert torch.equal(chunked, whole)
