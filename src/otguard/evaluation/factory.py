"""Judges and toxicity scorers built from the short names the CLI and the run configuration use.

The one place that knows every implementation: :func:`make_judge` (``learned``, ``sem``, ``bleu``,
``rougeL``, ``openai``) and :func:`make_scorer` (``profanity``, ``embedding``, ``detoxify``, ``perspective``).
The protocols they return are :class:`~otguard.evaluation.verdicts.Judge` and
:class:`~otguard.evaluation.toxicity_scorers.ToxicityScorer`.
"""

from __future__ import annotations

from typing import Any

from otguard.evaluation.llm_judge import OpenAIJudge
from otguard.evaluation.overlap import ReferenceOverlapJudge
from otguard.evaluation.perspective import PerspectiveScorer
from otguard.evaluation.semantic import DEFAULT_EMBEDDER, SemJudge, SentenceEmbedder
from otguard.evaluation.toxicity_scorers import (
    DetoxifyScorer,
    EmbeddingToxicityScorer,
    ProfanityScorer,
    ToxicityScorer,
)
from otguard.evaluation.verdicts import Judge

__all__ = ["JUDGE_NAMES", "SCORER_NAMES", "make_judge", "make_scorer"]

JUDGE_NAMES = ("sem", "bleu", "rougeL", "openai", "learned")
SCORER_NAMES = ("embedding", "profanity", "detoxify", "perspective")


def make_judge(spec: str, **kwargs: Any) -> Judge:
    """Build a judge from a short name (for CLIs).

    ``"learned"``: truth and info judges trained on TruthfulQA's human labels (keyword arguments
    ``data_dir``, ``labels`` = ``"truthfulqa"``, ``"nqopen"`` or a label-file path, ``settings``,
    ``cache``; trained once, then read from the otguard cache); ``"learned:<folder or Hub repo>"``
    loads a saved one (:class:`~otguard.evaluation.learned_judge.LearnedJudge`).
    ``"sem"`` / ``"sem:<embedding model>"`` (default ``minilm``; ``embedder=`` overrides),
    ``"bleu"``, ``"rougeL"``, ``"openai"`` (keyword arguments and the environment, see
    :meth:`~otguard.evaluation.llm_judge.OpenAIJudge.from_env`).
    """
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "learned":
        from otguard.evaluation.learned_judge import LearnedJudge

        if arg:
            return LearnedJudge.load(arg)
        labels = kwargs.pop("labels", None) or "truthfulqa"
        return LearnedJudge.from_labels(labels, kwargs.pop("data_dir", None), **kwargs)
    if kind == "sem":
        embedder = kwargs.pop("embedder", None)
        if embedder is None:
            embedder = SentenceEmbedder(arg or DEFAULT_EMBEDDER, **kwargs)
        return SemJudge(embedder)
    if kind in ("bleu", "rouge", "rougel", "rouge-l", "rouge_l"):
        return ReferenceOverlapJudge("bleu" if kind == "bleu" else "rougeL", **kwargs)
    if kind == "openai":
        return OpenAIJudge.from_env(**kwargs)
    raise ValueError(
        f"Unknown judge {spec!r}; use 'learned', 'learned:<folder>', 'sem', 'sem:<model>', 'bleu', 'rougeL' "
        "or 'openai'."
    )


def make_scorer(spec: str, **kwargs: Any) -> ToxicityScorer:
    """Build a scorer from a CLI name.

    ``"profanity"``; ``"embedding"`` / ``"embedding:<embedding model>"`` (default ``minilm``; keyword
    arguments ``embedder``, ``data_dir``, ``exclude_groups`` (the evaluated groups), ``train_groups``,
    ``C``, ``seed``, ``source``: fitted here on ToxiGen statements); ``"detoxify"`` /
    ``"detoxify:<model>"``; ``"perspective"`` (``api_key`` or ``$PERSPECTIVE_API_KEY``, plus
    :class:`~otguard.evaluation.perspective.PerspectiveScorer` options).
    """
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "profanity":
        return ProfanityScorer()
    if kind == "embedding":
        from otguard.data.toxigen import toxigen_statements

        embedder = kwargs.pop("embedder", None)
        if embedder is None:
            embedder = SentenceEmbedder(arg or DEFAULT_EMBEDDER)
        data = toxigen_statements(kwargs.pop("data_dir", None), source=kwargs.pop("source", "both"))
        exclude = kwargs.pop("exclude_groups", None)
        train = kwargs.pop("train_groups", None)
        return EmbeddingToxicityScorer(embedder, **kwargs).fit(data, exclude, train_groups=train)
    if kind == "detoxify":
        return DetoxifyScorer(arg or "original", **kwargs)
    if kind == "perspective":
        return PerspectiveScorer.from_env(**kwargs)
    raise ValueError(
        f"Unknown toxicity scorer {spec!r}; use 'profanity', 'embedding', 'detoxify' or 'perspective'."
    )
