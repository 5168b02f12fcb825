"""collect(..., prefix=...): texts read after a shared context (the generation prompt's instruction + primer).

References are computed here, independently of otguard's cache path: one unbatched forward per text of
the whole string ``prefix + text`` (no KV cache, no padding), with this test's own pre-hooks, read at
the text's last token or averaged over the text's tokens (those after the longest common token prefix
with the prefix's own tokenization).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import otguard.activations as activations
from otguard.activations import CACHE_FORMAT, cache_key, collect
from otguard.data import TextDataset, truthfulqa_items, truthfulqa_mc2
from otguard.data.truthfulqa import GENERATION_TEMPLATE
from otguard.errors import DataError, UsageError
from otguard.evaluation.truthfulqa_mc import answer_span
from otguard.prompts import qa_prefix, qa_prompt
from otguard.sites import find_head_sites, model_identity
from tests.tiny_models import WORD_VOCAB, WORDS, tiny_gemma2, tiny_gpt2, tiny_llama, word_tokenizer
from tests.unit.test_truthfulqa_mc import gpt2_style, qwen_style

torch.set_num_threads(1)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"

# name -> builder (float32): RoPE + GQA, absolute positions + Conv1D, a sliding window (16 tokens)
# shorter than the prefix
BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "llama": functools.partial(tiny_llama, vocab_size=WORD_VOCAB, head_dim=16, max_position_embeddings=128),
    "gpt2": functools.partial(tiny_gpt2, vocab_size=WORD_VOCAB, n_positions=128),
    "gemma2": functools.partial(
        tiny_gemma2, vocab_size=WORD_VOCAB, max_position_embeddings=128, sliding_window=16
    ),  # fmt: skip
}
PREFIX = " ".join(WORDS[40:70]) + " "  # 30 words, ends at a word boundary: no merge across it


@functools.cache
def _build(name: str) -> nn.Module:
    return BUILDERS[name](seed=0, attn_implementation="eager" if name == "gemma2" else "sdpa")


@pytest.fixture(params=list(BUILDERS))
def tiny(request: pytest.FixtureRequest) -> nn.Module:
    return _build(request.param)


def texts(n: int = 13, seed: int = 0) -> list[str]:
    """``n`` texts of 1..20 words (lengths vary, so the batches are padded)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS[:40], k=rng.randint(1, 20))) for _ in range(n)]


def dataset(items: list[str]) -> TextDataset:
    groups = [i // 2 for i in range(len(items))]
    return TextDataset("tiny", tuple(items), np.array([i % 2 for i in range(len(items))]), np.array(groups),
                       tuple(map(str, range(max(groups) + 1))))  # fmt: skip


def run(model: nn.Module, items: Any, **kwargs: Any) -> activations.ActivationSet:
    kwargs = {"dtype": "float32", "cache": False, "progress": False, **kwargs}
    return collect(model, word_tokenizer(), items, **kwargs)


@torch.no_grad()
def reference(model: nn.Module, prefix: str, items: list[str], positions: str) -> torch.Tensor:
    """(N, L, H, d) from one whole forward of ``prefix + text`` per text, read at the text's tokens."""
    tok = word_tokenizer()
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    seen: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, l=l: seen.__setitem__(l, args[0][0].clone()))
               for l, m in enumerate(sites.modules)]  # fmt: skip
    prefix_ids = tok(prefix)["input_ids"]
    rows = []
    try:
        for text in items:
            ids = tok(prefix + text)["input_ids"]
            start = next((i for i, (a, b) in enumerate(zip(ids, prefix_ids, strict=False)) if a != b),
                         len(prefix_ids))  # fmt: skip
            model(input_ids=torch.tensor([ids]), use_cache=False)
            layers = sorted(seen)
            per_layer = [seen[l][-1] if positions == "last" else seen[l][start:].mean(0) for l in layers]
            rows.append(torch.stack(per_layer).view(len(per_layer), H, d))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(rows)


