"""Shared trunks: run the unedited lower decoder layers once for several policies.

A policy edits heads at the output projections of some decoder layers (:mod:`otguard.hook`); the
hidden state entering its first edited layer ``L`` is the plain model's. When several policies score
the same inputs (a sweep, the comparison harness), every one of them recomputes layers ``0..L-1``
identically. Here one forward without a policy **records** the state at the layers that are needed
(:func:`record_trunk`), and each policy's forward **resumes** from its ``L`` with layers ``0..L-1``
not computed (:func:`resume_trunk`).

What is recorded is the *output object of layer ``L-1``* (a tensor, or a tuple in older layouts),
not the input of layer ``L``: on resuming, layer ``L-1`` returns that very object to the model's own
loop, so whatever the loop does between two layers (unpacking a tuple, a scale, a device move) runs
unchanged and layer ``L`` sees exactly what it saw in the recorded forward. The embedding, masks,
position ids and rotary tables are still computed by the model (cheap) from the same inputs.

Skipping is done by setting an instance ``forward`` on each layer below ``L`` that returns the
recorded object, restored in a ``finally`` (and any earlier instance ``forward``, e.g. an accelerate
wrapper, put back). The layer modules stay in the model's list, so attributes the loop reads from a
layer (``attention_type``, ``layer_idx``) and hooks on the layer stay as they were. While a resumed
forward runs, the model is not usable by another thread (its lower layers return the recorded state).

KV cache: the skipped layers do not extend their cache entries. Every stock model reads the cache
length (``get_seq_length``, which reads layer 0; the causal and sliding-window masks) *before* its
first layer, so the resumed forward sees the same lengths as the recorded one. After it, the cache's
layers below ``L`` are patched with (shallow copies of) the recorded forward's entries when the trunk
kept them (``keep_cache=True``), so the cache is then exactly that of a full forward; with
``keep_cache=False`` (the caller throws the cache away, e.g. a :func:`otguard.decoding.fork_cache`
copy per forward) those layers are left un-extended. Either way the forward must be given its own
cache (a fork of the same state as the recorded forward's): it is extended in place.

Support is a check, not a hope: only model types whose decoder loop is known to pass nothing but the
hidden state from layer to layer (:data:`TRUNK_MODEL_TYPES`, each tested against the full forward),
in eval mode, without ``output_hidden_states``/``output_attentions``, with no cache or a plain
``DynamicCache`` of dynamic (sliding-window) layers. Anything else runs the full forward: the same
result, without the saving.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from otguard.decoding import CACHE_NAMES, output_cache
from otguard.errors import UnsupportedArchitectureError
from otguard.sites import find_head_sites

__all__ = ["TRUNK_MODEL_TYPES", "Trunk", "decoder_layers", "first_edited_layer", "record_trunk",
           "resume_trunk", "supports_trunk", "trunk_unsupported_reason"]  # fmt: skip

log = logging.getLogger(__name__)

# Model types whose decoder loop is `hidden = layer(hidden, **same_kwargs)` for every layer, with the
# cache length and masks computed before the first layer (transformers 5.x; tests/unit/test_trunk.py
# checks each against the full forward, with and without a prefix cache).
TRUNK_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gpt_neox", "opt", "phi", "phi3"}
)

_MISSING = object()


class _Stop(Exception):
    """Raised by the recording hook to end a forward once the highest needed state is recorded."""


@dataclass
class Trunk:
    """What one forward without a policy recorded: ``states[L]`` is the output of layer ``L-1``.

    ``cache_layers``: shallow copies of that forward's cache layers below ``max(states)`` (None when
    not kept); ``shape``: the input length and cache length of the forward, checked on resuming.
    """

    states: dict[int, Any] = field(default_factory=dict)
    cache_layers: list[Any] | None = None
    shape: tuple[int, int] | None = None

    def can_resume(self, layer: int) -> bool:
        """Whether :func:`resume_trunk` at ``layer`` skips layers (layer 0 is a plain forward)."""
        return layer in self.states


def first_edited_layer(policy: Any) -> int:
    """The first decoder layer ``policy`` edits: the layer its forwards can resume from (the state
    entering it is the plain model's); 0 for ``None`` or a policy that edits nothing."""
    if policy is None:
        return 0
    return min((int(edit.layer) for edit in policy.layers), default=0)


def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder-layer list of ``model``, found where :mod:`otguard.sites` says it is."""
    sites = find_head_sites(model)
    layers = model.get_submodule(sites.layer_path)
    assert isinstance(layers, nn.ModuleList)  # find_head_sites checked it
    return layers


def trunk_unsupported_reason(model: Any) -> str | None:
    """Why a recorded-and-resumed forward of ``model`` is not known to equal its full forward, or None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in TRUNK_MODEL_TYPES:
        return f"model_type {model_type!r} is not one whose decoder loop has been checked"
    if getattr(model, "training", False):
        return "the model is in training mode (dropout, layer drop)"
    if getattr(config, "output_hidden_states", False) or getattr(config, "output_attentions", False):
        return "the config asks for per-layer outputs"
    try:
        decoder_layers(model)
    except UnsupportedArchitectureError as exc:
        return str(exc)
    return None


def supports_trunk(model: Any) -> bool:
    """Whether :func:`record_trunk` / :func:`resume_trunk` skip layers on ``model`` (else full forwards)."""
    return trunk_unsupported_reason(model) is None


def _call_cache(inputs: Mapping[str, Any]) -> Any:
    for name in CACHE_NAMES:
        if inputs.get(name) is not None:
            return inputs[name]
    return None


def _plain_cache(cache: Any) -> bool:
    """A ``DynamicCache`` of dynamic layers: grown by concatenation, never written in place."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    return (
        type(cache) is DynamicCache
        and not getattr(cache, "offloading", False)
        and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers)
    )


def _call_ok(model: Any, inputs: Mapping[str, Any]) -> bool:
    """Whether this call (on a supported model) may be recorded or resumed."""
    if inputs.get("output_hidden_states") or inputs.get("output_attentions"):
        return False
    if inputs.get("return_dict") is False:
        return False
    cache = _call_cache(inputs)
    return cache is None or _plain_cache(cache)


def _output_cache(out: Any) -> Any:
    try:
        return output_cache(out)
    except AttributeError:
        return None


def _shape(inputs: Mapping[str, Any]) -> tuple[int, int]:
    x = inputs.get("input_ids")
    if x is None:
        x = inputs.get("inputs_embeds")
    cache = _call_cache(inputs)
    past = int(cache.get_seq_length()) if cache is not None else 0
    return (int(x.shape[1]) if torch.is_tensor(x) and x.dim() >= 2 else -1), past


def _structured(value: Any) -> bool:
    """A layer output that can be handed back as is: a tensor or a tuple of tensors / None."""
    if torch.is_tensor(value):
        return True
    return isinstance(value, tuple) and all(v is None or torch.is_tensor(v) for v in value)


def record_trunk(
    model: Any,
    inputs: Mapping[str, Any],
    layers: Iterable[int],
    *,
    keep_output: bool = True,
    keep_cache: bool = True,
) -> tuple[Any, Trunk]:
    """Run ``model(**inputs)`` with no policy and record the state entering each of ``layers``.

    Returns the model output (None with ``keep_output=False``: the forward then stops right after the
    highest needed layer, skipping the upper layers and the LM head; only when the call is given its
    cache or ``use_cache=False``, so that nothing is lost) and the :class:`Trunk`. Layer 0 needs no
    state; unsupported models or calls record nothing (resuming is then a full forward; with
    ``keep_output=False`` nothing runs at all).
    ``keep_cache``: keep this forward's lower cache layers, to complete resumed forwards' caches.
    """
    needed = sorted({int(layer) for layer in layers if int(layer) > 0})
    trunk = Trunk(shape=_shape(inputs))
    reason = trunk_unsupported_reason(model)
    if reason is None and not _call_ok(model, inputs):
        reason = "this call asks for per-layer outputs or uses a cache that is not a plain DynamicCache"
    if reason is not None or not needed:
        if reason is not None and needed:
            log.debug("Not sharing the trunk: %s; running full forwards.", reason)
        return (model(**inputs) if keep_output else None), trunk
    module_list = decoder_layers(model)
    needed = [layer for layer in needed if layer <= len(module_list)]
    cache = _call_cache(inputs)
    stop = not keep_output and (cache is not None or inputs.get("use_cache") is False) and bool(needed)
    top = needed[-1] if needed else 0

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if _structured(output):
                trunk.states[layer] = output
            if stop and layer == top:
                raise _Stop

        return hook

    handles = [module_list[layer - 1].register_forward_hook(make_hook(layer)) for layer in needed]
    out = None
    try:
        out = model(**inputs)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if keep_cache:
        if cache is None and out is not None:
            cache = _output_cache(out)
        if cache is not None:
            if _plain_cache(cache) and len(cache.layers) >= top:
                trunk.cache_layers = [copy.copy(layer) for layer in cache.layers[:top]]
            else:  # a cache that resumed forwards could not complete: they run in full instead
                trunk.states.clear()
    return (out if keep_output else None), trunk


def resume_trunk(model: Any, trunk: Trunk, layer: int, inputs: Mapping[str, Any]) -> Any:
    """``model(**inputs)`` with layers ``0..layer-1`` replaced by ``trunk``'s recorded state.

    ``inputs`` must be those of the recorded forward (same ids, masks, position ids; a cache in the
    same state, and the call's own: it is extended). Attach a policy whose first edited layer is
    ``layer`` or above and the result is that of the policy's full forward. A ``layer`` that was not
    recorded, or a call that cannot be resumed, runs the full forward.
    """
    layer = int(layer)
    if layer <= 0 or not trunk.can_resume(layer) or not _call_ok(model, inputs):
        return model(**inputs)
    if trunk.shape is not None and _shape(inputs) != trunk.shape:
        raise ValueError(
            f"resume_trunk got inputs of (length, cache length) {_shape(inputs)}, but the trunk was recorded "
            f"on {trunk.shape}; resume with the recorded forward's inputs."
        )
    module_list = decoder_layers(model)
    value = trunk.states[layer]

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        return value

    skipped = list(module_list[:layer])
    saved = [module.__dict__.get("forward", _MISSING) for module in skipped]
    try:
        for module in skipped:
            module.__dict__["forward"] = passthrough
        out = model(**inputs)
    finally:
        for module, old in zip(skipped, saved, strict=True):
            if old is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = old
    if trunk.cache_layers is not None:
        cache = _call_cache(inputs)
        if cache is None:
            cache = _output_cache(out)
        if cache is not None:
            for i in range(layer):
                cache.layers[i] = copy.copy(trunk.cache_layers[i])
    return out
