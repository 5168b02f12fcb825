"""collect(): batching, padding, positions, the on-disk cache and its atomicity, on tiny random models.

References are computed here, independently of otguard: one unbatched, unpadded forward per text
through the full causal LM, with the test's own pre-hook on the known projection path.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import otguard.activations as activations
from otguard.activations import ActivationSet, collect, last_token_index, position_ids_from_mask
from otguard.data import TextDataset
from otguard.errors import DataError
from tests.tiny_models import WORD_VOCAB, WORDS, tiny_gpt2, tiny_llama, word_tokenizer

# model name -> (builder, path of the per-head projection in layer {l}, heads, head_dim)
TINY: dict[str, tuple[Callable[..., nn.Module], str, int, int]] = {
    # GQA, head_dim 16 != 32 / 4
    "llama": (
        functools.partial(tiny_llama, vocab_size=WORD_VOCAB, head_dim=16, max_position_embeddings=64),
        "model.layers.{l}.self_attn.o_proj",
        4,
        16,
    ),
    # absolute positions + Conv1D projection
    "gpt2": (
        functools.partial(tiny_gpt2, vocab_size=WORD_VOCAB, n_positions=64),
        "transformer.h.{l}.attn.c_proj",
        4,
        8,
    ),
}
MODELS = list(TINY)


@functools.cache
def _build(name: str, seed: int = 0) -> nn.Module:
    return TINY[name][0](seed=seed, attn_implementation="sdpa")


def texts(n: int = 21, seed: int = 0, template: str = "{}") -> list[str]:
    """``n`` texts of 1..20 words (lengths vary, so batches are padded)."""
    rng = random.Random(seed)
    return [template.format(" ".join(rng.choices(WORDS, k=rng.randint(1, 20)))) for _ in range(n)]


def dataset(items: list[str], labels: list[int] | None = None) -> TextDataset:
    labels = labels if labels is not None else [i % 2 for i in range(len(items))]
    groups = [i // 3 for i in range(len(items))]
    return TextDataset(
        "tiny", tuple(items), np.array(labels), np.array(groups), tuple(map(str, range(max(groups) + 1)))
    )


@pytest.fixture(params=MODELS)
def tiny(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, _build(request.param)


@torch.no_grad()
def reference(name: str, model: nn.Module, items: list[str], positions: str) -> torch.Tensor:
    """(N, L, H, d) from one unpadded forward per text, read by this test's own pre-hooks."""
    _, path, H, d = TINY[name]
    tok = word_tokenizer()
    L = model.config.num_hidden_layers
    seen: dict[int, torch.Tensor] = {}
    handles = [
        model.get_submodule(path.format(l=l)).register_forward_pre_hook(
            lambda m, args, l=l: seen.__setitem__(l, args[0][0].detach().clone())  # (T, H*d)
        )
        for l in range(L)
    ]
    rows = []
    try:
        for text in items:
            seen.clear()
            model(
                input_ids=tok(text, add_special_tokens=True, return_tensors="pt")["input_ids"],
                use_cache=False,
            )
            per_layer = [seen[l][-1] if positions == "last" else seen[l].mean(0) for l in range(L)]
            rows.append(torch.stack(per_layer).view(L, H, d))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(rows)


def run(model: nn.Module, items: Any, **kwargs: Any) -> ActivationSet:
    kwargs = {"dtype": "float32", "cache": False, "progress": False, **kwargs}
    tok = kwargs.pop("tokenizer", None) or word_tokenizer()
    return collect(model, tok, items, **kwargs)


# ---------------------------------------------------------------- what is collected


@pytest.mark.parametrize("positions", ["last", "mean"])
def test_matches_unbatched_reference(tiny: tuple[str, nn.Module], positions: str) -> None:
    name, model = tiny
    items = texts()
    got = run(model, items, positions=positions, batch_size=8)
    _, _, H, d = TINY[name]
    assert got.acts.shape == (len(items), 2, H, d) and got.acts.dtype == torch.float32
    torch.testing.assert_close(got.acts, reference(name, model, items, positions), rtol=1e-4, atol=1e-5)


def test_last_and_mean_differ(tiny: tuple[str, nn.Module]) -> None:
    _, model = tiny
    items = texts()
    last, mean = run(model, items, positions="last").acts, run(model, items, positions="mean").acts
    assert (last - mean).abs().max() > 1e-2