# ---------------------------------------------------------------- what is collected
@pytest.mark.parametrize("positions", ["last", "mean"])
def test_prefix_matches_whole_text_without_cache(tiny: nn.Module, positions: str) -> None:
    items = texts()
    got = run(tiny, dataset(items), prefix=PREFIX, positions=positions, batch_size=4)
    want = reference(tiny, PREFIX, items, positions)
    torch.testing.assert_close(got.acts, want, rtol=0, atol=1e-5)
    if positions == "last":  # the same as the plain collection of the whole strings (no cache, left-aligned)
        whole = run(tiny, [PREFIX + t for t in items], batch_size=4)
        torch.testing.assert_close(got.acts, whole.acts, rtol=0, atol=1e-5)
    # and not the text read without its context
    alone = run(tiny, items, positions=positions)
    assert (got.acts - alone.acts).abs().amax() > 1e-2


def test_prefix_results_do_not_depend_on_batching(tiny: nn.Module) -> None:
    data = dataset(texts(9, seed=3))
    a = run(tiny, data, prefix=PREFIX, batch_size=1)
    b = run(tiny, data, prefix=PREFIX, batch_size=8, max_batch_tokens=100)
    torch.testing.assert_close(a.acts, b.acts, rtol=0, atol=1e-5)
    assert torch.equal(a.labels, torch.tensor(data.labels.tolist())) and torch.equal(a.groups, b.groups)


def test_texts_merging_across_the_prefix_run_whole() -> None:
    # Without the trailing space, "w69" + "w3" is one unknown word: the text's tokens start where the
    # whole string's tokens leave the prefix's (at the <unk>), and it runs without the prefix cache.
    model = _build("llama")
    prefix = PREFIX.rstrip()
    items = [" " + t if i % 2 else t for i, t in enumerate(texts(8, seed=5))]
    tok = word_tokenizer()
    prefix_ids, rows = activations._encode_in_context(tok, prefix, items, None, 128)
    assert [r.on_prefix for r in rows] == [bool(i % 2) for i in range(8)]
    assert all(r.start == len(prefix_ids) - 1 for r in rows if not r.on_prefix)
    for positions in ("last", "mean"):
        got = run(model, items, prefix=prefix, positions=positions, batch_size=3)
        torch.testing.assert_close(got.acts, reference(model, prefix, items, positions), rtol=0, atol=1e-5)


def test_trailing_special_tokens_are_not_the_text() -> None:
    class WithEos:  # a tokenizer that appends </s> (2) to everything
        def __init__(self) -> None:
            self.tok = word_tokenizer()
            self.all_special_ids = self.tok.all_special_ids

        def __call__(self, text: Any, **kwargs: Any) -> dict[str, Any]:
            out = self.tok(text, **kwargs)["input_ids"]
            return {"input_ids": [ids + [2] for ids in out] if isinstance(text, list) else out + [2]}

    tok = word_tokenizer()
    prefix_ids, rows = activations._encode_in_context(WithEos(), PREFIX, ["w1 w2"], None, None)
    assert prefix_ids == tok(PREFIX)["input_ids"]  # <s> w40 ... w69, no </s>
    assert rows[0].on_prefix and rows[0].ids == tok("w1 w2", add_special_tokens=False)["input_ids"]


def test_max_length_counts_the_texts_tokens_and_the_context_is_checked() -> None:
    model = _build("llama")
    items = ["w1 w2 w3 w4 w5 w6", "w7 w8"]
    got = run(model, items, prefix=PREFIX, max_length=3)
    want = reference(model, PREFIX, ["w1 w2 w3", "w7 w8"], "last")
    torch.testing.assert_close(got.acts, want, rtol=0, atol=1e-5)
    long_prefix = " ".join(WORDS[:50] * 3) + " "  # 150 words > 128 positions
    with pytest.raises(DataError, match="longer than the model's context of 128"):
        run(model, items, prefix=long_prefix)


