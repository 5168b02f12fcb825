"""Tiny random causal LMs built from configs, shared by the unit tests (no download, under a second).

One home for the builders, so that a transformers release that renames a config field or changes
how a model is constructed is fixed in one place. Every builder seeds torch's global RNG right
before construction, so a (config, seed) pair always gives the same weights: tests that compare a
model with a copy built again, or that depend on a seed for a property (e.g. rows that finish at
different steps), stay deterministic.

- :func:`tiny_causal_lm`: any ``model_type`` from keyword config fields (the site-table tests).
- :func:`tiny_llama`, :func:`tiny_gpt2`, :func:`tiny_gemma2`: the three families most tests use,
  with small defaults that any field can override.
- :func:`tiny_lm`: a Llama / GPT-2 / Gemma-2 model for a given tokenizer (vocabulary, padding id),
  with no BOS/EOS ids and a 1,024-token context, as the evaluation tests use them.
- :func:`without_eos`: generation settings for tests that want exactly ``max_new_tokens`` tokens.
- :func:`word_tokenizer`: a word-level tokenizer over :data:`WORDS` (no training, no download).
- :func:`save_tiny_model`: a model folder (model + tokenizer) that ``load_model`` and the CLI read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedModel, PreTrainedTokenizerFast

VOCAB = 100

# Llama-style decoder: GQA (4 query heads over 2 KV heads), head dim 8.
LLAMA: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# GPT-2: absolute positions, fused c_attn, Conv1D projections; dropout off.
GPT2: dict[str, Any] = dict(
    vocab_size=VOCAB,
    n_embd=32,
    n_layer=2,
    n_head=4,
    n_positions=128,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# OPT: learned positions, separate q/k/v projections, 64 positions; dropout off.
OPT: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    ffn_dim=64,
    word_embed_proj_dim=32,
    max_position_embeddings=64,
    dropout=0.0,
    attention_dropout=0.0,
    pad_token_id=0,
    init_std=0.2,
)
# Gemma-2: the Llama fields plus one sliding-window layer before a full-attention one.
GEMMA2: dict[str, Any] = dict(LLAMA, sliding_window=48, layer_types=["sliding_attention", "full_attention"])

LM_KINDS = ("llama", "llama-eager", "gpt2", "gemma2")


def tiny_causal_lm(
    model_type: str,
    *,
    seed: int = 0,
    attn_implementation: str | None = None,
    name: str | None = None,
    **config: Any,
) -> PreTrainedModel:
    """A random ``AutoModelForCausalLM`` of ``model_type`` from exactly the given config fields, in eval mode.

    ``name`` sets ``config._name_or_path`` (left as transformers sets it when None); ``attn_implementation``
    None is transformers' default (SDPA where available).
    """
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    torch.manual_seed(seed)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = transformers.AutoModelForCausalLM.from_config(cfg, **kwargs)
    if name is not None:
        model.config._name_or_path = name
    return model.eval()


def tiny_llama(
    *, seed: int = 0, attn_implementation: str | None = None, name: str | None = None, **overrides: Any
) -> PreTrainedModel:
    """A tiny random Llama (:data:`LLAMA` with ``overrides``)."""
    return tiny_causal_lm("llama", seed=seed, attn_implementation=attn_implementation, name=name,
                          **{**LLAMA, **overrides})  # fmt: skip


def tiny_gpt2(
    *, seed: int = 0, attn_implementation: str | None = None, name: str | None = None, **overrides: Any
) -> PreTrainedModel:
    """A tiny random GPT-2 (:data:`GPT2` with ``overrides``)."""
    return tiny_causal_lm("gpt2", seed=seed, attn_implementation=attn_implementation, name=name,
                          **{**GPT2, **overrides})  # fmt: skip


def tiny_gemma2(
    *, seed: int = 0, attn_implementation: str | None = None, name: str | None = None, **overrides: Any
) -> PreTrainedModel:
    """A tiny random Gemma-2 (:data:`GEMMA2` with ``overrides``)."""
    return tiny_causal_lm("gemma2", seed=seed, attn_implementation=attn_implementation, name=name,
                          **{**GEMMA2, **overrides})  # fmt: skip


def tiny_lm(kind: str, vocab_size: int, pad_token_id: int, seed: int = 0) -> PreTrainedModel:
    """A tiny model for a tokenizer: ``kind`` in :data:`LM_KINDS`; no BOS/EOS ids, 1,024 positions.

    Named ``tiny-{kind}-seed{seed}`` (so caches keyed by the name tell seeds apart). ``gemma2`` has a
    48-token sliding window, shorter than the TruthfulQA prompt prefix.
    """
    ids: dict[str, Any] = dict(
        vocab_size=vocab_size, pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=None
    )
    name = f"tiny-{kind}-seed{seed}"
    if kind in ("llama", "llama-eager"):
        attn = "eager" if kind == "llama-eager" else None
        return tiny_llama(seed=seed, attn_implementation=attn, name=name, max_position_embeddings=1024, **ids)
    if kind == "gemma2":
        return tiny_gemma2(seed=seed, name=name, max_position_embeddings=1024, **ids)
    if kind == "gpt2":
        return tiny_gpt2(seed=seed, name=name, n_positions=1024, **ids)
    raise ValueError(f"Unknown tiny model kind {kind!r}; use one of {', '.join(LM_KINDS)}.")


def without_eos(model: PreTrainedModel, pad_token_id: int = 0) -> PreTrainedModel:
    """Turn off EOS in ``model.generate`` (every row runs to ``max_new_tokens``) and set the padding id."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad_token_id
    return model


# The word-level vocabulary: specials first (pad 0, BOS 1, EOS 2 as in LLAMA / GPT2), then "w0".."w89".
SPECIALS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
WORDS: tuple[str, ...] = tuple(f"w{i}" for i in range(90))
WORD_VOCAB = len(SPECIALS) + len(WORDS)  # 94


def word_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over :data:`WORDS` that prepends ``<s>``, so no text tokenizes to
    nothing and token counts are exact (one per word plus one)."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.padding_side = padding_side
    return tok


def save_tiny_model(
    folder: Path, model: PreTrainedModel | None = None, *, seed: int = 0, context: int = 128
) -> Path:
    """Save ``model`` and :func:`word_tokenizer` to ``folder`` (a model folder for ``load_model`` / the CLI).

    ``model`` None is a :func:`tiny_llama` over the word vocabulary with ``context`` positions and ``seed``.
    """
    if model is None:
        model = tiny_llama(seed=seed, vocab_size=WORD_VOCAB, max_position_embeddings=context)
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder
