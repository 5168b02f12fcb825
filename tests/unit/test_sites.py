"""Head sites on tiny random models of every family in the site table.

The claim under test: the input of each layer's attention output projection, reshaped to
``(B, T, H, d)``, holds head ``h`` at ``[..., h, :]``. Three independent checks:

- editing head ``h`` in a pre-hook equals editing ``W_O``'s input block of head ``h`` (zeroing it,
  or adding ``W_O[:, h·d:(h+1)·d] Δ`` to the projection output);
- at the first token, attention attends only to itself, so head ``h``'s slice must equal the
  value vector of its KV head, read from the model's own value projection: this catches a wrong
  head order, a wrong ``head_dim`` or a wrong GQA grouping, which the ``W_O`` checks cannot;
- the geometry read from the config (``n_heads``, ``n_kv_heads``, ``head_dim``) is right, including a
  ``head_dim`` that differs from ``hidden / heads`` (Llama, Qwen3, Gemma style).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from otguard import sites as sites_module
from otguard.errors import PolicyMismatchError, UnsupportedArchitectureError
from otguard.sites import find_head_sites, model_identity, register_site, supported_model_types
from tests.tiny_models import GPT2, LLAMA, OPT, VOCAB, tiny_causal_lm, tiny_llama

V = VOCAB  # vocabulary
D = LLAMA["hidden_size"]  # hidden size (32)
H = LLAMA["num_attention_heads"]  # query heads (4)
L = LLAMA["num_hidden_layers"]  # layers (2)

# The shared tiny configs without their head geometry, so that each family below sets its own
# (head_dim defaults to D / H = 8), and with a 64-token context.
_DECODER = {k: v for k, v in LLAMA.items() if k not in ("head_dim", "num_key_value_heads")}
_DECODER["max_position_embeddings"] = 64
_GQA = dict(_DECODER, num_key_value_heads=2)
_GPT = {k: v for k, v in GPT2.items() if k != "pad_token_id"}
_GPT["n_positions"] = 64


def _split_v(out: torch.Tensor, start: int, k: int, d: int) -> torch.Tensor:
    """Value heads ``(B, T, K, d)`` from a projection output whose values start at ``start``."""
    return out[..., start : start + k * d].unflatten(-1, (k, d))


@dataclass(frozen=True)
class Family:
    """A tiny config of one architecture and what ``find_head_sites`` must read from it.

    ``values``: (module path inside a layer, function (its output, K, d) -> (B, T, K, d)): where the
    model computes its value vectors, for the first-token check.
    """

    model_type: str
    config: dict[str, Any]
    n_kv_heads: int
    head_dim: int
    values: tuple[str, Callable[[torch.Tensor, int, int], torch.Tensor]]


def _v_proj(path: str = "self_attn.v_proj") -> tuple[str, Callable[[torch.Tensor, int, int], torch.Tensor]]:
    return path, lambda out, k, d: out.unflatten(-1, (k, d))


FAMILIES: dict[str, Family] = {
    # head_dim 16 != 32 / 4: H*d = 64 is wider than the hidden size
    "llama": Family("llama", dict(_GQA, head_dim=16), 2, 16, _v_proj()),
    "mistral": Family("mistral", dict(_GQA, sliding_window=None), 2, 8, _v_proj()),
    "mixtral": Family("mixtral", dict(_GQA, num_local_experts=4, num_experts_per_tok=2), 2, 8, _v_proj()),
    "qwen2": Family("qwen2", _GQA, 2, 8, _v_proj()),
    "qwen2_moe": Family(
        "qwen2_moe",
        dict(
            _GQA,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
        ),
        2,
        8,
        _v_proj(),
    ),
    "qwen3": Family("qwen3", dict(_GQA, head_dim=16), 2, 16, _v_proj()),
    "qwen3_moe": Family(
        "qwen3_moe",
        dict(_GQA, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
        2,
        16,
        _v_proj(),
    ),
    "gemma": Family("gemma", dict(_GQA, head_dim=16), 2, 16, _v_proj()),
    "gemma2": Family(
        "gemma2", dict(_GQA, head_dim=16, query_pre_attn_scalar=16, sliding_window=8), 2, 16, _v_proj()
    ),
    "gemma3_text": Family(
        "gemma3_text", dict(_GQA, head_dim=16, query_pre_attn_scalar=16, sliding_window=8), 2, 16, _v_proj()
    ),
    "phi3": Family(
        "phi3", _GQA, 2, 8, ("self_attn.qkv_proj", lambda out, k, d: _split_v(out, H * d + k * d, k, d))
    ),
    "olmo": Family("olmo", _GQA, 2, 8, _v_proj()),
    "olmo2": Family("olmo2", _GQA, 2, 8, _v_proj()),
    "granite": Family("granite", _GQA, 2, 8, _v_proj()),
    "starcoder2": Family(
        "starcoder2", dict(_GQA, residual_dropout=0.0, embedding_dropout=0.0), 2, 8, _v_proj()
    ),
    "cohere": Family("cohere", _GQA, 2, 8, _v_proj()),
    "stablelm": Family("stablelm", _GQA, 2, 8, _v_proj()),
    "smollm3": Family("smollm3", _GQA, 2, 8, _v_proj()),
    "phi": Family(
        "phi", dict(_GQA, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0), 2, 8, _v_proj()
    ),
    # c_attn output is [q | k | v], each H*d wide
    "gpt2": Family("gpt2", _GPT, H, 8, ("attn.c_attn", lambda out, k, d: _split_v(out, 2 * H * d, k, d))),
    # multi-query: c_attn output is [q (H*d) | k (d) | v (d)]
    "gpt_bigcode": Family(
        "gpt_bigcode",
        dict(_GPT, multi_query=True),
        1,
        8,
        ("attn.c_attn", lambda out, k, d: _split_v(out, H * d + d, k, d)),
    ),
    "gptj": Family("gptj", dict(_GPT, rotary_dim=4), H, 8, _v_proj("attn.v_proj")),
    # query_key_value output is per head [q_h | k_h | v_h]
    "gpt_neox": Family(
        "gpt_neox",
        dict(_DECODER, rotary_pct=0.5, hidden_dropout=0.0, attention_dropout=0.0),
        H,
        8,
        ("attention.query_key_value", lambda out, k, d: out.unflatten(-1, (k, 3 * d))[..., 2 * d :]),
    ),
    "opt": Family(
        "opt",
        OPT,
        H,
        8,
        _v_proj(),
    ),
    # Falcon-40B layout (grouped KV): fused output is per KV group [q x H/K | k | v]
    "falcon": Family(
        "falcon",
        dict(
            vocab_size=V,
            hidden_size=D,
            num_hidden_layers=L,
            num_attention_heads=H,
            new_decoder_architecture=True,
            num_kv_heads=2,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            initializer_range=0.2,
        ),
        2,
        8,
        (
            "self_attention.query_key_value",
            lambda out, k, d: out.unflatten(-1, (k, H // k + 2, d))[..., -1, :],
        ),
    ),
    # Falcon-7B layout (multi-query): fused output is [q (H*d) | k (d) | v (d)]
    "falcon-mqa": Family(
        "falcon",
        dict(
            vocab_size=V,
            hidden_size=D,
            num_hidden_layers=L,
            num_attention_heads=H,
            multi_query=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            initializer_range=0.2,
        ),
        1,
        8,
        ("self_attention.query_key_value", lambda out, k, d: _split_v(out, H * d + d, k, d)),
    ),
    # multimodal Gemma 3: the text decoder sits under model.language_model
    "gemma3": Family(
        "gemma3",
        dict(
            text_config=dict(_GQA, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, vocab_size=300),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=8,
                patch_size=4,
            ),
            mm_tokens_per_image=4,
            boi_token_index=297,
            eoi_token_index=298,
            image_token_index=299,
            initializer_range=0.2,
        ),
        2,
        16,
        _v_proj(),
    ),
}


@functools.cache
def _build(name: str) -> nn.Module:
    family = FAMILIES[name]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tiny_causal_lm(family.model_type, attn_implementation="eager", **family.config)
    except Exception as exc:  # an architecture this transformers version lacks or builds differently
        raise _Unbuildable(
            f"{name} cannot be built with transformers {transformers.__version__}: {exc!r}"
        ) from exc
    return model


class _Unbuildable(Exception):
    pass


def tiny_model(name: str) -> nn.Module:
    """The tiny random model of family ``name`` (built once; tests must not modify it in place)."""
    try:
        return _build(name)
    except _Unbuildable as exc:
        pytest.skip(str(exc))


def _inputs() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, V, (2, 6), generator=generator)


@torch.no_grad()
def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits.float()


def _wo_block(proj: nn.Module, head: int, d: int) -> torch.Tensor:
    """``W_O[:, h·d:(h+1)·d]`` as a (D_out, d) view: the columns that multiply head ``head``."""
    if type(proj).__name__ == "Conv1D":  # GPT-2 stores the transposed weight: (in, out)
        return proj.weight[head * d : (head + 1) * d, :].T
    return proj.weight[:, head * d : (head + 1) * d]


def _edit_head(n_heads: int, head: int, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A pre-hook that replaces head ``head`` of the projection input by ``fn(head slice)``."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        heads = x.unflatten(-1, (n_heads, x.shape[-1] // n_heads)).clone()
        heads[..., head, :] = fn(heads[..., head, :])
        return (heads.flatten(-2), *args[1:])

    return hook


def _assert_changed(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-3, "the edit did not change the logits: the hook is a no-op"


ALL = list(FAMILIES)


def test_every_family_in_the_site_table_is_tested() -> None:
    tested = {f.model_type for f in FAMILIES.values()}
    assert set(supported_model_types()) <= tested


@pytest.mark.parametrize("name", ALL)
def test_find_head_sites_reads_geometry(name: str) -> None:
    family, model = FAMILIES[name], tiny_model(name)
    sites = find_head_sites(model)
    assert sites.model_type == family.model_type
    assert sites.n_layers == L and len(sites.modules) == L
    assert (sites.n_heads, sites.n_kv_heads, sites.head_dim, sites.hidden_size) == (
        H,
        family.n_kv_heads,
        family.head_dim,
        D,
    )
    for layer, module in enumerate(sites.modules):
        assert model.get_submodule(sites.module_name(layer)) is module


@pytest.mark.parametrize("name", ALL)
def test_prehook_input_has_one_slice_per_head(name: str) -> None:
    model = tiny_model(name)
    sites = find_head_sites(model)
    input_ids = _inputs()
    seen = []
    handle = sites.modules[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    try:
        _logits(model, input_ids)
    finally:
        handle.remove()
    assert seen == [torch.Size((*input_ids.shape, sites.n_heads * sites.head_dim))]


@pytest.mark.parametrize("name", ALL)
def test_zeroing_head_in_prehook_equals_zeroing_its_wo_columns(name: str) -> None:
    model = tiny_model(name)
    sites = find_head_sites(model)
    input_ids, head = _inputs(), sites.n_heads - 1
    base = _logits(model, input_ids)

    handles = [
        m.register_forward_pre_hook(_edit_head(sites.n_heads, head, torch.zeros_like)) for m in sites.modules
    ]
    try:
        hooked = _logits(model, input_ids)
    finally:
        for h in handles:
            h.remove()

    edited = copy.deepcopy(model)
    with torch.no_grad():
        for module in find_head_sites(edited).modules:
            _wo_block(module, head, sites.head_dim).zero_()
    reference = _logits(edited, input_ids)

    torch.testing.assert_close(hooked, reference, rtol=1e-5, atol=1e-5)
    _assert_changed(hooked, base)
    torch.testing.assert_close(_logits(model, input_ids), base, rtol=0, atol=0)  # hooks removed


@pytest.mark.parametrize("name", ALL)
def test_adding_delta_to_head_equals_adding_wo_block_times_delta(name: str) -> None:
    model = tiny_model(name)
    sites = find_head_sites(model)
    input_ids, d = _inputs(), sites.head_dim
    generator = torch.Generator().manual_seed(2)
    delta = torch.randn((*input_ids.shape, d), generator=generator)  # (B, T, d), one per token
    base = _logits(model, input_ids)
    proj = sites.modules[0]
    for head in (0, sites.n_heads - 1):
        block = _wo_block(proj, head, d).detach().float()  # (D_out, d)

        handle = proj.register_forward_pre_hook(
            _edit_head(sites.n_heads, head, lambda x: x + delta.to(x.dtype))
        )
        try:
            via_head = _logits(model, input_ids)
        finally:
            handle.remove()

        def add_output(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            return out + torch.einsum("btd,od->bto", delta, block).to(out.dtype)  # noqa: B023

        handle = proj.register_forward_hook(add_output)
        try:
            via_output = _logits(model, input_ids)
        finally:
            handle.remove()

        torch.testing.assert_close(via_head, via_output, rtol=1e-5, atol=1e-5)
        _assert_changed(via_head, base)


@pytest.mark.parametrize("name", ALL)
def test_head_slice_at_first_token_is_its_kv_heads_value(name: str) -> None:
    """Token 0 attends only to itself, so head h outputs v of KV head h // (H / K) there."""
    family, model = FAMILIES[name], tiny_model(name)
    sites = find_head_sites(model)
    H_, K, d = sites.n_heads, sites.n_kv_heads, sites.head_dim
    layers = model.get_submodule(sites.layer_path)
    path, split = family.values
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for layer in range(L):
        handles.append(
            layers[layer]
            .get_submodule(path)
            .register_forward_hook(
                lambda m, a, out, layer=layer: captured.__setitem__(f"v{layer}", split(out, K, d))
            )
        )
        handles.append(
            sites.modules[layer].register_forward_pre_hook(
                lambda m, args, layer=layer: captured.__setitem__(f"o{layer}", args[0].unflatten(-1, (H_, d)))
            )
        )
    try:
        _logits(model, _inputs())
    finally:
        for h in handles:
            h.remove()
    for layer in range(L):
        heads = captured[f"o{layer}"][:, 0]  # (B, H, d)
        values = captured[f"v{layer}"][:, 0].repeat_interleave(H_ // K, dim=1)  # (B, K, d) -> (B, H, d)
        torch.testing.assert_close(heads, values, rtol=1e-5, atol=1e-6)
        if K > 1:  # the check has teeth: heads 0 and H-1 read different KV heads, so they differ
            assert (heads[:, 0] - heads[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ALL)
def test_base_model_without_lm_head_has_the_same_sites(name: str) -> None:
    model = tiny_model(name)
    base = model.base_model
    assert base is not model
    full, bare = find_head_sites(model), find_head_sites(base)
    assert bare.modules == full.modules
    assert (bare.n_heads, bare.n_kv_heads, bare.head_dim) == (full.n_heads, full.n_kv_heads, full.head_dim)
    assert full.layer_path.endswith(bare.layer_path) and bare.layer_path != full.layer_path


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_base_model_built_directly(name: str) -> None:
    family = FAMILIES[name]
    config = transformers.AutoConfig.for_model(family.model_type, **family.config)
    base = transformers.AutoModel.from_config(config)
    sites = find_head_sites(base)
    assert sites.n_layers == L and sites.head_dim == family.head_dim
    assert base.get_submodule(sites.module_name(0)) is sites.modules[0]


# ---------------------------------------------------------------- errors and registration


class _Wrapper(nn.Module):
    def __init__(self, model_type: str) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type, num_attention_heads=H, hidden_size=D)
        self.layers = nn.ModuleList([nn.Linear(D, D)])


def test_unknown_model_type_lists_supported_types_and_register_site() -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        find_head_sites(_Wrapper("mamba"))
    message = str(info.value)
    assert "'mamba'" in message
    for model_type in ("llama", "gpt2", "gpt_neox", "falcon"):
        assert model_type in message
    assert "register_site" in message
    assert isinstance(info.value, ValueError)


def test_model_without_config_is_rejected() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="config"):
        find_head_sites(nn.Linear(2, 2))


