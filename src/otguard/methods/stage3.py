"""SLIM Stage 3: choose the aggregation strength κ on semantic preference data.

For validation questions, greedy answers are generated without the policy (``r0``) and with it at
each κ of a grid (``r_κ``). With ``Q`` the SEM preference margin (:mod:`otguard.evaluation.semantic`):

- questions whose unintervened answer is already desirable (``Q(r0) >= 0``) should keep their
  meaning: *preservation* = mean cosine ``cos(e(r_κ), e(r0))`` over them (a false detection that
  rewrites a good answer costs here; unflagged answers are unchanged and score 1);
- questions whose answer is undesirable should move to the desirable side: *conversion* = share
  of them with ``Q(r_κ) >= 0``.

κ* maximises preservation + conversion (ties: the smaller κ). No parameter is trained by gradient.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from otguard.evaluation.semantic import Embedder, pairwise_similarity, preference_margin
from otguard.evaluation.truthfulqa_gen import generate_answers

logger = logging.getLogger(__name__)

DEFAULT_KAPPA_GRID = (5.0, 10.0, 20.0, 40.0)


@dataclass
class KappaSelection:
    """Result of Stage 3: the chosen κ and the per-κ criterion table."""

    kappa: float
    rows: list[dict[str, float]] = field(default_factory=list)
    n_questions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kappa": self.kappa, "rows": self.rows, "n_questions": self.n_questions}


def select_kappa(
    policy: Any,
    model: Any,
    tokenizer: Any,
    items: Sequence[Any],
    embedder: Embedder,
    *,
    grid: Sequence[float] = DEFAULT_KAPPA_GRID,
    max_new_tokens: int = 50,
    batch_size: int = 32,
    progress: bool = True,
) -> KappaSelection:
    """Pick κ for a SLIM ``policy`` on validation ``items`` (QAItem-like: question + references)."""
    if not items:
        raise ValueError("Stage 3 needs at least one validation question.")
    if not grid:
        raise ValueError("The kappa grid is empty.")
    questions = [it.question for it in items]
    ok = [list(it.correct_answers) or [it.best_answer] for it in items]
    bad = [list(it.incorrect_answers) for it in items]

    def answers(kappa: float | None) -> list[str]:
        return generate_answers(
            model,
            tokenizer,
            questions,
            policy=None if kappa is None else policy,
            kappa=kappa,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
        )[0]

    base = answers(None)
    q0 = preference_margin(embedder, base, ok, bad)
    good = q0 >= 0
    rows = []
    for kappa in grid:
        steered = answers(float(kappa))
        q = preference_margin(embedder, steered, ok, bad)
        sim = pairwise_similarity(embedder, steered, base)
        preservation = float(sim[good].mean()) if bool(good.any()) else 1.0
        conversion = float((q[~good] >= 0).float().mean()) if bool((~good).any()) else 0.0
        changed = sum(a != b for a, b in zip(steered, base, strict=True)) / len(base)
        rows.append(
            {
                "kappa": float(kappa),
                "preservation": preservation,
                "conversion": conversion,
                "score": preservation + conversion,
                "sem": float((q >= 0).float().mean()),
                "changed": changed,
            }
        )
        logger.info(
            "Stage 3 kappa=%g: preservation %.3f conversion %.3f changed %.2f",
            kappa,
            preservation,
            conversion,
            changed,
        )
    scores = torch.tensor([r["score"] for r in rows])
    best = int(torch.nonzero(scores == scores.max())[0])
    return KappaSelection(kappa=rows[best]["kappa"], rows=rows, n_questions=len(items))
