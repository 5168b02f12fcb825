"""SLIM Stage 3: choose the aggregation strength κ on semantic preference data.

For validation questions, greedy answers are generated without the policy (``r0``) and with it at
each κ of a grid (``r_κ``). With ``Q`` the SEM preference margin (:mod:`otguard.evaluation.semantic`):

- questions whose unintervened answer is already desirable (``Q(r0) >= 0``) should keep their
  meaning: *preservation* = mean cosine ``cos(e(r_κ), e(r0))`` over them (a false detection that
  rewrites a good answer costs here; unflagged answers are unchanged and score 1);
- questions whose answer is undesirable should move to the desirable side: *conversion* = share
  of them with ``Q(r_κ) >= 0``.

κ* maximises preservation + conversion (ties, within 1e-9: the smallest κ, whatever the grid order).
No parameter is trained by gradient. The answers come from a ``generate(questions, kappa)`` callable
(``kappa=None``: without the policy); by default greedy :func:`generate_answers`, and tests pass a
fake one together with a fake :class:`Embedder`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from otguard.errors import UsageError
from otguard.evaluation.semantic import Embedder, pairwise_similarity, preference_margin
from otguard.evaluation.truthfulqa_gen import generate_answers
from otguard.methods.grids import KAPPA_GRID

logger = logging.getLogger(__name__)

DEFAULT_KAPPA_GRID = KAPPA_GRID  # the sweep's default SLIM grid too (methods/grids.py)
_TIE_TOL = 1e-9  # scores are sums of float32 cosines: closer than this is a tie

#: ``generate(questions, kappa)`` -> one answer per question; ``kappa=None`` means without the policy.
Generate = Callable[[Sequence[str], float | None], list[str]]


@dataclass
class KappaSelection:
    """Result of Stage 3: the chosen κ and the per-κ criterion table."""

    kappa: float
    rows: list[dict[str, float]] = field(default_factory=list)
    n_questions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kappa": self.kappa, "rows": self.rows, "n_questions": self.n_questions}


def score_kappa(
    embedder: Embedder,
    kappa: float,
    base: Sequence[str],
    base_margin: torch.Tensor,
    steered: Sequence[str],
    desirable: Sequence[Sequence[str]],
    undesirable: Sequence[Sequence[str]],
) -> dict[str, float]:
    """Stage-3 criterion of one κ from the unintervened answers ``base`` and the ``steered`` ones.

    ``base_margin``: ``Q(r0)`` per question (:func:`preference_margin` of ``base``); ``Q >= 0`` is
    desirable. Returns kappa, preservation (mean cosine to ``base`` over desirable-``base``
    questions; 1.0 when there are none), conversion (share of undesirable-``base`` questions whose
    steered answer has ``Q >= 0``; 0.0 when there are none), score = preservation + conversion, sem
    (share of steered answers with ``Q >= 0``) and changed (share of answers whose text changed).
    """
    if not (len(base) == len(steered) == len(base_margin)):
        raise ValueError("base, steered and base_margin must have one entry per question.")
    good = base_margin >= 0
    q = preference_margin(embedder, steered, desirable, undesirable)
    sim = pairwise_similarity(embedder, steered, base)
    preservation = float(sim[good].mean()) if bool(good.any()) else 1.0
    conversion = float((q[~good] >= 0).float().mean()) if bool((~good).any()) else 0.0
    changed = sum(a != b for a, b in zip(steered, base, strict=True)) / len(base)
    return {
        "kappa": float(kappa),
        "preservation": preservation,
        "conversion": conversion,
        "score": preservation + conversion,
        "sem": float((q >= 0).float().mean()),
        "changed": changed,
    }


def choose_kappa(rows: Sequence[dict[str, float]]) -> float:
    """The κ with the highest score; ties (within 1e-9) go to the smallest κ, the gentlest edit."""
    if not rows:
        raise ValueError("No Stage-3 rows to choose kappa from.")
    best = max(r["score"] for r in rows)
    return min(r["kappa"] for r in rows if r["score"] >= best - _TIE_TOL)


def _check_grid(grid: Sequence[float]) -> list[float]:
    if not grid:
        raise UsageError("The kappa grid is empty; give at least one kappa (e.g. --kappa-grid 5,10,20,40).")
    values = [float(k) for k in grid]
    bad = [k for k in values if not (math.isfinite(k) and k > 0)]
    if bad:
        raise UsageError(f"Every kappa in the grid must be a finite number > 0; got {bad}.")
    return values


def sample_questions(items: Sequence[Any], n: int, seed: int) -> list[Any]:
    """A seeded random sample of ``n`` validation questions (all of them when there are fewer), in
    their original order.

    Drawn from *all* validation questions, not the first ``n`` by index: TruthfulQA is sorted by
    category, so the first questions would all come from a few categories.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}.")
    if n >= len(items):
        return list(items)
    import numpy as np

    pick = np.sort(np.random.default_rng(seed).choice(len(items), size=n, replace=False))
    return [items[int(i)] for i in pick]


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
    generate: Generate | None = None,
) -> KappaSelection:
    """Pick κ for a SLIM ``policy`` on validation ``items`` (QAItem-like: question + references).

    ``generate``: how answers are produced; None = greedy :func:`generate_answers` with ``model``,
    ``tokenizer`` and ``policy`` at each κ (and without the policy for the baseline answers).
    """
    if not items:
        raise ValueError("Stage 3 needs at least one validation question.")
    kappas = _check_grid(grid)
    questions = [it.question for it in items]
    ok = [list(it.correct_answers) or [it.best_answer] for it in items]
    bad = [list(it.incorrect_answers) for it in items]

    if generate is None:

        def generate(qs: Sequence[str], kappa: float | None) -> list[str]:
            return generate_answers(
                model,
                tokenizer,
                qs,
                policy=None if kappa is None else policy,
                kappa=kappa,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=progress,
            )[0]

    base = list(generate(questions, None))
    q0 = preference_margin(embedder, base, ok, bad)
    rows = []
    for kappa in kappas:
        row = score_kappa(embedder, kappa, base, q0, list(generate(questions, kappa)), ok, bad)
        rows.append(row)
        logger.info(
            "Stage 3 kappa=%g: preservation %.3f conversion %.3f changed %.2f",
            kappa,
            row["preservation"],
            row["conversion"],
            row["changed"],
        )
    return KappaSelection(kappa=choose_kappa(rows), rows=rows, n_questions=len(items))