@pytest.fixture
def isolated_site_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations inside the test go to a copy of the table, dropped afterwards."""
    monkeypatch.setattr(sites_module, "_SITES", dict(sites_module._SITES))


class _CustomConfig(transformers.LlamaConfig):
    model_type = "otguard-test-custom"


def _custom_model() -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_CustomConfig(**FAMILIES["llama"].config)).eval()


def test_register_site_for_a_custom_model_type(isolated_site_table: None) -> None:
    model = _custom_model()
    with pytest.raises(UnsupportedArchitectureError, match="otguard-test-custom"):
        find_head_sites(model)
    register_site("otguard-test-custom", layers="model.layers", proj="self_attn.o_proj")
    sites = find_head_sites(model)
    assert sites.model_type == "otguard-test-custom"
    assert sites.modules == tuple(layer.self_attn.o_proj for layer in model.model.layers)
    assert (sites.n_heads, sites.n_kv_heads, sites.head_dim) == (H, 2, 16)
    assert "otguard-test-custom" in supported_model_types()
    with pytest.raises(ValueError, match="overwrite=True"):
        register_site("otguard-test-custom", layers="model.layers", proj="self_attn.o_proj")
    register_site("otguard-test-custom", layers="model.layers", proj="self_attn.q_proj", overwrite=True)
    with pytest.raises(UnsupportedArchitectureError, match="not a per-head site"):
        find_head_sites(model)  # q_proj takes the hidden size (32), not H*d (64)
    register_site("otguard-test-custom", layers="model.layers", proj="self_attn.nope", overwrite=True)
    with pytest.raises(UnsupportedArchitectureError, match="has no module 'self_attn.nope'"):
        find_head_sites(model)
    register_site("otguard-test-custom", layers="model.blocks", proj="self_attn.o_proj", overwrite=True)
    with pytest.raises(UnsupportedArchitectureError, match="ModuleList"):
        find_head_sites(model)


def test_register_site_cleanup_leaves_the_table_unchanged() -> None:
    assert "otguard-test-custom" not in supported_model_types()


# ---------------------------------------------------------------- model identity


def _llama(seed: int = 0, **overrides: Any) -> nn.Module:
    return tiny_llama(seed=seed, **{**FAMILIES["llama"].config, **overrides})


def test_fingerprint_is_stable() -> None:
    model = _llama()
    identity = model_identity(model)
    assert identity.fingerprint() == model_identity(model).fingerprint()
    assert identity.fingerprint() == model_identity(_llama()).fingerprint()  # same weights, new object
    assert identity.fingerprint() == type(identity).from_dict(identity.to_dict()).fingerprint()
    assert identity.fingerprint() != model_identity(_llama(seed=1)).fingerprint()
    model.config._name_or_path = "somewhere/else"
    assert model_identity(model).fingerprint() == identity.fingerprint()  # the name is not the model


def test_check_compatible_rejects_other_shapes() -> None:
    identity = model_identity(_llama())
    for other in (
        _llama(num_hidden_layers=3),
        _llama(num_attention_heads=8, num_key_value_heads=4, head_dim=8),
        tiny_model("gpt2"),
    ):
        with pytest.raises(PolicyMismatchError, match="Fit a policy for this model"):
            identity.check_compatible(model_identity(other))


def test_check_compatible_rejects_other_weights_of_the_same_architecture() -> None:
    model = _llama()
    identity = model_identity(model)
    with pytest.raises(PolicyMismatchError, match="different weights"):
        identity.check_compatible(model_identity(_llama(seed=1)))
    # a "fine-tune": every weight moved by ~5% of its tensor's scale
    tuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    with pytest.raises(PolicyMismatchError, match="different weights"):
        identity.check_compatible(model_identity(tuned))
    identity.check_compatible(model_identity(tuned), check_weights=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_check_compatible_accepts_the_same_model_in_half_precision(dtype: torch.dtype) -> None:
    model = _llama()
    identity = model_identity(model)
    half = model_identity(copy.deepcopy(model).to(dtype))
    identity.check_compatible(half)
    half.check_compatible(identity)
