"""Shared trunks (otguard.trunk): a forward resumed at layer L from a recorded state == the full forward.

Tiny random float32 models of every supported family (4 layers), with and without a prefix KV cache,
resumed at every layer; the lower layers really are skipped (their output projections are not
called), the cache afterwards is the full forward's, the layers' ``forward`` is restored after an
exception, and unsupported models / calls fall back to the full forward. Then TruthfulQA MC with
``share_trunk=True`` == ``share_trunk=False`` == ``score_mc`` per policy on tiny Llama / GPT-2 /
Gemma-2 with policies whose first edited layers differ.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache

from otguard.decoding import cache_kwarg, fork_cache, output_cache
from otguard.evaluation.truthfulqa_mc import MCResult, score_mc, score_mc_many
from otguard.policy import LayerEdit, Policy
from otguard.sites import find_head_sites, model_identity
from otguard.trunk import TRUNK_MODEL_TYPES, decoder_layers, record_trunk, resume_trunk, supports_trunk
from tests.tiny_models import GPT2, LLAMA, OPT, VOCAB, tiny_causal_lm, tiny_gemma2, tiny_gpt2, tiny_llama
from tests.unit.test_mc_many import ITEMS, bpe_tokenizer

torch.set_num_threads(1)
N_LAYERS = 4

_DEC = {k: v for k, v in LLAMA.items() if k not in ("head_dim", "num_key_value_heads")}
_DEC.update(num_hidden_layers=N_LAYERS, max_position_embeddings=64)
_GQA = dict(_DEC, num_key_value_heads=2)
_SLIDING = ["sliding_attention", "full_attention"] * (N_LAYERS // 2)
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_GQA, head_dim=16),
    "mistral": dict(_GQA, sliding_window=None),
    "qwen2": _GQA,
    "qwen3": dict(_GQA, head_dim=16),
    # Gemma: embeddings scaled by sqrt(hidden); Gemma-2: sliding window shorter than prefix + input
    "gemma": dict(_GQA, head_dim=16),
    "gemma2": dict(_GQA, head_dim=16, query_pre_attn_scalar=16, sliding_window=6, layer_types=_SLIDING),
    "phi": dict(_GQA, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0),
    "phi3": _GQA,
    "gpt2": dict({k: v for k, v in GPT2.items()}, n_layer=N_LAYERS, n_positions=64),
    "gpt_neox": dict(_DEC, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0),
    "opt": dict(OPT, num_hidden_layers=N_LAYERS),
}


def build(model_type: str) -> Any:
    return tiny_causal_lm(model_type, **CONFIGS[model_type])


def test_every_supported_type_is_tested() -> None:
    assert set(CONFIGS) == set(TRUNK_MODEL_TYPES)


class ProjCalls:
    """Counts the calls into each layer's output projection (the layers that really ran)."""

    def __init__(self, model: Any) -> None:
        self.counts = [0] * find_head_sites(model).n_layers
        self.handles = [m.register_forward_pre_hook(self._hook(i))
                        for i, m in enumerate(find_head_sites(model).modules)]  # fmt: skip

    def _hook(self, i: int) -> Any:
        def hook(module: Any, args: Any) -> None:
            self.counts[i] += 1

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def inputs_for(model: Any, cache: Any) -> dict[str, Any]:
    """Two rows of 5 tokens, the second right-padded by 2 (a 2D mask over cache + input)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 5), generator=gen)
    past = cache.get_seq_length() if cache is not None else 0
    mask = torch.ones(2, past + 5, dtype=torch.long)
    mask[1, -2:] = 0
    out: dict[str, Any] = dict(input_ids=ids, attention_mask=mask, use_cache=True)
    if cache is not None:
        out[cache_kwarg(model)] = fork_cache(cache, 2)
    return out


def prefix_cache(model: Any) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    model(input_ids=ids, **{cache_kwarg(model): cache}, use_cache=True)
    return cache


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("with_prefix", [False, True], ids=["no-cache", "prefix-cache"])
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
@torch.inference_mode()
def test_resumed_forward_equals_full(model_type: str, with_prefix: bool) -> None:
    model = build(model_type)
    assert supports_trunk(model)
    prefix = prefix_cache(model) if with_prefix else None
    full = model(**inputs_for(model, prefix))
    full_cache = output_cache(full)
    layers = list(range(1, N_LAYERS + 1))
    base, trunk = record_trunk(model, inputs_for(model, prefix), layers)
    torch.testing.assert_close(base.logits, full.logits, rtol=0, atol=0)
    assert sorted(trunk.states) == layers
    for layer in layers:
        calls = ProjCalls(model)
        try:
            out = resume_trunk(model, trunk, layer, inputs_for(model, prefix))
        finally:
            calls.remove()
        assert calls.counts == [0] * layer + [1] * (N_LAYERS - layer)  # the lower layers were skipped
        torch.testing.assert_close(out.logits, full.logits, rtol=0, atol=1e-5)
        # The cache is the full forward's (lower layers completed from the recorded forward).
        cache = output_cache(out)
        assert cache.get_seq_length() == full_cache.get_seq_length() == (7 if with_prefix else 0) + 5
        for a, b in zip(cache_tensors(cache), cache_tensors(full_cache), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if prefix is not None:  # the prefix cache the forks came from is untouched
        assert prefix.get_seq_length() == 7
    assert all("forward" not in m.__dict__ for m in decoder_layers(model))


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2"])
@torch.inference_mode()
def test_resume_with_policy_equals_policy_full(model_type: str) -> None:
    """A policy whose first edited layer is L, attached to the resumed forward, gives its full forward."""
    model = build(model_type)
    prefix = prefix_cache(model)
    policy = always_on_policy(model, (2, 3), seed=5)
    _, trunk = record_trunk(model, inputs_for(model, prefix), [2], keep_output=False, keep_cache=False)
    with policy.attach(model, scope="all"):
        full = model(**inputs_for(model, prefix))
        resumed = resume_trunk(model, trunk, 2, inputs_for(model, prefix))
    plain = model(**inputs_for(model, prefix))
    torch.testing.assert_close(resumed.logits, full.logits, rtol=0, atol=1e-5)
    assert (full.logits - plain.logits).abs().max() > 1e-2  # the policy did edit


@torch.inference_mode()
def test_keep_output_false_stops_after_highest_layer() -> None:
    model = build("llama")
    prefix = prefix_cache(model)
    calls = ProjCalls(model)
    head_calls = []
    head = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: head_calls.append(1))
    try:
        out, trunk = record_trunk(model, inputs_for(model, prefix), [1, 2], keep_output=False)
    finally:
        calls.remove()
        head.remove()
    assert out is None and sorted(trunk.states) == [1, 2]
    assert calls.counts == [1, 1, 0, 0] and head_calls == []
    full = model(**inputs_for(model, prefix))
    torch.testing.assert_close(resume_trunk(model, trunk, 2, inputs_for(model, prefix)).logits, full.logits,
                               rtol=0, atol=1e-5)  # fmt: skip


@torch.inference_mode()
def test_layers_restored_after_an_exception() -> None:
    model = build("llama")
    layers = decoder_layers(model)
    wrapper = layers[0].forward  # stands for an instance `forward` set by someone else (accelerate)
    layers[0].forward = wrapper
    _, trunk = record_trunk(model, inputs_for(model, None), [3])

    def boom(module: Any, args: Any) -> None:
        raise RuntimeError("boom")

    handle = find_head_sites(model).modules[3].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            resume_trunk(model, trunk, 3, inputs_for(model, None))
    finally:
        handle.remove()
    assert layers[0].__dict__["forward"] is wrapper
    assert all("forward" not in m.__dict__ for m in list(layers)[1:])
    del layers[0].forward
    calls = ProjCalls(model)
    try:
        out = model(**inputs_for(model, None))
    finally:
        calls.remove()
    assert calls.counts == [1] * N_LAYERS
    torch.testing.assert_close(out.logits, build("llama")(**inputs_for(model, None)).logits, rtol=0, atol=0)


@torch.inference_mode()
def test_unsupported_model_and_calls_run_full_forwards() -> None:
    model = tiny_causal_lm("olmo", **_GQA)  # a head site, but a decoder loop not checked here
    assert not supports_trunk(model)
    full = model(**inputs_for(model, None))
    _, trunk = record_trunk(model, inputs_for(model, None), [2])
    assert trunk.states == {}
    calls = ProjCalls(model)
    try:
        out = resume_trunk(model, trunk, 2, inputs_for(model, None))
    finally:
        calls.remove()
    assert calls.counts == [1] * N_LAYERS
    torch.testing.assert_close(out.logits, full.logits, rtol=0, atol=0)
    calls = ProjCalls(model)  # nothing to record and no output wanted: nothing runs
    try:
        assert record_trunk(model, inputs_for(model, None), [2], keep_output=False)[0] is None
    finally:
        calls.remove()
    assert calls.counts == [0] * N_LAYERS
    # A supported model, but a call that asks for every layer's hidden state.
    llama = build("llama")
    _, trunk = record_trunk(llama, dict(inputs_for(llama, None), output_hidden_states=True), [2])
    assert trunk.states == {}
    # Resuming with other inputs than the recorded ones is an error, not a wrong answer.
    _, trunk = record_trunk(llama, inputs_for(llama, None), [2])
    with pytest.raises(ValueError, match="recorded"):
        resume_trunk(llama, trunk, 2, inputs_for(llama, prefix_cache(llama)))


# ------------------------------------------------------------------------------- TruthfulQA MC
def always_on_policy(model: Any, layers: tuple[int, ...], seed: int, gated: bool = False) -> Policy:
    """Replace maps on ``layers`` (always on, or gated by a random probe that flags some positions)."""
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    gen = torch.Generator().manual_seed(seed)
    edits = []
    for layer in layers:
        W = torch.randn(H, d, generator=gen) if gated else torch.zeros(H, d)
        w0 = torch.full((H,), 0.0 if gated else 10.0)
        edits.append(LayerEdit(layer=layer, probe_weight=W, probe_bias=w0,
                               threshold=2 if gated else None, head_mask=torch.ones(H, dtype=torch.bool),
                               b=torch.randn(H, d, generator=gen),
                               A=torch.eye(d) + 0.5 * torch.randn(H, d, d, generator=gen)))  # fmt: skip
    return Policy(method="test", rule="replace", layers=edits, model=model_identity(model), scope="answer")


def mc_model(kind: str, tok: Any) -> Any:
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None)
    if kind == "llama":
        return tiny_llama(name="tiny-llama", num_hidden_layers=3, max_position_embeddings=1024, **ids)
    if kind == "gpt2":
        return tiny_gpt2(name="tiny-gpt2", n_layer=3, n_positions=1024, **ids)
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    return tiny_gemma2(name="tiny-gemma2", num_hidden_layers=3, max_position_embeddings=1024,
                       layer_types=types, **ids)  # fmt: skip


def assert_same(a: MCResult, b: MCResult, atol: float = 1e-5) -> None:
    x = torch.tensor([s for row in a.mc2_scores + a.mc1_scores for s in row], dtype=torch.float64)
    y = torch.tensor([s for row in b.mc2_scores + b.mc1_scores for s in row], dtype=torch.float64)
    torch.testing.assert_close(x, y, rtol=0, atol=atol)
    torch.testing.assert_close(torch.tensor(a.mc2_per_question), torch.tensor(b.mc2_per_question), rtol=0,
                               atol=atol)  # fmt: skip


@pytest.fixture(scope="module")
def tok() -> Any:
    return bpe_tokenizer()


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2"])
def test_mc_many_shared_trunk_equals_full_forwards(tok: Any, kind: str) -> None:
    model = mc_model(kind, tok)
    policies: dict[str, Policy | None] = {
        "at0": always_on_policy(model, (0, 2), seed=1),
        "none": None,
        "at1": always_on_policy(model, (2, 1), seed=2, gated=True),  # first edited layer 1, listed second
        "at2": always_on_policy(model, (2,), seed=3),
        "at2b": always_on_policy(model, (2,), seed=4, gated=True),
    }
    kw: dict[str, Any] = dict(batch_size=3, question_batch=2, progress=False)
    calls = ProjCalls(model)
    try:
        shared = score_mc_many(model, tok, ITEMS, policies, **kw)
        n_shared = list(calls.counts)
        plain = score_mc_many(model, tok, ITEMS, policies, share_trunk=False, **kw)
        n_plain = [b - a for a, b in zip(n_shared, calls.counts, strict=True)]
    finally:
        calls.remove()
    assert {n: r.info["trunk_layer"] for n, r in shared.items()} == {"at0": 0, "none": 0, "at1": 1, "at2": 2,
                                                                      "at2b": 2}  # fmt: skip
    assert all(r.info["trunk_layer"] == 0 for r in plain.values())
    # Sharing: per chunk, layer 0 runs for the base forward and "at0" only (not for at1/at2/at2b);
    # layer 2 runs once per policy and chunk, as before.
    forwards = shared["none"].info["packed_forwards"] + shared["none"].info["padded_forwards"]
    assert n_shared[2] == n_plain[2] and n_plain[0] == n_plain[2]
    assert n_plain[0] - n_shared[0] == 3 * forwards
    assert n_plain[1] - n_shared[1] == 2 * forwards
    for name, policy in policies.items():
        assert_same(shared[name], plain[name])
        alone = score_mc(model, tok, ITEMS, policy=policy, batch_size=3, question_batch=2, progress=False)
        assert_same(shared[name], alone)
    # Each policy's own edits reached its answers.
    for name in ("at0", "at1", "at2", "at2b"):
        diff = max(abs(x - y) for a, b in zip(shared[name].mc2_scores, shared["none"].mc2_scores, strict=True)
                   for x, y in zip(a, b, strict=True))  # fmt: skip
        assert diff > 1e-2, name
    assert all("forward" not in m.__dict__ for m in decoder_layers(model))


def test_mc_many_without_none_policy_stops_base_early(tok: Any) -> None:
    """No plain-model policy: the recording forward stops after the highest needed layer."""
    model = mc_model("llama", tok)
    policies = {"at1": always_on_policy(model, (1,), seed=2), "at2": always_on_policy(model, (2,), seed=3)}
    calls = ProjCalls(model)
    try:
        shared = score_mc_many(model, tok, ITEMS, policies, batch_size=3, question_batch=2, progress=False)
        n_shared = list(calls.counts)
        plain = score_mc_many(model, tok, ITEMS, policies, batch_size=3, question_batch=2, progress=False,
                              share_trunk=False)  # fmt: skip
        n_plain = [b - a for a, b in zip(n_shared, calls.counts, strict=True)]
    finally:
        calls.remove()
    forwards = shared["at1"].info["packed_forwards"] + shared["at1"].info["padded_forwards"]
    contexts = n_plain[2] - 2 * forwards  # the prefix and question-context forwards, the same both ways
    # layer 0: contexts + one base forward per chunk; layer 1: contexts + base + at1; layer 2: unchanged.
    assert n_shared == [contexts + forwards, contexts + 2 * forwards, n_plain[2]]
    for name in policies:
        assert_same(shared[name], plain[name])


# ------------------------------------------------------------------------------------ drift
@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_drift_many_shared_trunk_equals_full_forwards(tok: Any, kind: str) -> None:
    from otguard.evaluation.drift import measure_drift, measure_drift_many

    model = mc_model(kind, tok)
    docs = [f"Q: {it.question}\nA: {a}" for it in ITEMS for a, _ in it.mc2_targets[:2]]
    policies: dict[str, Policy | None] = {
        "none": None,
        "at0": always_on_policy(model, (0,), seed=1),
        "at1": always_on_policy(model, (1, 2), seed=2, gated=True),
        "at2": always_on_policy(model, (2,), seed=3),
    }
    calls = ProjCalls(model)
    try:
        shared = measure_drift_many(model, tok, docs, policies, max_tokens=24, batch_size=4)
        n_shared = list(calls.counts)
        plain = measure_drift_many(model, tok, docs, policies, max_tokens=24, batch_size=4, share_trunk=False)
        n_plain = [b - a for a, b in zip(n_shared, calls.counts, strict=True)]
    finally:
        calls.remove()
    batches = -(-len(docs) // 4)
    assert n_plain == [4 * batches] * 3  # the original forward + three policies, every layer
    assert n_shared == [2 * batches, 3 * batches, 4 * batches]
    for name, policy in policies.items():
        a, b = shared[name].to_dict(), plain[name].to_dict()
        alone = measure_drift(model, tok, docs, policy, max_tokens=24, batch_size=4).to_dict()
        for key in ("ce", "ce_original", "kl", "flag_rate", "edited_heads", "flagged_positions"):
            for other in (b, alone):
                if a[key] is None:
                    assert other[key] is None
                else:
                    assert abs(a[key] - other[key]) <= 1e-5, (name, key)
        assert a["n_tokens"] == b["n_tokens"] and a["n_docs"] == b["n_docs"]
    assert all(shared[n].kl > 1e-4 for n in ("at0", "at1", "at2"))
