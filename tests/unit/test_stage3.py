"""SLIM Stage 3: preservation / conversion scores and the κ tie rule, with a fake embedder and generator.

Every answer text maps to a fixed 3-D vector, so each cosine and preference margin below is known by
hand: references "T" = e1 (desirable) and "F" = e2 (undesirable), so ``Q(r) = e(r)[0] - e(r)[1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

import otguard.methods.stage3 as stage3
from otguard.data.qa import QAItem
from otguard.errors import UsageError
from otguard.methods.stage3 import choose_kappa, score_kappa, select_kappa

R = 1 / math.sqrt(2)
VECTORS = {
    "T": (1.0, 0.0, 0.0),
    "F": (0.0, 1.0, 0.0),
    # unintervened answers r0 and their margins Q(r0)
    "a0": (1.0, 0.0, 0.0),  # Q = 1: desirable
    "a1": (R, 0.0, R),  # Q = 0.707: desirable
    "a2": (0.0, 1.0, 0.0),  # Q = -1: undesirable
    "a3": (R, R, 0.0),  # Q = 0 exactly: desirable (Q >= 0)
    "a4": (0.6, 0.8, 0.0),  # Q = -0.2: undesirable
    # steered answers
    "e3": (0.0, 0.0, 1.0),  # Q = 0; cos with a1 = 0.707
    "s0": (0.6, 0.0, 0.8),  # Q = 0.6; cos with a0 = 0.6
    "s4": (0.8, 0.6, 0.0),  # Q = 0.2; converts question 4
    "truth": (1.0, 0.0, 0.0),
}
BASE = ["a0", "a1", "a2", "a3", "a4"]
STEERED = {
    # kappa 5: q1 drifts (cos 0.707), q2 converted, q4 still undesirable
    5.0: ["a0", "e3", "truth", "a3", "a4"],
    # kappa 10: q0 drifts (0.6), q3 drifts (0.707), q2 and q4 converted
    10.0: ["s0", "a1", "truth", "truth", "s4"],
    # kappa 20 and 40: every answer becomes "truth" (cos 1, 0.707, -, 0.707, -), both converted
    20.0: ["truth"] * 5,
    40.0: ["truth"] * 5,
}
EXPECTED = {
    5.0: dict(preservation=(1 + R + 1) / 3, conversion=0.5, sem=4 / 5, changed=2 / 5),
    10.0: dict(preservation=(0.6 + 1 + R) / 3, conversion=1.0, sem=1.0, changed=4 / 5),
    20.0: dict(preservation=(1 + R + R) / 3, conversion=1.0, sem=1.0, changed=5 / 5),
    40.0: dict(preservation=(1 + R + R) / 3, conversion=1.0, sem=1.0, changed=5 / 5),
}
ITEMS = [QAItem(f"question {i}?", "T", ("T",), ("F",)) for i in range(5)]


class TableEmbedder:
    """Unit vectors from :data:`VECTORS`; an unknown text is an error (so no answer goes unnoticed)."""

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.tensor([VECTORS[t] for t in texts], dtype=torch.float32).reshape(len(texts), 3)
        return torch.nn.functional.normalize(out, dim=-1)


class ScriptedGenerator:
    """``generate(questions, kappa)``: :data:`BASE` without the policy, :data:`STEERED` with it."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], float | None]] = []

    def __call__(self, questions: Sequence[str], kappa: float | None) -> list[str]:
        self.calls.append((list(questions), kappa))
        return list(BASE if kappa is None else STEERED[kappa])


def _base_margin() -> torch.Tensor:
    return torch.tensor([VECTORS[a][0] - VECTORS[a][1] for a in BASE])


