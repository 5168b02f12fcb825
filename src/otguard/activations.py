"""Collecting per-head activations, batched, for all layers at once, with an on-disk cache.

One forward pre-hook per layer (see :mod:`otguard.sites`) gathers the wanted token position(s)
of every row straight into a preallocated ``(N, L, H, d)`` tensor, so a batch costs one forward
pass of the base model (no LM head). Texts are sorted by length to minimise padding; results do
not depend on the batch size or the padding side (the last *real* token is found from the
attention mask, and position ids are derived from it).

Results are cached under ``<cache>/activations/<key>/`` where the key hashes the model
fingerprint, the data fingerprint (texts, labels, groups: so a template change invalidates it),
the positions rule and the storage dtype. Writes go to a temporary folder renamed at the end:
an interrupted run leaves no half-written cache.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from otguard.errors import DataError
from otguard.io import atomic_dir, package_version
from otguard.models import cache_dir as default_cache_dir
from otguard.sites import ModelIdentity, find_head_sites, model_identity

logger = logging.getLogger(__name__)

Positions = Literal["last", "mean"]
CACHE_FORMAT = 1
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
        """Read a folder written by :meth:`save`."""
        path = Path(directory)
        tensor_file, meta_file = path / "activations.safetensors", path / "meta.json"
        if not tensor_file.is_file() or not meta_file.is_file():
            raise DataError(
                f"{path} is not an activation folder (needs activations.safetensors and meta.json)."
            )
        tensors = load_file(str(tensor_file))
        meta = json.loads(meta_file.read_text())
        return cls(tensors["acts"], tensors["labels"], tensors["groups"], meta)


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
    identity: ModelIdentity, data_fingerprint: str, positions: str, dtype: str, max_length: int | None
) -> str:
    """Hash of everything that determines the activations."""
    payload = {
        "format": CACHE_FORMAT,
        "model": identity.fingerprint(),
        "data": data_fingerprint,
        "positions": positions,
        "dtype": dtype,
        "max_length": max_length,
    }
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
    cache: bool | str | os.PathLike[str] = True,
    progress: bool = True,
) -> ActivationSet:
    """Per-head activations ``(N, L, H, d)`` of ``data`` at the output-projection input.

    ``data``: a :class:`otguard.data.TextDataset` or a list of strings. ``positions``: ``"last"``
    (the last real token, the papers' choice) or ``"mean"`` (mean over real tokens). ``dtype``:
    storage dtype (``"float16"`` halves memory; probes compute in float32). ``cache``: ``True``
    for the default cache folder, a path, or ``False``.
    """
    if positions not in ("last", "mean"):
        raise ValueError(f"positions must be 'last' or 'mean', got {positions!r}.")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    texts, labels, groups, name, data_fp = _as_dataset(data)
    if not texts:
        raise DataError("collect() got no texts.")
    sites = find_head_sites(model)
    identity = model_identity(model, sites)
    key = cache_key(identity, data_fp, positions, dtype, max_length)
    cache_path: Path | None = None
    if cache:
        root = default_cache_dir(None if cache is True else cache)
        cache_path = root / "activations" / key
        if (cache_path / "meta.json").is_file():
            logger.info("Activations for %s loaded from cache %s", name, cache_path)
            return ActivationSet.load(cache_path)

    acts = _run(model, tokenizer, sites, texts, positions, batch_size, _DTYPES[dtype], max_length, progress)
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
    result = ActivationSet(acts, torch.from_numpy(labels.copy()), torch.from_numpy(groups.copy()), meta)
    if cache_path is not None:
        result.save(cache_path)
        logger.info("Cached activations at %s", cache_path)
    return result


def _run(
    model: Any,
    tokenizer: Any,
    sites: Any,
    texts: list[str],
    positions: str,
    batch_size: int,
    out_dtype: torch.dtype,
    max_length: int | None,
    progress: bool,
) -> torch.Tensor:
    N, L, H, d = len(texts), sites.n_layers, sites.n_heads, sites.head_dim
    encoded = tokenizer(
        texts, add_special_tokens=True, truncation=max_length is not None, max_length=max_length
    )["input_ids"]
    if any(len(ids) == 0 for ids in encoded):
        raise DataError("A text tokenized to zero tokens; remove empty texts.")
    order = np.argsort([-len(ids) for ids in encoded], kind="stable")
    out = torch.empty((N, L, H, d), dtype=out_dtype)
    base = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    pass_positions = _accepts(base.forward, "position_ids")
    state: dict[str, torch.Tensor] = {}

    def make_hook(layer: int):
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]  # (B, T, H*d)
            if positions == "last":
                picked = x[state["rows"], state["last"]]
            else:
                m = state["mask"].unsqueeze(-1).to(x.dtype)
                picked = (x * m).sum(1) / m.sum(1)
            state["buf"][:, layer] = picked.view(-1, H, d).to(out_dtype)

        return hook

    with ExitStack() as stack:
        for layer, module in enumerate(sites.modules):
            handle = module.register_forward_pre_hook(make_hook(layer))
            stack.callback(handle.remove)
        bar = tqdm(total=N, desc="collect", unit="text", disable=not progress)
        stack.callback(bar.close)
        for start in range(0, N, batch_size):
            idx = order[start : start + batch_size]
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
