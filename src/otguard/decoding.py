"""A decoding loop for evaluation: greedy or nucleus sampling, dropping rows from the batch as they finish.

``model.generate`` keeps computing every row of a batch until the last one is done; the evaluation
harness decodes many short answers of uneven length (TruthfulQA answers are ~15 tokens, but one row
of a batch often runs to the 50-token limit), so dropping finished rows (from the batch and from its
KV cache) saves most of the decoding work. Greedy answers equal those of ``model.generate`` (tested).

For sampling, each prompt's KV cache is computed once and copied for its ``n`` samples (rows
``i*n ... i*n+n-1``), instead of running the prompt ``n`` times as ``num_return_sequences`` does.
Sampling uses an explicit ``torch.Generator`` (top-p, top-k 0, temperature 1 by default, as in the
toxicity protocol), so a run is reproducible for a given seed and batch size.

Position ids follow the attention mask (``cumsum - 1``), as in ``model.generate``, so left padding
anywhere (also between a shared prefix and a question) is invisible to each row. Models whose
forward takes no ``position_ids`` are not supported here; callers fall back to ``model.generate``.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch

CACHE_NAMES = ("cache", "past_key_values")  # the KV cache argument: current name, then the pre-5.2x one


def accepts_argument(model: Any, name: str) -> bool:
    """Whether ``model.forward`` takes the keyword argument ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two id sequences share (where a cached prefix stops being reusable)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def cache_kwarg(model: Any) -> str:
    """The keyword under which ``model`` (forward and ``generate``) takes the KV cache.

    transformers renamed ``past_key_values`` to ``cache`` during 5.x (the old name still works but
    warns that it is deprecated); otguard supports both sides of the rename, so its own calls ask
    here. Read from the class's ``forward`` signature, once per class.
    """
    cls: Any = type(model)
    return _cache_kwarg_of(cls)


def cache_arg_index(model: Any) -> int | None:
    """Position of the cache argument in ``model.forward(...)`` (without ``self``), if it has one."""
    cls: Any = type(model)
    return _cache_index_of(cls)


def output_cache(output: Any) -> Any:
    """The KV cache a forward call returned (``output.cache``, or ``past_key_values`` before the rename)."""
    if "cache" in getattr(type(output), "__dataclass_fields__", {}):
        return output.cache
    return output.past_key_values


def _forward_parameters(cls: Any) -> list[str]:
    try:
        params = list(inspect.signature(cls.forward).parameters)  # follows the deprecation wrappers
    except (AttributeError, TypeError, ValueError):
        return []
    return params[1:] if params and params[0] == "self" else params


@functools.cache
def _cache_kwarg_of(cls: type) -> str:
    params = _forward_parameters(cls)
    for name in CACHE_NAMES:
        if name in params:
            return name
    return _library_cache_name()


@functools.cache
def _cache_index_of(cls: type) -> int | None:
    params = _forward_parameters(cls)
    for name in CACHE_NAMES:
        if name in params:
            return params.index(name)
    return None


@functools.cache
def _library_cache_name() -> str:
    """The name the installed transformers' own generation loop uses (for forwards taking ``**kwargs``)."""
    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