def test_batch_size_does_not_change_results(tiny: tuple[str, nn.Module]) -> None:
    _, model = tiny
    items = texts()
    one = run(model, items, batch_size=1).acts
    for batch_size in (5, 16):
        torch.testing.assert_close(run(model, items, batch_size=batch_size).acts, one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positions", ["last", "mean"])
def test_padding_side_does_not_change_results(tiny: tuple[str, nn.Module], positions: str) -> None:
    _, model = tiny
    items = texts()
    right = run(model, items, batch_size=16, positions=positions, tokenizer=word_tokenizer("right")).acts
    left = run(model, items, batch_size=16, positions=positions, tokenizer=word_tokenizer("left")).acts
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-5)


def test_rows_follow_input_order_and_carry_labels_and_groups(tiny: tuple[str, nn.Module]) -> None:
    """collect sorts by length internally; the output must still be in input order."""
    _, model = tiny
    items = texts()
    data = dataset(items)
    got = run(model, data, batch_size=4)
    assert torch.equal(got.labels, torch.tensor(data.labels))
    assert torch.equal(got.groups, torch.tensor(data.groups))
    reversed_ = run(model, items[::-1], batch_size=4)
    torch.testing.assert_close(reversed_.acts, got.acts.flip(0), rtol=1e-4, atol=1e-5)
    assert got.meta["dataset"] == "tiny" and got.meta["data_fingerprint"] == data.fingerprint()


def test_float16_storage_is_close_to_float32(tiny: tuple[str, nn.Module]) -> None:
    _, model = tiny
    items = texts(8)
    half = run(model, items, dtype="float16")
    assert half.acts.dtype == torch.float16
    full = run(model, items, dtype="float32").acts
    torch.testing.assert_close(half.acts.float(), full, rtol=2e-3, atol=2e-3)


def test_hooks_are_removed_after_collect(tiny: tuple[str, nn.Module]) -> None:
    name, model = tiny
    input_ids = word_tokenizer()(texts(1), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=input_ids).logits
    run(model, texts(4))
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids).logits, before)
    for l in range(2):
        assert not model.get_submodule(TINY[name][1].format(l=l))._forward_pre_hooks


# ---------------------------------------------------------------- helpers and errors


def test_last_token_index_for_left_and_right_padding() -> None:
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert position_ids_from_mask(left).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    assert position_ids_from_mask(right)[0, :3].tolist() == [0, 1, 2]


def test_empty_input_is_a_data_error(tiny: tuple[str, nn.Module]) -> None:
    _, model = tiny
    with pytest.raises(DataError):
        run(model, [])
    with pytest.raises(DataError):
        run(model, TextDataset("empty", (), np.array([], dtype=np.int64), np.array([], dtype=np.int64), ()))
    with pytest.raises(DataError, match="single string"):
        run(model, "w1 w2")


def test_text_with_no_tokens_is_a_data_error(tiny: tuple[str, nn.Module]) -> None:
    _, model = tiny
    tok = word_tokenizer()
    tok._tokenizer.post_processor = None  # no <s>: "" becomes zero tokens
    with pytest.raises(DataError, match="zero tokens"):
        run(model, ["w1 w2", ""], tokenizer=tok)


def test_bad_arguments_raise_before_work(tiny: tuple[str, nn.Module]) -> None:
    _, model = tiny
    with pytest.raises(ValueError, match="positions"):
        run(model, texts(2), positions="first")
    with pytest.raises(ValueError, match="dtype"):
        run(model, texts(2), dtype="int8")
    with pytest.raises(ValueError, match="batch_size"):
        run(model, texts(2), batch_size=0)


# ---------------------------------------------------------------- save / load and the cache


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = _build("llama")
    got = run(model, dataset(texts(6)), dtype="float16")
    folder = got.save(tmp_path / "acts")
    # the marker says what wrote the folder, so `collect --out` may update it and `fit --out` refuses it
    names = sorted(p.name for p in folder.iterdir())
    assert names == [".otguard-output", "activations.safetensors", "meta.json"]
    assert json.loads((folder / ".otguard-output").read_text()) == {"kind": "activations"}
    back = ActivationSet.load(folder)
    assert back.acts.dtype == torch.float16
    assert torch.equal(back.acts, got.acts)
    assert torch.equal(back.labels, got.labels) and torch.equal(back.groups, got.groups)
    assert back.meta == got.meta
    assert back.model == got.model and back.model is not None
    assert (back.n_layers, back.n_heads, back.head_dim, len(back)) == (2, 4, 16, 6)
    with pytest.raises(DataError, match="not an activation folder"):
        ActivationSet.load(tmp_path / "nowhere")


