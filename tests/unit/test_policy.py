"""The policy hook: equal to the explicit per-row/position/head reference, generation, persistence.

Everything runs on a tiny random Llama (3 layers, 4 query heads, 2 KV heads, head dim 8) built from
a config, plus a tiny GPT-2 for the transposed ``Conv1D`` projection. Policies are random but
calibrated on the model's own head activations, so that the probe logits are O(1): some rows and
positions are flagged and some are not (the tests check that both happen). Counts (positions in
scope, flag rates, edited heads) are compared exactly with the explicit reference.

Half precision: the hook computes the probe logits, the votes and the edit in float32 and rounds the
result once to the model's dtype, so on a bf16/fp16 model its output equals the float64 reference
rounded to that dtype within one unit in the last place (relative ``eps`` of the dtype: 2**-7 for
bf16, 2**-10 for fp16), with the same votes even for logits 1e-4 from the threshold.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import otguard.policy as policy_module
from otguard.decoding import cache_kwarg
from otguard.errors import PolicyError, PolicyMismatchError
from otguard.policy import LayerEdit, Policy
from otguard.sites import find_head_sites, model_identity
from tests.reference.explicit_policy import ExplicitPolicy

torch.set_num_threads(1)

VOCAB, PAD = 96, 0
ATOL = 2e-5
RULES = ("replace", "kappa-p", "shift")


# ---------------------------------------------------------------------------------------- fixtures
def tiny_llama(seed: int = 0, n_layers: int = 3, n_heads: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=n_heads * 8, intermediate_size=64, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        initializer_range=0.2, pad_token_id=PAD, bos_token_id=1, eos_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    model.config._name_or_path = f"tiny-llama-seed{seed}"
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
                     bos_token_id=1, eos_token_id=None, pad_token_id=PAD)
    model = GPT2LMHeadModel(cfg).eval()
    model.config._name_or_path = f"tiny-gpt2-seed{seed}"
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def head_activations(model, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per-layer ``(N, H, d)`` inputs of the output projections on ``ids``."""
    sites = find_head_sites(model)
    out: dict[int, torch.Tensor] = {}
    handles = []
    for layer, module in enumerate(sites.modules):
        def grab(mod, args, layer=layer):
            out[layer] = args[0].detach().reshape(-1, sites.n_heads, sites.head_dim).clone()
        handles.append(module.register_forward_pre_hook(grab))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return out


def random_policy(model, *, rule: str = "replace", thresholds=(2, 3), layers=(0, 2), kappa: float = 2.5,
                  scope: str = "generation", seed: int = 0, with_A=(True, False)) -> Policy:
    """A random policy whose probe logits are ~N(0, 1) on the model's own activations."""
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    gen = torch.Generator().manual_seed(seed)
    calib = torch.randint(3, VOCAB, (4, 12), generator=gen)
    acts = head_activations(model, calib)
    edits = []
    for layer, tau, has_A in zip(layers, thresholds, with_A, strict=True):
        a = acts[layer].double()  # (N, H, d)
        u = torch.randn(H, d, generator=gen, dtype=torch.float64)
        proj = torch.einsum("nhd,hd->nh", a, u)
        scale = proj.std(0)
        W = u / scale[:, None]
        w0 = -proj.mean(0) / scale
        std = a.std((0, 2))  # per-head activation scale
        b = torch.randn(H, d, generator=gen, dtype=torch.float64) * std[:, None] * 1.5
        A = None
        if has_A:
            noise = torch.randn(H, d, d, generator=gen, dtype=torch.float64)
            A = torch.eye(d, dtype=torch.float64) + 0.4 * noise
        mask = torch.ones(H, dtype=torch.bool)
        mask[1] = False
        edits.append(LayerEdit(layer=layer, probe_weight=W.float(), probe_bias=w0.float(), threshold=tau,
                               head_mask=mask, b=b.float(), A=None if A is None else A.float()))
    return Policy(method="random", rule=rule, layers=edits, model=model_identity(model), kappa=kappa,
                  scope=scope, params={"seed": seed}, meta={"note": "test"})


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(0)