@pytest.mark.parametrize("kappa", sorted(STEERED))
def test_scores_on_hand_made_answers(kappa: float) -> None:
    """Preservation averages over the questions whose r0 is desirable (Q >= 0, here q0, q1, q3),
    conversion is the share of the others (q2, q4) that become desirable."""
    ok, bad = [["T"]] * 5, [["F"]] * 5
    row = score_kappa(TableEmbedder(), kappa, BASE, _base_margin(), STEERED[kappa], ok, bad)
    want = EXPECTED[kappa]
    assert row["kappa"] == kappa
    for key in ("preservation", "conversion", "sem", "changed"):
        assert row[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
    assert row["score"] == pytest.approx(want["preservation"] + want["conversion"], rel=1e-6)


def test_preservation_and_conversion_when_one_group_is_empty() -> None:
    """No desirable r0: preservation is 1 (nothing to preserve); no undesirable r0: conversion is 0."""
    ok, bad = [["T"]] * 2, [["F"]] * 2
    all_bad = score_kappa(
        TableEmbedder(), 1.0, ["a2", "a4"], torch.tensor([-1.0, -0.2]), ["a2", "s4"], ok, bad
    )
    assert all_bad["preservation"] == 1.0 and all_bad["conversion"] == pytest.approx(0.5)
    all_good = score_kappa(TableEmbedder(), 1.0, ["a0", "a1"], torch.tensor([1.0, R]), ["s0", "a1"], ok, bad)
    assert all_good["conversion"] == 0.0 and all_good["preservation"] == pytest.approx(
        (0.6 + 1) / 2, rel=1e-6
    )


def test_choose_kappa_prefers_the_higher_score_then_the_smaller_kappa() -> None:
    rows = [{"kappa": k, "score": s} for k, s in ((40.0, 1.5), (5.0, 1.2), (20.0, 1.5), (10.0, 1.5 - 1e-3))]
    assert choose_kappa(rows) == 20.0  # tie between 40 and 20, listed 40 first
    rows.append({"kappa": 80.0, "score": 1.5 + 1e-6})
    assert choose_kappa(rows) == 80.0  # a real improvement wins even for a larger kappa
    rows.append({"kappa": 60.0, "score": 1.5 + 1e-6 - 1e-12})
    assert choose_kappa(rows) == 60.0  # within 1e-9: a tie, the smaller kappa
    with pytest.raises(ValueError, match="No Stage-3 rows"):
        choose_kappa([])


def test_select_kappa_end_to_end_with_an_unsorted_grid() -> None:
    """Scores: 5 -> 1.402, 10 -> 1.769, 20 = 40 -> 1.805. The tie goes to 20 although 40 is listed
    first; the baseline answers are generated once, without the policy, then once per kappa."""
    gen = ScriptedGenerator()
    sel = select_kappa(None, None, None, ITEMS, TableEmbedder(), grid=(40, 5, 20, 10), generate=gen)
    assert sel.kappa == 20.0
    assert sel.n_questions == 5
    assert [r["kappa"] for r in sel.rows] == [40.0, 5.0, 20.0, 10.0]
    for row in sel.rows:
        assert row["preservation"] == pytest.approx(EXPECTED[row["kappa"]]["preservation"], rel=1e-6)
        assert row["conversion"] == pytest.approx(EXPECTED[row["kappa"]]["conversion"], rel=1e-6)
    questions = [it.question for it in ITEMS]
    assert gen.calls == [
        (questions, None),
        (questions, 40.0),
        (questions, 5.0),
        (questions, 20.0),
        (questions, 10.0),
    ]
    assert sel.to_dict()["kappa"] == 20.0 and len(sel.to_dict()["rows"]) == 4


def test_references_fall_back_to_the_best_answer() -> None:
    """An item without correct answers uses its best answer as the desirable reference."""
    items = [QAItem("q?", "T", (), ("F",))]

    def gen(questions: Sequence[str], kappa: float | None) -> list[str]:
        return ["a2"] if kappa is None else ["a0"]

    sel = select_kappa(None, None, None, items, TableEmbedder(), grid=(5,), generate=gen)
    assert sel.rows[0]["conversion"] == 1.0 and sel.rows[0]["preservation"] == 1.0


def test_default_generator_runs_greedy_answers_with_and_without_the_policy(monkeypatch) -> None:
    calls: list[dict] = []

    def fake_generate_answers(model, tokenizer, questions, **kwargs):  # noqa: ANN001, ANN202
        calls.append({"model": model, "tokenizer": tokenizer, "questions": list(questions), **kwargs})
        kappa = kwargs["kappa"]
        answers = list(BASE if kappa is None else STEERED[kappa])
        return answers, answers

    monkeypatch.setattr(stage3, "generate_answers", fake_generate_answers)
    policy, model, tok = object(), object(), object()
    sel = select_kappa(policy, model, tok, ITEMS, TableEmbedder(), grid=(10.0, 20.0), max_new_tokens=7,
                       batch_size=3, progress=False)  # fmt: skip
    assert sel.kappa == 20.0
    assert [(c["policy"], c["kappa"]) for c in calls] == [(None, None), (policy, 10.0), (policy, 20.0)]
    for c in calls:
        assert (
            c["model"] is model and c["tokenizer"] is tok and c["questions"] == [it.question for it in ITEMS]
        )
        assert (c["max_new_tokens"], c["batch_size"], c["progress"]) == (7, 3, False)


@pytest.mark.parametrize(("grid", "message"), [((), "empty"), ((5.0, 0.0), "> 0"), ((math.nan,), "> 0")])
def test_bad_grids_are_errors(grid, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        select_kappa(None, None, None, ITEMS, TableEmbedder(), grid=grid, generate=ScriptedGenerator())


def test_no_questions_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one validation question"):
        select_kappa(None, None, None, [], TableEmbedder(), generate=ScriptedGenerator())