class _CountingRun:
    """Wraps ``activations._run``; counts real collections."""

    def __init__(self) -> None:
        self.calls = 0
        self.inner = activations._run

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return self.inner(*args, **kwargs)


def _entries(root: Path) -> list[str]:
    folder = root / "activations"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_second_collect_loads_from_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = _build("llama")
    data = dataset(texts(6))
    first = run(model, data, cache=tmp_path)
    (key,) = _entries(tmp_path)
    assert first.meta["cache_key"] == key

    def no_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("recomputed although the activations are cached")

    monkeypatch.setattr(activations, "_run", no_run)
    with caplog.at_level(logging.INFO, logger="otguard.activations"):
        second = run(model, data, cache=tmp_path)
    assert "loaded from cache" in caplog.text
    assert torch.equal(second.acts, first.acts) and torch.equal(second.labels, first.labels)
    assert second.meta == first.meta
    # the same texts as a plain list are another data set (no labels): not served from this entry
    with pytest.raises(AssertionError, match="recomputed"):
        run(model, list(data.texts), cache=tmp_path)


def test_cache_key_changes_with_texts_labels_positions_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _build("llama")
    counter = _CountingRun()
    monkeypatch.setattr(activations, "_run", counter)
    items = texts(6)
    base = dataset(items)
    variants = [
        dict(data=base),
        dict(data=dataset(texts(6, template="Q: {}"))),  # a template change
        dict(data=dataset(items, labels=[1 - (i % 2) for i in range(6)])),  # labels
        dict(data=base, positions="mean"),
        dict(data=base, dtype="float16"),
        dict(data=base, max_length=4),
    ]
    for i, variant in enumerate(variants, start=1):
        kwargs = dict(variant)
        run(model, kwargs.pop("data"), cache=tmp_path, **kwargs)
        assert counter.calls == i, f"variant {variant} was served from another variant's cache"
    assert len(_entries(tmp_path)) == len(variants)
    for variant in variants:  # and each is now cached
        kwargs = dict(variant)
        run(model, kwargs.pop("data"), cache=tmp_path, **kwargs)
    assert counter.calls == len(variants)


def test_other_model_weights_do_not_hit_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _build("llama")
    data = dataset(texts(4))
    counter = _CountingRun()
    monkeypatch.setattr(activations, "_run", counter)
    run(model, data, cache=tmp_path)
    other = _build("llama", seed=1)
    run(other, data, cache=tmp_path)
    assert counter.calls == 2


def test_interrupted_collect_leaves_no_cache_folder(tmp_path: Path) -> None:
    model = _build("llama")
    data = dataset(texts(12))
    calls = {"n": 0}

    def interrupt_second_batch(module: nn.Module, args: Any, out: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    handle = model.model.layers[1].register_forward_hook(interrupt_second_batch)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(model, data, cache=tmp_path, batch_size=4)
    finally:
        handle.remove()
    assert calls["n"] == 2
    assert _entries(tmp_path) == []
    assert not model.model.layers[0].self_attn.o_proj._forward_pre_hooks  # collect's hooks are gone
    # the next run computes and caches normally
    got = run(model, data, cache=tmp_path, batch_size=4)
    assert _entries(tmp_path) == [got.meta["cache_key"]]


def test_interrupted_cache_write_leaves_no_partial_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _build("llama")
    data = dataset(texts(4))
    real_save_file = activations.save_file

    def save_then_interrupt(
        tensors: dict[str, torch.Tensor], filename: str, *args: Any, **kwargs: Any
    ) -> None:
        real_save_file(tensors, filename, *args, **kwargs)  # a file is written, then the user hits ^C
        raise KeyboardInterrupt

    monkeypatch.setattr(activations, "save_file", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(model, data, cache=tmp_path)
    assert _entries(tmp_path) == []  # neither the final folder nor a temporary one
    monkeypatch.setattr(activations, "save_file", real_save_file)
    counter = _CountingRun()
    monkeypatch.setattr(activations, "_run", counter)
    run(model, data, cache=tmp_path)
    assert counter.calls == 1 and len(_entries(tmp_path)) == 1