def test_bad_prefix_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="prefix must be a non-empty string"):
        run(_build("llama"), ["w1"], prefix="")


# ---------------------------------------------------------------- the cache
def test_cache_key_without_prefix_is_unchanged() -> None:
    identity = model_identity(_build("llama"))
    payload = {"format": CACHE_FORMAT, "model": identity.fingerprint(), "data": "abc", "positions": "last",
               "dtype": "float16", "max_length": None}  # fmt: skip
    old = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    assert cache_key(identity, "abc", "last", "float16", None) == old
    assert cache_key(identity, "abc", "last", "float16", None, None) == old
    with_prefix = cache_key(identity, "abc", "last", "float16", None, "Q: ")
    assert with_prefix != old and with_prefix != cache_key(identity, "abc", "last", "float16", None, "Q:  ")


def test_cache_entries_are_keyed_by_the_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _build("llama")
    data = dataset(texts(5))
    calls = {"plain": 0, "context": 0}
    plain, in_context = activations._run, activations._run_in_context

    def count(kind: str, inner: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
            calls[kind] += 1
            return inner(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(activations, "_run", count("plain", plain))
    monkeypatch.setattr(activations, "_run_in_context", count("context", in_context))
    first = run(model, data, cache=tmp_path)
    a = run(model, data, cache=tmp_path, prefix=PREFIX)
    b = run(model, data, cache=tmp_path, prefix="w80 " + PREFIX)
    assert calls == {"plain": 1, "context": 2}
    keys = {first.meta["cache_key"], a.meta["cache_key"], b.meta["cache_key"]}
    assert len(keys) == 3 and sorted(p.name for p in (tmp_path / "activations").iterdir()) == sorted(keys)
    assert "prefix" not in first.meta and a.meta["prefix"] == PREFIX
    again = run(model, data, cache=tmp_path, prefix=PREFIX)  # served from its own entry
    assert calls == {"plain": 1, "context": 2} and torch.equal(again.acts, a.acts) and again.meta == a.meta


# ---------------------------------------------------------------- TruthfulQA in the generation format
@pytest.mark.parametrize("builder", [gpt2_style, qwen_style], ids=["gpt2", "qwen"])
def test_truthfulqa_generation_texts_tokenize_as_the_gate_prompt(builder: Callable[[], Any]) -> None:
    tok = builder()
    bank = truthfulqa_mc2(FIXTURES)
    gen = truthfulqa_mc2(FIXTURES, context="generation")
    assert gen.name == "truthfulqa-mc2-generation" and len(gen) == len(bank) == 8
    assert np.array_equal(gen.labels, bank.labels) and np.array_equal(gen.groups, bank.groups)
    items = truthfulqa_items(FIXTURES)
    assert gen.texts[1] == "\n\nQ: What colour is the sky on a clear day?\nA: It is blue."
    prefix_ids, rows = activations._encode_in_context(tok, qa_prefix(), list(gen.texts), None, None)
    for text, group, row in zip(gen.texts, gen.groups, rows, strict=True):
        question = items[group].question
        answer = text.split("\nA: ", 1)[1]
        assert text == GENERATION_TEMPLATE.format(question=question, answer=answer)
        # what the gate teacher-forces: the generation prompt, then " " + the answer
        ids, start = answer_span(tok, qa_prompt(question), " " + answer)
        collected = (prefix_ids + row.ids) if row.on_prefix else row.ids
        assert collected == ids
        assert start > (len(prefix_ids) if row.on_prefix else row.start)  # the answer is inside the text
    # the Qwen-style tokenizer merges "." of the primer with "\n\n": those texts run whole
    assert all(r.on_prefix for r in rows) == (builder is gpt2_style)


def test_truthfulqa_context_arguments_are_checked() -> None:
    with pytest.raises(DataError, match="context must be 'bank' or 'generation'"):
        truthfulqa_mc2(FIXTURES, context="chat")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="leave template at its default"):
        truthfulqa_mc2(FIXTURES, template="{question} {answer}", context="generation")
