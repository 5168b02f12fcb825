"""GPU code paths: collection, policy hooks in bf16/fp16, fitting on CUDA. Skipped without a GPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from otguard.activations import collect
from otguard.methods import get_method
from otguard.policy import LayerEdit, Policy
from otguard.sites import model_identity
from tests.reference.explicit_policy import ExplicitPolicy
from tests.tiny_models import tiny_llama, tiny_lm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class _Tok:
    """A minimal tokenizer: one token per character (enough to drive collect and generate)."""

    pad_token_id = 0
    padding_side = "right"

    def __call__(self, texts, **kwargs):
        return {"input_ids": [[1 + (ord(c) % 90) for c in t] for t in texts]}

    def pad(self, batch, return_tensors="pt"):
        ids = batch["input_ids"]
        T = max(len(x) for x in ids)
        out = torch.zeros(len(ids), T, dtype=torch.long)
        mask = torch.zeros(len(ids), T, dtype=torch.long)
        for i, x in enumerate(ids):
            if self.padding_side == "right":
                out[i, : len(x)] = torch.tensor(x)
                mask[i, : len(x)] = 1
            else:
                out[i, T - len(x) :] = torch.tensor(x)
                mask[i, T - len(x) :] = 1
        return {"input_ids": out, "attention_mask": mask}


def cuda_llama(dtype: torch.dtype) -> Any:
    """The shared tiny Llama with transformers' default init range and context, on the GPU: the same
    weights these tests were written against (the greedy runs' exact lengths depend on them)."""
    return tiny_llama(initializer_range=0.02, max_position_embeddings=2048).to("cuda", dtype)


def test_collect_on_cuda_matches_cpu() -> None:
    model = cuda_llama(torch.float32)
    texts = ["hello world", "a", "the quick brown fox"]
    gpu = collect(model, _Tok(), texts, cache=False, progress=False, dtype="float32", batch_size=2).acts
    cpu = collect(model.cpu(), _Tok(), texts, cache=False, progress=False, dtype="float32", batch_size=2).acts
    assert torch.allclose(gpu, cpu, atol=1e-4)


@contextmanager
def hooks_fail_on_sync(removables: list[Any]) -> Iterator[None]:
    """Run the given hooks (a policy handle's ``_handles``: the top-level one and each layer's) with
    CUDA's sync debug mode set to "error", so that any host sync inside them raises; the rest of
    ``generate`` (whose stopping criteria read a flag from the device every step) runs unchecked."""

    def strict(fn: Any) -> Any:
        def hook(*args: Any, **kwargs: Any) -> Any:
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        return hook

    swapped = []
    for removable in removables:
        hooks = removable.hooks_dict_ref()
        swapped.append((hooks, removable.id, hooks[removable.id]))
        hooks[removable.id] = strict(hooks[removable.id])
    try:
        yield
    finally:
        for hooks, key, fn in swapped:
            if key in hooks:
                hooks[key] = fn


def test_sync_check_catches_a_syncing_hook() -> None:
    """The check above is live: a hook that reads a value to the host fails the call."""
    model = cuda_llama(torch.float32)
    ident = model_identity(model)
    edit = LayerEdit(layer=0, probe_weight=torch.ones(4, 8), probe_bias=torch.zeros(4), threshold=None,
                     head_mask=torch.ones(4, dtype=torch.bool), b=torch.ones(4, 8))  # fmt: skip
    policy = Policy("test", "shift", [edit], ident, scope="all")
    ids = torch.randint(1, 100, (2, 5), device="cuda")
    module = model.model.layers[0].self_attn.o_proj
    with policy.attach(model) as handle:
        with hooks_fail_on_sync(handle._handles):
            model(ids)  # the policy's hooks alone: no sync

        def reads_to_host(mod: Any, args: tuple[Any, ...]) -> None:
            args[0].sum().item()

        syncing = module.register_forward_pre_hook(reads_to_host)
        try:
            checked = [*handle._handles, syncing]
            with hooks_fail_on_sync(checked), pytest.raises(RuntimeError, match="synchroniz"):
                model(ids)
        finally:
            syncing.remove()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_policy_hook_in_generate_half_precision_without_host_sync(dtype: torch.dtype) -> None:
    model = cuda_llama(dtype)
    ident = model_identity(model)
    g = torch.Generator().manual_seed(0)
    H, d = 4, 8
    edit = LayerEdit(
        layer=1,
        probe_weight=torch.randn(H, d, generator=g),
        probe_bias=torch.full((H,), 5.0),
        threshold=1,
        head_mask=torch.ones(H, dtype=torch.bool),
        b=torch.randn(H, d, generator=g),
        A=torch.eye(d).expand(H, d, d) * 0.5,
    )
    policy = Policy("test", "kappa-p", [edit], ident, kappa=2.0)
    ids = torch.randint(1, 100, (3, 7), device="cuda")
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    plain_logits = model(ids).logits
    plain = model.generate(ids, **kw)
    with policy.attach(model) as handle:
        assert len(handle._handles) == 1 + len(policy.layers)  # the top-level hook and the layer's
        with hooks_fail_on_sync(handle._handles):
            out = model.generate(ids, **kw)
        stats = handle.stats()
    with ExplicitPolicy(policy, model) as ref:
        want = model.generate(ids, **kw)
    assert out.shape == (3, 12)
    # One edited layer x 3 rows x (the last prompt token + the 4 generated tokens fed back).
    assert stats["positions"] == ref.n_in_scope == 3 * 5
    assert stats["flag_rate"] == 1.0 and stats["edited_heads_per_flag"] == 4.0  # bias +5: every head votes
    assert ref.n_flagged == 15 and ref.n_edited_heads == 60
    assert torch.equal(out, want)
    assert not torch.equal(out, plain)
    assert torch.equal(model(ids).logits, plain_logits)  # detached


@pytest.mark.parametrize("rule", ["replace", "kappa-p", "shift"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_hook_on_cuda_matches_float64_reference(dtype: torch.dtype, rule: str) -> None:
    """As tests/unit/test_policy.py on the CPU: within one ulp of the float64 reference, same votes."""
    from tests.unit.test_policy import (
        assert_same_counts,
        assert_within_one_ulp,
        half_precision_edits,
        random_policy,
    )
    from tests.unit.test_policy import tiny_llama as cpu_llama

    model = cpu_llama(0)
    policy = random_policy(model, rule=rule, scope="all", with_A=(True, True))
    for layer_edit in policy.layers:
        eye = torch.eye(layer_edit.A.shape[-1])
        layer_edit.A = eye + 8 * (layer_edit.A - eye)
    got, want, stats, ref = half_precision_edits(model, policy, dtype, device="cuda")
    for layer in want:
        assert got[layer].device.type == "cuda"
        assert_within_one_ulp(got[layer], want[layer], dtype)
    assert_same_counts(stats, ref)
    assert 0 < ref.n_flagged < ref.n_in_scope


def test_hook_forward_has_no_host_sync() -> None:
    model = cuda_llama(torch.float32)
    ident = model_identity(model)
    H, d = 4, 8
    edit = LayerEdit(
        layer=0,
        probe_weight=torch.ones(H, d),
        probe_bias=torch.zeros(H),
        threshold=2,
        head_mask=torch.ones(H, dtype=torch.bool),
        b=torch.ones(H, d),
        A=torch.eye(d).expand(H, d, d),
    )
    policy = Policy("test", "replace", [edit], ident, scope="all")
    ids = torch.randint(1, 100, (2, 5), device="cuda")
    with policy.attach(model):
        model(ids)  # warm-up
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.model.layers[0].self_attn.o_proj(torch.randn(2, 5, H * d, device="cuda"))
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_fit_methods_on_cuda_activations() -> None:
    from otguard.activations import ActivationSet
    from otguard.sites import ModelIdentity

    L, H, d, n = 2, 4, 8, 240
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.randn(n, L, H, d, generator=g)
    x[:, 1] += y[:, None, None] * torch.randn(H, d, generator=g)
    ident = ModelIdentity("tiny", "llama", L, H, 2, d, 32, "")
    acts = ActivationSet(x, y, torch.arange(n) // 2, {"model": ident.to_dict()})
    idx = np.arange(n)
    train, val = idx[idx % 10 < 8], idx[idx % 10 >= 8]
    for name in ("radiant", "slim"):
        policy = get_method(name, epochs=50, progress=False, device="cuda").fit(acts, train, val).policy_
        assert torch.isfinite(policy.layers[0].A).all()


def test_evaluation_decoding_on_cuda_matches_cpu() -> None:
    """Greedy answers (row-dropping decoder), seeded sampling and perplexity on CUDA: same as on CPU."""
    import copy

    from otguard.evaluation.toxicity_gen import continuation_perplexity, sample_continuations
    from otguard.evaluation.truthfulqa_gen import generate_answers
    from tests.unit.test_truthfulqa_mc import always_on_policy, gpt2_style

    tok = gpt2_style()
    cpu = tiny_lm("llama", len(tok), tok.pad_token_id).double()
    gpu = copy.deepcopy(cpu).to("cuda")
    questions = ["Where is Paris?", "What is 1 + 1?", "Is the sky blue?", "What happens if you say hello?"]
    kw = dict(max_new_tokens=8, batch_size=3, progress=False)
    assert generate_answers(gpu, tok, questions, **kw) == generate_answers(cpu, tok, questions, **kw)
    policy = always_on_policy(cpu)
    with_policy = generate_answers(gpu, tok, questions, policy=policy, **kw)
    assert with_policy == generate_answers(cpu, tok, questions, policy=policy, **kw)

    prompts = ["- Paris is in France.\n-", "hello hello"]
    a = sample_continuations(gpu, tok, prompts, n=3, max_new_tokens=5, seed=3, batch_size=2)
    b = sample_continuations(gpu, tok, prompts, n=3, max_new_tokens=5, seed=3, batch_size=2)
    assert a.token_ids == b.token_ids and all(len(per) == 3 for per in a.token_ids)
    ppl_gpu = continuation_perplexity(gpu, a.prompt_ids, a.token_ids, pad_id=tok.pad_token_id)
    ppl_cpu = continuation_perplexity(cpu, a.prompt_ids, a.token_ids, pad_id=tok.pad_token_id)
    np.testing.assert_allclose(ppl_gpu, ppl_cpu, rtol=1e-6)


def test_sampling_and_drift_in_bf16_on_cuda() -> None:
    from otguard.evaluation.drift import measure_drift_many
    from otguard.evaluation.toxicity_gen import sample_continuations
    from tests.unit.test_truthfulqa_mc import always_on_policy, gpt2_style

    tok = gpt2_style()
    model = tiny_lm("llama", len(tok), tok.pad_token_id).to("cuda", torch.bfloat16)
    policy = always_on_policy(model)
    s = sample_continuations(model, tok, ["- a b c\n-", "hello"], policy=policy, n=2, max_new_tokens=4)
    assert s.flag_rate == pytest.approx(1.0) and all(len(ids) == 4 for per in s.token_ids for ids in per)
    tok.padding_side = "right"
    docs = ["hello hello world", "Paris is in France."]
    drift = measure_drift_many(model, tok, docs, {"p": policy, "none": None}, max_tokens=16)
    assert drift["none"].kl == 0.0 and drift["p"].kl > 0.0 and np.isfinite(drift["p"].ce)