def batch(kind: str, n: int, length: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask: ``kind`` none (all rows full), left or right padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=gen)
    mask = torch.ones_like(ids)
    if kind != "none":
        lengths = [length - 3 * (i % 3) for i in range(n)]
        for i, n_tok in enumerate(lengths):
            pad = length - n_tok
            if kind == "left":
                mask[i, :pad] = 0
                ids[i, :pad] = PAD
            else:
                mask[i, n_tok:] = 0
                ids[i, n_tok:] = PAD
    return ids, mask


@torch.no_grad()
def logits_of(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


# ------------------------------------------------------------------- hook == explicit reference
CASES = [
    # (scope, padding, batch size)
    ("generation", "none", 1),
    ("generation", "left", 3),
    ("all", "none", 1),
    ("all", "left", 3),
    ("all", "right", 3),
    ("answer", "none", 1),
    ("answer", "left", 3),
    ("answer", "right", 3),
]


def answer_start(padding: str, mask: torch.Tensor) -> torch.Tensor | int:
    """Per-row first answer position (the last 3 real tokens of each row), or an int for batch 1."""
    if mask.shape[0] == 1:
        return int(mask.shape[1]) - 3
    lengths = mask.sum(1)
    if padding == "right":
        return lengths - 3
    return torch.full_like(lengths, mask.shape[1]) - 3


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "always"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("scope", "padding", "n"), CASES)
def test_hook_matches_reference(llama, rule, scope, padding, n, gated):
    thresholds = (2, 3) if gated else (None, None)
    policy = random_policy(llama, rule=rule, thresholds=thresholds, scope=scope)
    ids, mask = batch(padding, n)
    plain = logits_of(llama, ids, mask)
    with policy.attach(llama) as handle:
        if scope == "answer":
            handle.set_answer_start(answer_start(padding, mask))
        got = logits_of(llama, ids, mask)
        stats = handle.stats()
    with ExplicitPolicy(policy, llama) as ref:
        if scope == "answer":
            ref.set_answer_start(answer_start(padding, mask))
        want = logits_of(llama, ids, mask)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-3), "the policy did not change the logits"
    # The test exercises both branches: flagged and unflagged in-scope positions (when gated).
    assert ref.n_in_scope > 0 and ref.n_flagged > 0
    if gated and ref.n_in_scope >= 12:
        assert ref.n_flagged < ref.n_in_scope
    assert stats["positions"] == ref.n_in_scope
    assert stats["flag_rate"] == pytest.approx(ref.n_flagged / ref.n_in_scope)
    assert stats["flagged_positions"] == ref.n_flagged_positions
    assert stats["edited_heads_per_flag"] == pytest.approx(ref.n_edited_heads / ref.n_flagged_positions)


@pytest.mark.parametrize("scope", ["generation", "all", "answer"])
@pytest.mark.parametrize("rule", ["replace", "kappa-p"])
def test_hook_matches_reference_with_kv_cache(llama, rule, scope):
    """A prompt forward with cache, then single-token steps: absolute positions come from the cache."""
    from transformers import DynamicCache

    policy = random_policy(llama, rule=rule, scope=scope)
    ids, mask = batch("left", 3, length=8)
    steps = torch.randint(3, VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))

    def run(handle) -> list[torch.Tensor]:
        if scope == "answer":
            handle.set_answer_start(torch.tensor([6, 7, 9]))
        cache = {cache_kwarg(llama): DynamicCache()}
        am = mask
        outs = [llama(input_ids=ids, attention_mask=am, **cache, use_cache=True).logits]
        for t in range(steps.shape[1]):
            am = torch.cat([am, torch.ones(3, 1, dtype=am.dtype)], 1)
            step = steps[:, t : t + 1]
            out = llama(input_ids=step, attention_mask=am, **cache, use_cache=True)
            outs.append(out.logits)
        return outs

    with torch.no_grad():
        with policy.attach(llama) as handle:
            got = run(handle)
            stats = handle.stats()
        with ExplicitPolicy(policy, llama) as ref:
            want = run(ref)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=1e-4)
    assert 0 < ref.n_flagged < ref.n_in_scope
    assert_same_counts(stats, ref)


