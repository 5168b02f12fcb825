"""Collecting per-head activations, batched, for all layers at once, with an on-disk cache.

One forward pre-hook per layer (see :mod:`otguard.sites`) gathers the wanted token position(s)
of every row straight into a preallocated ``(N, L, H, d)`` tensor, so a batch costs one forward
pass of the base model (no LM head). Texts are sorted by length to minimise padding; results do
not depend on the batch size or the padding side (the last *real* token is found from the
attention mask, and position ids are derived from it).

Results are cached under ``<cache>/activations/<key>/`` where the key hashes the model
fingerprint, the data fingerprint (texts, labels, groups: so a template change invalidates it),
the positions rule and the storage dtype (and the context prefix, when one is given). Writes go to
a temporary folder renamed at the end: an interrupted run leaves no half-written cache.

With ``prefix`` (e.g. the TruthfulQA instruction + six-shot primer that generation puts in front of
every question), each text is read *in that context*: the string ``prefix + text`` is tokenized as a
whole, as the generation and gate code tokenize it, the prefix runs once and its KV cache is shared
(expanded, not copied) by every batch, and the activations are still those of the text's own tokens.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from otguard.decoding import cache_kwarg, common_prefix_len, fork_cache, output_cache
from otguard.errors import DataError, UsageError
from otguard.io import atomic_dir, package_version, remove_stale_temps
from otguard.models import cache_dir as default_cache_dir
from otguard.models import context_length
from otguard.sites import ModelIdentity, find_head_sites, model_identity

logger = logging.getLogger(__name__)

Positions = Literal["last", "mean"]
CACHE_FORMAT = 1
#: Default cap on the padded tokens of one collection batch (rows x longest row): memory stays
#: bounded whatever the text lengths, and short texts still get full batches.
MAX_BATCH_TOKENS = 8192
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class ActivationSet:
    """Per-head activations of labelled texts.

    ``acts``: (N, L, H, d) in the storage dtype; ``labels``: (N,) int64, 1 = undesirable (or all
    -1 when unlabelled); ``groups``: (N,) int64 (all answers of one question share a group).
    ``meta`` records the model identity, the data fingerprint and the collection settings.
    """

    acts: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.acts.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.acts.shape[1])

    @property
    def n_heads(self) -> int:
        return int(self.acts.shape[2])

    @property
    def head_dim(self) -> int:
        return int(self.acts.shape[3])

    @property
    def model(self) -> ModelIdentity | None:
        data = self.meta.get("model")
        return ModelIdentity.from_dict(data) if data else None

    def subset(self, idx: np.ndarray | torch.Tensor | Sequence[int]) -> ActivationSet:
        """Rows ``idx`` (e.g. one fold's training examples); shares ``meta``."""
        index = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return ActivationSet(self.acts[index], self.labels[index], self.groups[index], dict(self.meta))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``activations.safetensors`` + ``meta.json`` into ``directory`` atomically."""
        target = Path(directory)
        tensors = {"acts": self.acts.contiguous(), "labels": self.labels, "groups": self.groups}
        with atomic_dir(target, kind="activations") as tmp:
            save_file(tensors, str(tmp / "activations.safetensors"))
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2, sort_keys=True))
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ActivationSet:
        """Read a folder written by :meth:`save`; :class:`DataError` when it is incomplete or corrupted."""
        path = Path(directory)
        tensor_file, meta_file = path / "activations.safetensors", path / "meta.json"
        if not tensor_file.is_file() or not meta_file.is_file():
            raise DataError(
                f"{path} is not an activation folder (needs activations.safetensors and meta.json)."
            )
        try:
            tensors = load_file(str(tensor_file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DataError(
                f"{tensor_file} cannot be read ({exc}); the file is truncated or corrupted."
            ) from exc
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{meta_file} cannot be read as JSON ({exc}); the folder is corrupted.") from exc
        missing = sorted({"acts", "labels", "groups"} - set(tensors))
        if missing or not isinstance(meta, dict):
            what = f"misses the tensors {missing}" if missing else "has a meta.json that is not an object"
            raise DataError(f"{path} {what}; the folder is corrupted.")
        acts, labels, groups = tensors["acts"], tensors["labels"], tensors["groups"]
        n = acts.shape[0] if acts.dim() == 4 else -1
        if n < 0 or tuple(labels.shape) != (n,) or tuple(groups.shape) != (n,):
            raise DataError(
                f"{tensor_file}: inconsistent shapes acts {tuple(acts.shape)}, labels {tuple(labels.shape)}, "
                f"groups {tuple(groups.shape)}; the folder is corrupted."
            )
        return cls(acts, labels, groups, meta)


def _as_dataset(data: Any) -> tuple[list[str], np.ndarray, np.ndarray, str, str]:
    """Accept a TextDataset (texts/labels/groups/fingerprint) or a plain list of strings."""
    if hasattr(data, "texts") and hasattr(data, "labels"):
        texts = list(data.texts)
        labels = np.array(data.labels, dtype=np.int64)  # a writable copy: torch.from_numpy shares it
        groups = np.array(getattr(data, "groups", np.arange(len(texts))), dtype=np.int64)
        name = str(getattr(data, "name", "dataset"))
        fp = data.fingerprint() if hasattr(data, "fingerprint") else _hash_texts(texts, labels, groups)
        return texts, labels, groups, name, fp
    if isinstance(data, str):
        raise DataError("collect() needs a list of texts or a TextDataset, not a single string.")
    texts = list(data)
    if not all(isinstance(t, str) for t in texts):
        raise DataError("collect() needs a list of strings or a TextDataset.")
    labels = np.full(len(texts), -1, dtype=np.int64)
    groups = np.arange(len(texts), dtype=np.int64)
    return texts, labels, groups, "texts", _hash_texts(texts, labels, groups)


def _hash_texts(texts: Sequence[str], labels: np.ndarray, groups: np.ndarray) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    h.update(labels.tobytes())
    h.update(groups.tobytes())
    return h.hexdigest()


def cache_key(
    identity: ModelIdentity,
    data_fingerprint: str,
    positions: str,
    dtype: str,
    max_length: int | None,
    prefix: str | None = None,
) -> str:
    """Hash of everything that determines the activations (the prefix only when there is one, so the
    keys of prefix-free collections stay what they were)."""
    payload: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "model": identity.fingerprint(),
        "data": data_fingerprint,
        "positions": positions,
        "dtype": dtype,
        "max_length": max_length,
    }
    if prefix is not None:
        payload["prefix"] = hashlib.sha256(prefix.encode()).hexdigest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. ``(B, T) -> (B,)``."""
    T = attention_mask.shape[-1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def collect(
    model: Any,
    tokenizer: Any,
    data: Any,
    *,
    positions: Positions = "last",
    batch_size: int = 16,
    dtype: str = "float16",
    max_length: int | None = None,
    max_batch_tokens: int | None = MAX_BATCH_TOKENS,
    cache: bool | str | os.PathLike[str] = True,
    progress: bool = True,
    prefix: str | None = None,
) -> ActivationSet:
    """Per-head activations ``(N, L, H, d)`` of ``data`` at the output-projection input.

    ``data``: a :class:`otguard.data.TextDataset` or a list of strings. ``positions``: ``"last"``
    (the last real token, the papers' choice) or ``"mean"`` (mean over real tokens). ``dtype``:
    storage dtype (``"float16"`` halves memory; probes compute in float32). ``cache``: ``True``
    for the default cache folder, a path, or ``False``.

    Texts longer than the model's context are refused unless ``max_length`` is given: then every
    text is cut to its first ``max_length`` tokens, with a warning naming how many were cut.
    ``max_batch_tokens`` caps the padded tokens of a batch (rows x longest row), so long texts run in
    small batches (a text longer than the cap runs alone); ``None`` = rows only. Results do not
    depend on it. A cache entry that cannot be read is reported, removed and recomputed.

    ``prefix``: a context read before every text (e.g. ``otguard.prompts.qa_prefix()`` with the
    ``context="generation"`` TruthfulQA bank, so probes are trained where the gate runs). ``prefix +
    text`` is tokenized as one string (trailing special tokens such as an EOS dropped, as at the point
    of use); the activations are those of the text's tokens (``"last"``: its last token, ``"mean"``: the
    mean over its tokens). The prefix's KV cache is computed once and shared by every batch; a text
    whose tokenization does not start with the prefix's tokens (a tokenizer merging across the
    boundary) runs whole, its text starting at the first token that differs. ``max_length`` then
    counts the text's tokens; prefix + text must fit in the model's context.
    """
    if positions not in ("last", "mean"):
        raise UsageError(f"positions must be 'last' or 'mean', got {positions!r}.")
    if dtype not in _DTYPES:
        raise UsageError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
    ):
        raise UsageError(f"max_length must be an integer >= 1 or None, got {max_length!r}.")
    if max_batch_tokens is not None and (
        isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1
    ):
        raise UsageError(f"max_batch_tokens must be an integer >= 1 or None, got {max_batch_tokens!r}.")
    if prefix is not None and (not isinstance(prefix, str) or not prefix):
        raise UsageError(f"prefix must be a non-empty string or None, got {prefix!r}.")
    texts, labels, groups, name, data_fp = _as_dataset(data)
    if not texts:
        raise DataError("collect() got no texts.")
    sites = find_head_sites(model)
    context = context_length(model)
    if max_length is not None and context is not None and max_length > context:
        raise UsageError(
            f"max_length {max_length} is longer than the model's context of {context} tokens; use at most "
            f"{context}."
        )
    identity = model_identity(model, sites)
    key = cache_key(identity, data_fp, positions, dtype, max_length, prefix)
    cache_path: Path | None = None
    if cache:
        root = default_cache_dir(None if cache is True else cache)
        cache_path = root / "activations" / key
        remove_stale_temps(cache_path.parent)
        cached = _load_cached(cache_path, len(texts), sites)
        if cached is not None:
            logger.info("Activations for %s loaded from cache %s", name, cache_path)
            return cached

    store, rows_cap = _DTYPES[dtype], max_batch_tokens
    if prefix is None:
        encoded = _encode(tokenizer, texts, max_length, context)
        acts = _run(model, tokenizer, sites, encoded, positions, batch_size, store, rows_cap, progress)
    else:
        prefix_ids, rows = _encode_in_context(tokenizer, prefix, texts, max_length, context)
        acts = _run_in_context(
            model, tokenizer, sites, prefix_ids, rows, positions, batch_size, store, rows_cap, progress
        )
    meta = {
        "model": identity.to_dict(),
        "model_fingerprint": identity.fingerprint(),
        "dataset": name,
        "data_fingerprint": data_fp,
        "positions": positions,
        "dtype": dtype,
        "max_length": max_length,
        "cache_key": key,
        "otguard_version": package_version(),
    }
    if prefix is not None:
        meta["prefix"] = prefix
    result = ActivationSet(acts, torch.from_numpy(labels.copy()), torch.from_numpy(groups.copy()), meta)
    if cache_path is not None:
        result.save(cache_path)
        logger.info("Cached activations at %s", cache_path)
    return result


def _load_cached(path: Path, n_texts: int, sites: Any) -> ActivationSet | None:
    """The cache entry at ``path`` if it is complete and readable; a broken one is reported and removed."""
    if not path.exists():
        return None
    try:
        cached = ActivationSet.load(path)
        want = (n_texts, sites.n_layers, sites.n_heads, sites.head_dim)
        if tuple(cached.acts.shape) != want:
            raise DataError(f"it holds activations of shape {tuple(cached.acts.shape)}, expected {want}")
    except DataError as exc:
        logger.warning("The cached activations at %s are unusable (%s); removing them and collecting again.",
                       path, exc)  # fmt: skip
        shutil.rmtree(path, ignore_errors=True)
        return None
    return cached


def _encode(tokenizer: Any, texts: list[str], max_length: int | None, context: int | None) -> list[list[int]]:
    """Token ids of every text; too long ones are refused, or cut to ``max_length`` with a warning."""
    encoded = [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    empty = [i for i, ids in enumerate(encoded) if len(ids) == 0]
    if empty:
        raise DataError(
            f"Text {empty[0]} tokenized to zero tokens ({len(empty)} such texts); remove empty texts."
        )
    limit = max_length if max_length is not None else context
    long = [i for i, ids in enumerate(encoded) if limit is not None and len(ids) > limit]
    if not long:
        return encoded
    worst = max(long, key=lambda i: len(encoded[i]))
    if max_length is None:
        raise DataError(
            f"{len(long)} text(s) are longer than the model's context of {context} tokens (text {worst}: "
            f"{len(encoded[worst])} tokens, {texts[worst][:40]!r}...). Shorten them, or cut every text to "
            f"its first N tokens (command line: --max-length N; Python: max_length=N) with N <= {context}."
        )
    longest = len(encoded[worst])
    cut = tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=max_length)
    for i, ids in zip(long, cut["input_ids"], strict=True):
        encoded[i] = list(ids)
    logger.warning(
        "Cut %d of %d texts to their first %d tokens (the longest had %d); their activations are those of "
        "the cut text.",
        len(long),
        len(texts),
        max_length,
        longest,
    )
    return encoded


def _batches(lengths: list[int], batch_size: int, max_batch_tokens: int | None) -> list[np.ndarray]:
    """Row indices per batch, longest texts first; each batch has at most ``batch_size`` rows and
    ``max_batch_tokens`` padded tokens (a text longer than that runs alone)."""
    order = np.argsort([-n for n in lengths], kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = lengths[order[start]]
        rows = (
            batch_size if max_batch_tokens is None else max(1, min(batch_size, max_batch_tokens // longest))
        )
        batches.append(order[start : start + rows])
        start += rows
    return batches


def _grab_hook(layer: int, state: dict[str, torch.Tensor], positions: str, H: int, d: int,
               out_dtype: torch.dtype) -> Any:  # fmt: skip
    """The pre-hook that copies one layer's per-head input of the current batch into ``state["buf"]``:
    at ``state["rows"], state["last"]`` (``"last"``) or averaged under ``state["mask"]`` (``"mean"``);
    ``x`` holds the batch's new tokens (after any cached prefix)."""

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]  # (B, T, H*d)
        if positions == "last":
            picked = x[state["rows"], state["last"]]
        else:
            m = state["mask"].unsqueeze(-1).to(x.dtype)
            picked = (x * m).sum(1) / m.sum(1)
        state["buf"][:, layer] = picked.view(-1, H, d).to(out_dtype)

    return hook


def _run(
    model: Any,
    tokenizer: Any,
    sites: Any,
    encoded: list[list[int]],
    positions: str,
    batch_size: int,
    out_dtype: torch.dtype,
    max_batch_tokens: int | None,
    progress: bool,
) -> torch.Tensor:
    N, L, H, d = len(encoded), sites.n_layers, sites.n_heads, sites.head_dim
    out = torch.empty((N, L, H, d), dtype=out_dtype)
    base = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    pass_positions = _accepts(base.forward, "position_ids")
    state: dict[str, torch.Tensor] = {}

    with ExitStack() as stack:
        for layer, module in enumerate(sites.modules):
            handle = module.register_forward_pre_hook(_grab_hook(layer, state, positions, H, d, out_dtype))
            stack.callback(handle.remove)
        bar = tqdm(total=N, desc="collect", unit="text", disable=not progress)
        stack.callback(bar.close)
        for idx in _batches([len(ids) for ids in encoded], batch_size, max_batch_tokens):
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            input_ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            state["rows"] = torch.arange(len(idx), device=device)
            state["last"] = last_token_index(mask)
            state["mask"] = mask
            state["buf"] = torch.empty((len(idx), L, H, d), dtype=out_dtype, device=device)
            kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "use_cache": False}
            if pass_positions:
                kwargs["position_ids"] = position_ids_from_mask(mask)
            base(**kwargs)
            out[torch.as_tensor(idx)] = state["buf"].cpu()
            bar.update(len(idx))
    return out


@dataclass(frozen=True)
class _ContextRow:
    """One text in context: the tokens to run, whether they run on the shared prefix cache, and where
    the text's own tokens start among them."""

    ids: list[int]
    on_prefix: bool  # True: ``ids`` are the text's tokens after the prefix's; False: the whole string
    start: int  # first text token in ``ids`` (0 when on the prefix cache)


def _encode_in_context(
    tokenizer: Any, prefix: str, texts: list[str], max_length: int | None, context: int | None
) -> tuple[list[int], list[_ContextRow]]:
    """The prefix's ids and, per text, the ids of ``prefix + text`` tokenized as one string, split at the
    prefix (see :func:`collect`)."""
    specials = set(getattr(tokenizer, "all_special_ids", None) or ())
    prefix_ids = list(tokenizer(prefix, add_special_tokens=True)["input_ids"])
    while len(prefix_ids) > 1 and prefix_ids[-1] in specials:  # nor is an EOS after the prefix
        prefix_ids.pop()
    P = len(prefix_ids)
    rows: list[_ContextRow] = []
    merged = 0
    for i, full in enumerate(tokenizer([prefix + t for t in texts], add_special_tokens=True)["input_ids"]):
        full = list(full)
        while len(full) > P and full[-1] in specials:  # an EOS appended by the tokenizer is not text
            full.pop()
        if full[:P] == prefix_ids:
            row = _ContextRow(full[P:], True, 0)
        else:
            merged += 1
            row = _ContextRow(full, False, common_prefix_len(full, prefix_ids))
        n_text = len(row.ids) - row.start
        if n_text <= 0:
            raise DataError(
                f"Text {i} adds no token after the prefix ({texts[i][:40]!r}); remove empty texts."
            )
        if max_length is not None and n_text > max_length:
            row = _ContextRow(row.ids[: row.start + max_length], row.on_prefix, row.start)
        total = len(row.ids) + (P if row.on_prefix else 0)
        if context is not None and total > context:
            raise DataError(
                f"Text {i} with the prefix is {total} tokens, longer than the model's context of {context} "
                f"({texts[i][:40]!r}...). Use a shorter prefix, or cut every text to its first N tokens "
                f"(command line: --max-length N; Python: max_length=N) with N <= {max(context - P, 1)}."
            )
        rows.append(row)
    if merged:
        logger.info("%d of %d texts merge tokens across the prefix boundary; they run whole (no prefix "
                    "cache).", merged, len(texts))  # fmt: skip
    return prefix_ids, rows


def _run_in_context(
    model: Any,
    tokenizer: Any,
    sites: Any,
    prefix_ids: list[int],
    rows: list[_ContextRow],
    positions: str,
    batch_size: int,
    out_dtype: torch.dtype,
    max_batch_tokens: int | None,
    progress: bool,
) -> torch.Tensor:
    """:func:`_run` for texts after a prefix: right-padded batches on forks of the prefix's KV cache (rows
    that merge across the boundary run whole), activations read at the text's own tokens."""
    N, L, H, d = len(rows), sites.n_layers, sites.n_heads, sites.head_dim
    out = torch.empty((N, L, H, d), dtype=out_dtype)
    base = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    pass_positions = _accepts(base.forward, "position_ids")
    cache_name = cache_kwarg(base)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    P = len(prefix_ids)
    prefix_cache = None
    if any(r.on_prefix for r in rows):  # before the hooks: the prefix's own activations are not wanted
        prefix_cache = output_cache(base(input_ids=torch.tensor([prefix_ids], device=device), use_cache=True))
    state: dict[str, torch.Tensor] = {}

    on_prefix = [i for i, r in enumerate(rows) if r.on_prefix]
    whole = [i for i, r in enumerate(rows) if not r.on_prefix]
    batches: list[np.ndarray] = []
    for group, past in ((on_prefix, P), (whole, 0)):
        lengths = [past + len(rows[i].ids) for i in group]
        if group:
            batches += [np.asarray(group)[b] for b in _batches(lengths, batch_size, max_batch_tokens)]
    with ExitStack() as stack:
        for layer, module in enumerate(sites.modules):
            handle = module.register_forward_pre_hook(_grab_hook(layer, state, positions, H, d, out_dtype))
            stack.callback(handle.remove)
        bar = tqdm(total=N, desc="collect", unit="text", disable=not progress)
        stack.callback(bar.close)
        for idx in batches:
            batch = [rows[i] for i in idx]
            past = P if batch[0].on_prefix else 0
            B, T = len(batch), max(len(r.ids) for r in batch)
            ids = torch.full((B, T), pad, dtype=torch.long)
            mask = torch.zeros((B, past + T), dtype=torch.long)
            span = torch.zeros((B, T), dtype=torch.bool)
            for b, r in enumerate(batch):
                ids[b, : len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
                mask[b, : past + len(r.ids)] = 1
                span[b, r.start : len(r.ids)] = True
            n_tokens = torch.tensor([len(r.ids) for r in batch])
            state["rows"] = torch.arange(B, device=device)
            state["last"] = (n_tokens - 1).to(device)
            state["mask"] = span.to(device)
            state["buf"] = torch.empty((B, L, H, d), dtype=out_dtype, device=device)
            kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if pass_positions:
                kwargs["position_ids"] = torch.arange(past, past + T, device=device).expand(B, T)
            if past:
                kwargs[cache_name] = fork_cache(prefix_cache, B)
                kwargs["use_cache"] = True
            else:
                kwargs["use_cache"] = False
            base(**kwargs)
            out[torch.as_tensor(idx)] = state["buf"].cpu()
            bar.update(B)
    return out