def fork_cache(cache: Any, n: int) -> Any:
    """A copy of ``cache`` whose batch is ``n`` times its (single) row; the original stays valid.

    Dynamic layers grow by concatenation (never in place), so sharing the cached tensors (expanded
    as views) is enough; any other layer type gets a deep copy. Used to run many rows on top of one
    shared prefix (the TruthfulQA instruction + primer) without copying it per batch.
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    shareable = not getattr(cache, "offloading", False) and all(
        type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers
    )
    if not shareable:
        new = copy.deepcopy(cache)
        if n > 1:
            new.batch_repeat_interleave(n)
        return new
    new = copy.copy(cache)
    new.layers = []
    for layer in cache.layers:
        twin = copy.copy(layer)
        if twin.is_initialized and n > 1:
            twin.keys = twin.keys.expand(n, *twin.keys.shape[1:])
            twin.values = twin.values.expand(n, *twin.values.shape[1:])
        new.layers.append(twin)
    return new


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-sequence ids of the model's generation config (else the tokenizer's)."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def finished(tokenizer: Any, tokens: list[int], stop_strings: Sequence[str], eos: set[int]) -> bool:
    """Whether a row just finished: its last token is an EOS, or a stop string ends in its last token.

    Only the tail is decoded (a stop string spans at most as many tokens as it has characters); the
    check runs after every token, so an earlier occurrence would already have stopped the row.
    """
    if tokens[-1] in eos:
        return True
    if not stop_strings:
        return False
    width = max(len(s) for s in stop_strings) + 2  # + room for byte-level pieces that decode to ""
    tail = tokenizer.decode(tokens[-width:], skip_special_tokens=True)
    return any(s in tail for s in stop_strings)


def top_p_sample(logits: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from the smallest set of tokens whose probability reaches ``top_p``.

    The most likely token is always kept; the kept probabilities are renormalised. ``top_p >= 1``
    samples from the full distribution. Everything stays on the logits' device.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Any = None,
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    eos_token_ids: Sequence[int] | None = None,
    do_sample: bool = False,
    top_p: float = 0.9,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue a left-padded batch; returns the new token ids of each output row.

    ``input_ids``/``attention_mask``: ``(B, L)`` full sequences, the first ``cache`` length of which
    are already in the KV cache (which must hold ``B`` rows; it is consumed). Greedy by default;
    ``do_sample=True`` draws ``num_samples`` continuations per row with nucleus sampling (output rows
    ``b*num_samples + s``). A row ends with an EOS token, with a stop string, or at
    ``max_new_tokens``; its ids include the token that ended it. One host read of the next tokens
    per step decides which rows go on (``model.generate`` likewise reads its stopping criteria).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1; got {num_samples}.")
    if num_samples > 1 and not do_sample:
        raise ValueError("num_samples > 1 needs do_sample=True (greedy samples would be identical).")
    if not accepts_argument(model, "position_ids"):
        raise TypeError(
            f"{type(model).__name__}.forward takes no position_ids, which the evaluation decoder needs to "
            "see through left padding; use model.generate for this model (generate_answers(evict=False))."
        )
    device = input_ids.device
    eos = {int(e) for e in (eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)}
    past = cache.get_seq_length() if cache is not None else 0
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
    kwargs: dict[str, Any] = {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}
    cache_name = cache_kwarg(model)
    out = model(input_ids=input_ids[:, past:], attention_mask=attention_mask, **{cache_name: cache},
                position_ids=positions[:, past:], use_cache=True, **kwargs)  # fmt: skip
    cache, mask, logits = output_cache(out), attention_mask, out.logits[:, -1]
    next_pos = positions[:, -1] + 1
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        mask = mask.repeat_interleave(num_samples, 0)
        next_pos = next_pos.repeat_interleave(num_samples, 0)
        logits = logits.repeat_interleave(num_samples, 0)
    alive = list(range(mask.shape[0]))  # output row of each current batch row
    tokens: list[list[int]] = [[] for _ in alive]
    for step in range(max_new_tokens):
        nxt = top_p_sample(logits, top_p, generator) if do_sample else logits.argmax(-1)
        keep = []
        for j, (row, tok) in enumerate(zip(alive, nxt.tolist(), strict=True)):
            tokens[row].append(tok)
            if not finished(tokenizer, tokens[row], stop_strings, eos):
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(alive):
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, next_pos, nxt = mask[sel], next_pos[sel], nxt[sel]
            alive = [alive[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], 1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, **{cache_name: cache},
                    position_ids=next_pos[:, None], use_cache=True)  # fmt: skip
        cache, logits = output_cache(out), out.logits[:, -1]
        next_pos = next_pos + 1
    return tokens