def test_gpt2_hook_matches_reference():
    model = tiny_gpt2()
    policy = random_policy(model, rule="kappa-p", layers=(0, 1), scope="all")
    ids, mask = batch("right", 3)
    with policy.attach(model):
        got = logits_of(model, ids, mask)
    with ExplicitPolicy(policy, model) as ref:
        want = logits_of(model, ids, mask)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    assert 0 < ref.n_flagged < ref.n_in_scope
    # Generation (cache on and off) is the same with the reference hook.
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    policy.scope = "generation"
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": PAD}
    with policy.attach(model):
        cached = model.generate(prompt, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    with ExplicitPolicy(policy, model) as ref:
        want = model.generate(prompt, **kw)
    assert torch.equal(cached, want)
    assert torch.equal(uncached, want)


# ----------------------------------------------------------------------------------- generation
def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


PROMPTS = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(10 + n)) for n in (5, 9, 7)]
GEN = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": PAD}


@pytest.mark.parametrize("rule", ["replace", "kappa-p"])
def test_generation_batched_cache_and_reference_agree(llama, rule):
    policy = random_policy(llama, rule=rule, scope="generation")
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        plain = llama.generate(input_ids=ids, attention_mask=mask, **GEN)
        with policy.attach(llama) as handle:
            batched = llama.generate(input_ids=ids, attention_mask=mask, **GEN)
            stats = handle.stats()
            uncached = llama.generate(input_ids=ids, attention_mask=mask, use_cache=False, **GEN)
            single = [llama.generate(input_ids=p[None], **GEN)[0, len(p) :] for p in PROMPTS]
        with ExplicitPolicy(policy, llama) as ref:
            reference = llama.generate(input_ids=ids, attention_mask=mask, **GEN)
    width = ids.shape[1]
    assert torch.equal(batched, uncached)
    assert torch.equal(batched, reference)
    for i, tokens in enumerate(single):
        assert torch.equal(batched[i, width:], tokens), f"row {i}: batched != one-by-one"
    assert not torch.equal(plain, batched), "the policy did not change the generations"
    # Scope "generation": the last prompt token and every generated one except the last (never fed back).
    assert stats["positions"] == 2 * len(PROMPTS) * GEN["max_new_tokens"]
    assert 0 < ref.n_flagged < ref.n_in_scope
    assert_same_counts(stats, ref)


def test_plain_output_restored_after_remove_and_exception(llama):
    policy = random_policy(llama, rule="replace", scope="all")
    ids, mask = batch("left", 3)
    sites = find_head_sites(llama)
    before = logits_of(llama, ids, mask)
    handle = policy.attach(llama)
    assert "generate" not in vars(llama)  # scope "all" does not wrap generate
    edited = logits_of(llama, ids, mask)
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(logits_of(llama, ids, mask), before)
    assert not torch.allclose(edited, before, atol=1e-3)

    with pytest.raises(RuntimeError, match="boom"), policy.attach(llama, scope="generation"):
        assert "generate" in vars(llama)
        logits_of(llama, ids, mask)
        raise RuntimeError("boom")
    assert torch.equal(logits_of(llama, ids, mask), before)
    assert not llama._forward_pre_hooks
    assert all(not m._forward_pre_hooks for m in sites.modules)
    assert "generate" not in vars(llama)
    assert llama.generate.__func__ is type(llama).generate


def test_generate_wrapper_resets_between_calls_and_nests(llama):
    """Each generate() starts a new prompt; nested handles restore each other's wrappers (LIFO)."""
    policy = random_policy(llama, rule="replace", scope="generation")
    other = random_policy(llama, rule="shift", thresholds=(None, None), seed=3)
    short, long_ = PROMPTS[0][None], PROMPTS[1][None]
    with torch.no_grad():
        with policy.attach(llama):
            alone = llama.generate(input_ids=short, **GEN)
        with policy.attach(llama):
            llama.generate(input_ids=long_, **GEN)
            again = llama.generate(input_ids=short, **GEN)  # would be wrong with a stale prompt length
        assert torch.equal(alone, again)
        with policy.attach(llama) as outer:
            wrapper = llama.generate
            with other.attach(llama):
                both = llama.generate(input_ids=short, **GEN)
            assert llama.generate is wrapper
            llama.generate(input_ids=long_, **GEN)
            assert outer.state.prompt_len == long_.shape[1]
            assert torch.equal(llama.generate(input_ids=short, **GEN), alone)
        assert "generate" not in vars(llama)
    assert not torch.equal(both, alone)


# ---------------------------------------------------------------------------------------- stats
def test_stats_always_flag_policy(llama):
    ids, mask = batch("none", 2)
    always = random_policy(llama, rule="shift", thresholds=(None, None), scope="all")
    gated = random_policy(llama, rule="replace", scope="all")
    with always.attach(llama) as handle:
        assert handle.stats() == {"positions": 0.0, "flag_rate": 0.0, "flagged_positions": 0.0,
                                  "position_flag_rate": 0.0, "edited_heads": 0.0,
                                  "edited_heads_per_flag": 0.0}  # fmt: skip
        logits_of(llama, ids, mask)
        stats = handle.stats()
    assert stats["positions"] == 2 * ids.numel()
    assert stats["flag_rate"] == 1.0
    # 3 of 4 heads in the mask, on each of the 2 edited layers: summed over layers, not a mean per layer.
    assert stats["edited_heads_per_flag"] == 6.0
    assert stats["flagged_positions"] == ids.numel() and stats["position_flag_rate"] == 1.0
    with gated.attach(llama) as handle:
        logits_of(llama, ids, mask)
        stats = handle.stats()
    with ExplicitPolicy(gated, llama) as ref:
        logits_of(llama, ids, mask)
    assert 0 < ref.n_flagged < ref.n_in_scope == 2 * ids.numel()
    assert_same_counts(stats, ref)


def test_answer_scope_without_start_is_a_no_op(llama):
    policy = random_policy(llama, rule="replace", scope="answer")
    ids, mask = batch("none", 2)
    before = logits_of(llama, ids, mask)
    with policy.attach(llama) as handle:
        assert torch.equal(logits_of(llama, ids, mask), before)
        assert handle.stats()["positions"] == 0


def test_kappa_override(llama):
    policy = random_policy(llama, rule="kappa-p", scope="all", kappa=1.0)
    ids, mask = batch("none", 2)
    with policy.attach(llama, kappa=4.0):
        got = logits_of(llama, ids, mask)
    with policy.with_kappa(4.0).attach(llama):
        same = logits_of(llama, ids, mask)
    with ExplicitPolicy(policy, llama, kappa=4.0):
        want = logits_of(llama, ids, mask)
    assert torch.equal(got, same)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


def test_invalid_policies_rejected(llama):
    good = random_policy(llama)
    with pytest.raises(PolicyError, match="edit rule"):
        Policy(method="x", rule="bogus", layers=[], model=good.model)
    with pytest.raises(PolicyError, match="scope"):
        good.attach(llama, scope="everywhere")
    edit = copy.copy(good.layers[0])
    edit.b = torch.zeros(3, 8)
    with pytest.raises(PolicyError, match="shape"):
        Policy(method="x", rule="replace", layers=[edit], model=good.model)
    edit = copy.copy(good.layers[0])
    edit.layer = 7
    with pytest.raises(PolicyError, match="outside"):
        Policy(method="x", rule="replace", layers=[edit], model=good.model)


# ----------------------------------------------------------------------------------- save / load
def test_save_load_round_trip(llama, tmp_path):
    policy = random_policy(llama, rule="kappa-p", kappa=3.0)
    path = policy.save(tmp_path / "policy")
    loaded = Policy.load(path, model=llama)
    got = (loaded.method, loaded.rule, loaded.kappa, loaded.scope)
    assert got == ("random", "kappa-p", 3.0, "generation")
    assert loaded.params == policy.params and loaded.meta == policy.meta
    assert loaded.model == policy.model
    for a, b in zip(policy.layers, loaded.layers, strict=True):
        assert a.layer == b.layer and a.threshold == b.threshold
        for name in ("probe_weight", "probe_bias", "head_mask", "b"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert (a.A is None and b.A is None) or torch.equal(a.A, b.A)
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        with policy.attach(llama):
            want = llama.generate(input_ids=ids, attention_mask=mask, **GEN)
        with loaded.attach(llama):
            got = llama.generate(input_ids=ids, attention_mask=mask, **GEN)
    assert torch.equal(got, want)
    assert "random policy (kappa-p)" in loaded.summary()


def test_load_onto_bfloat16_model(llama, tmp_path):
    """Whole-model logits in bf16 with the loaded policy: the explicit reference's within one bf16 ulp
    of the largest logit (the edits agree to an ulp, see below; a bf16 gate and edit miss by more)."""
    policy = random_policy(llama, rule="replace", scope="all")
    policy.save(tmp_path / "p")
    model16 = copy.deepcopy(llama).to(torch.bfloat16)
    loaded = Policy.load(tmp_path / "p", model=model16)
    ids, mask = batch("left", 3)
    plain = logits_of(model16, ids, mask)
    with loaded.attach(model16) as handle:
        out = logits_of(model16, ids, mask)
        stats = handle.stats()
    with ExplicitPolicy(policy, model16) as ref:
        want = logits_of(model16, ids, mask)
    assert out.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * float(want.float().abs().max())
    torch.testing.assert_close(out.float(), want.float(), atol=ulp, rtol=0)
    assert_same_counts(stats, ref)
    assert 0 < ref.n_flagged < ref.n_in_scope
    assert not torch.equal(out, plain)


def half_precision_edits(model, policy: Policy, dtype: torch.dtype, device: str = "cpu"):
    """The edited inputs of each edited layer's output projection, hook vs explicit reference.

    ``model`` is copied to ``dtype`` on ``device``; both hooks edit the same ``dtype`` activations (the
    model's own, on a left-padded batch). A probe bias per head is moved so that one logit of that
    head is +1e-4: a vote a bf16/fp16 gate gets wrong, and a float32 one gets right. Returns
    ``(got, want, stats, ref)``: ``{layer: (B, T, H*d)}`` twice, the handle's stats, the reference.
    """
    model = copy.deepcopy(model).to(device=device, dtype=dtype)
    policy = copy.deepcopy(policy)
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    ids, mask = (t.to(device) for t in batch("left", 3, length=12))
    inputs: dict[int, torch.Tensor] = {}
    grabs = [sites.modules[e.layer].register_forward_pre_hook(
        lambda mod, args, layer=e.layer: inputs.__setitem__(layer, args[0].detach().clone()))
        for e in policy.layers]  # fmt: skip
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for g in grabs:
        g.remove()
    for edit in policy.layers:
        x = inputs[edit.layer].reshape(-1, H, d).double().cpu()
        z = torch.einsum("nhd,hd->nh", x, edit.probe_weight.double()) + edit.probe_bias.double()
        near = torch.arange(H) * 7 % x.shape[0]  # one position per head
        edit.probe_bias = (edit.probe_bias.double() - z[near, torch.arange(H)] + 1e-4).float()

    def edited(owner: Any) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        with owner, torch.no_grad():
            for edit in policy.layers:
                module = sites.modules[edit.layer]
                grab = module.register_forward_pre_hook(  # registered last: sees the edited input
                    lambda mod, args, layer=edit.layer: out.__setitem__(layer, args[0].detach().clone()))
                module(inputs[edit.layer])
                grab.remove()
        return out

    handle = policy.attach(model, scope="all")
    got = edited(handle)
    ref = ExplicitPolicy(policy, model, scope="all")
    want = edited(ref)
    return got, want, handle.stats(), ref


def assert_within_one_ulp(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """``|got - want| <= eps(dtype) * |want|`` elementwise (one unit in the last place; 1e-6 near 0)."""
    assert got.dtype == want.dtype == dtype
    g, w = got.double().cpu(), want.double().cpu()
    bad = (g - w).abs() > torch.finfo(dtype).eps * w.abs() + 1e-6
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} values differ by more than one ulp"


def assert_same_counts(stats: dict[str, float], ref: ExplicitPolicy) -> None:
    """The handle's statistics are the reference's counts (votes and flags identical, not close)."""
    assert stats["positions"] == ref.n_in_scope
    assert stats["flag_rate"] == (ref.n_flagged / ref.n_in_scope if ref.n_in_scope else 0.0)
    assert stats["flagged_positions"] == ref.n_flagged_positions
    n_flagged = ref.n_flagged_positions
    assert stats["edited_heads"] == ref.n_edited_heads
    assert stats["edited_heads_per_flag"] == (ref.n_edited_heads / n_flagged if n_flagged else 0.0)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_hook_matches_float64_reference(llama, dtype, rule):
    """A large ``A`` (``A - I`` ~ 3, as from a near-singular covariance) and near-threshold logits."""
    policy = random_policy(llama, rule=rule, scope="all", with_A=(True, True))
    for edit in policy.layers:
        eye = torch.eye(edit.A.shape[-1])
        edit.A = eye + 8 * (edit.A - eye)
    got, want, stats, ref = half_precision_edits(llama, policy, dtype)
    for layer in want:
        assert_within_one_ulp(got[layer], want[layer], dtype)
    assert_same_counts(stats, ref)
    assert 0 < ref.n_flagged < ref.n_in_scope


@pytest.fixture
def saved(llama, tmp_path) -> Path:
    return random_policy(llama).save(tmp_path / "policy")


def test_load_corrupted_json(saved):
    (saved / "policy.json").write_text('{"format_version": 1, "method": ')
    with pytest.raises(PolicyError, match="not valid JSON"):
        Policy.load(saved)


def test_load_truncated_tensors(saved):
    data = (saved / "tensors.safetensors").read_bytes()
    (saved / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PolicyError, match="cannot be read"):
        Policy.load(saved)


@pytest.mark.parametrize("name", ["policy.json", "tensors.safetensors"])
def test_load_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(PolicyError, match="not a policy folder"):
        Policy.load(saved)
    with pytest.raises(PolicyError, match="not a policy folder"):
        Policy.load(saved.parent / "nowhere")


def test_load_unknown_format_version(saved):
    spec = json.loads((saved / "policy.json").read_text())
    spec["format_version"] = 99
    (saved / "policy.json").write_text(json.dumps(spec))
    with pytest.raises(PolicyError, match="format_version 99") as info:
        Policy.load(saved)
    assert "Refit the policy" in str(info.value)


def test_load_missing_entry(saved):
    spec = json.loads((saved / "policy.json").read_text())
    del spec["rule"]
    (saved / "policy.json").write_text(json.dumps(spec))
    with pytest.raises(PolicyError, match="missing entry"):
        Policy.load(saved)
    (saved / "policy.json").write_text("[1, 2]")
    with pytest.raises(PolicyError, match="JSON object"):
        Policy.load(saved)


def test_mismatched_model(llama, saved):
    policy = Policy.load(saved)
    other_shape = tiny_llama(0, n_layers=2)
    with pytest.raises(PolicyMismatchError, match="fitted for"):
        policy.attach(other_shape)
    with pytest.raises(PolicyMismatchError):
        Policy.load(saved, model=other_shape)
    with pytest.raises(PolicyMismatchError, match="fitted for"):
        policy.attach(tiny_gpt2())
    other_weights = tiny_llama(1)
    with pytest.raises(PolicyMismatchError, match="different weights"):
        policy.attach(other_weights)
    with pytest.raises(PolicyMismatchError, match="check_weights=False"):
        Policy.load(saved, model=other_weights)
    assert not other_weights._forward_pre_hooks  # nothing left behind by the failed attach
    Policy.load(saved, model=other_weights, check_weights=False)
    ids, mask = batch("none", 1)
    plain = logits_of(other_weights, ids, mask)
    with policy.attach(other_weights, check_weights=False, scope="all"):
        assert not torch.equal(logits_of(other_weights, ids, mask), plain)


def test_save_is_atomic(llama, saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    siblings = set(saved.parent.iterdir())

    def broken_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(policy_module, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        random_policy(llama, seed=7).save(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert set(saved.parent.iterdir()) == siblings, "a temporary folder was left behind"
    Policy.load(saved, model=llama)
    # Saving over an existing policy (no failure) replaces it and leaves nothing else.
    monkeypatch.undo()
    new = random_policy(llama, seed=7)
    new.save(saved)
    assert set(saved.parent.iterdir()) == siblings
    assert torch.equal(Policy.load(saved).layers[0].b, new.layers[0].b)


# -------------------------------------------------------------------------------------- accelerate
def test_accelerate_dispatched_model(llama):
    """A model dispatched by accelerate (hooks on every module, CPU only) is edited the same way."""
    accelerate = pytest.importorskip("accelerate")
    policy = random_policy(llama, rule="replace", scope="all")
    ids, mask = batch("left", 3)
    with policy.attach(llama):
        want = logits_of(llama, ids, mask)
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    dispatched = accelerate.dispatch_model(copy.deepcopy(llama), device_map=device_map, force_hooks=True)
    assert hasattr(find_head_sites(dispatched).modules[0], "_hf_hook")
    plain = logits_of(dispatched, ids, mask)
    with policy.attach(dispatched):
        got = logits_of(dispatched, ids, mask)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    assert torch.equal(logits_of(dispatched, ids, mask), plain)


def test_accelerate_offloaded_model(llama, tmp_path):
    """Layers offloaded to disk keep their weights on the meta device until they run."""
    accelerate = pytest.importorskip("accelerate")
    policy = random_policy(llama, rule="replace", scope="all")
    ids, mask = batch("left", 3)
    with policy.attach(llama):
        want = logits_of(llama, ids, mask)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = accelerate.dispatch_model(copy.deepcopy(llama), device_map=device_map, main_device="cpu",
                                          offload_dir=str(tmp_path))
    assert find_head_sites(offloaded).modules[0].weight.device.type == "meta"
    with policy.attach(offloaded):  # offloaded (meta) weights are skipped by the identity check
        got = logits_of(offloaded, ids, mask)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


def test_fingerprint_follows_what_the_policy_does_not_its_metadata(llama, tmp_path) -> None:
    base = random_policy(llama)
    key = base.fingerprint()
    assert key == random_policy(llama).fingerprint()  # rebuilt from the same seed: equal
    assert key == dataclasses.replace(base, meta={"other": 1}, params={"x": 2}).fingerprint()
    assert key == Policy.load(base.save(tmp_path / "p")).fingerprint()  # survives a save/load
    changed = [
        base.with_kappa(3.0),
        dataclasses.replace(base, scope="answer"),
        dataclasses.replace(base, rule="kappa-p"),
        dataclasses.replace(base, layers=[dataclasses.replace(base.layers[0], threshold=3), base.layers[1]]),
        random_policy(llama, seed=1),
    ]
    nudged = copy.deepcopy(base)
    nudged.layers[1].b[0, 0] += 1e-6  # one value of one tensor
    changed.append(nudged)
    keys = [p.fingerprint() for p in changed]
    assert key not in keys and len(set(keys)) == len(keys)
