"""Vote thresholds calibrated where the gate runs, with a finite-sample bound on the false-flag rate.

A policy's vote threshold ``tau`` (flag a position iff ``sum_h vote_h >= tau``) is chosen on bank texts
(the last token of ``Q: … A: …``), but the gate runs on every position of an answer generated after the
instruction and the six-shot primer, where it flags far more true-answer positions (see
:mod:`otguard.evaluation.gate`). :func:`calibrate_gate` sets ``tau`` on **validation** questions in that
context: their correct and incorrect reference answers are teacher-forced in the generation prompt with
the policy attached (:func:`otguard.evaluation.gate.gate_answers`), and ``tau`` becomes the smallest vote
count whose *conformal risk control* bound (Angelopoulos, Bates, Fisch, Lei, Schuster: "Conformal risk
control", ICLR 2024) on the false-flag loss holds:

- loss of a true answer ``i`` at threshold ``tau``: ``L_i(tau)`` = share of its answer positions whose
  vote count is ``>= tau`` (``loss="positions"``), or 1 if any position is, else 0 (``loss="answer"``:
  the per-answer decision "does this correct answer get edited at all"). Both are non-increasing in
  ``tau`` and bounded by 1;
- the exchangeable units: answers are (the positions of one answer are not: they share the answer's
  words and prefix). The folds split TruthfulQA **by question**, though, and a question's reference
  answers share its prompt, so ``unit="question"`` (the default) averages the losses of a question's
  true answers into one loss ``L_q(tau)``; a new test question is then exchangeable with the
  calibration questions, which a new answer of an already-seen question is not. ``unit="answer"``
  treats each true answer as a unit (tighter, by ``1/(n+1)``, but only exact when answers are drawn
  independently);
- rule: the smallest ``tau`` in ``0..H+1`` with ``(sum_i L_i(tau) + 1) / (n + 1) <= alpha``. With ``n``
  units exchangeable with the test unit, ``E[L_test(tau_hat)] <= alpha``. ``tau = H + 1`` never flags
  (at most ``H`` heads vote), so its bound is ``1 / (n + 1)``; if even that exceeds ``alpha`` (fewer
  than ``1/alpha - 1`` units), the layer is switched off (``tau = H + 1``) and the record says
  ``feasible: false``.

Multi-layer policies: the hook gates each layer on its own vote count, and a position is edited if any
layer flags it, so each gated layer gets its own threshold at the budget ``alpha / (gated layers)``;
by the union bound the share of true-answer positions flagged on some layer is bounded by ``alpha`` in
expectation. The layers are calibrated in forward order, each with the earlier layers' new thresholds
attached (in ``mode="repair"`` an edit at layer ``l`` changes what later layers see, as at generation);
a later layer's losses then depend on the calibration data through the earlier thresholds, so for it
the bound is a close approximation rather than exact. One-layer policies (the RADIANT/SLIM defaults)
need one teacher-forced pass, and the bound is exact: a layer's own threshold does not change its votes.

The guarantee is about true answers in the generation prompt drawn like the validation questions; it
says nothing about the catch rate, which the record tabulates at every ``tau`` next to the bound.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from otguard.errors import ConfigError, DataError
from otguard.evaluation.gate import AnswerGate, gate_answers
from otguard.io import json_finite

logger = logging.getLogger(__name__)

__all__ = [
    "GateCalibration", "LayerCalibration", "Loss", "Unit", "answer_losses", "calibrate_gate",
    "choose_threshold", "crc_bound", "unit_losses",
]  # fmt: skip

Loss = Literal["positions", "answer"]
Unit = Literal["question", "answer"]
_LOSSES = ("positions", "answer")
_UNITS = ("question", "answer")


@dataclass
class LayerCalibration:
    """One gated layer: the chosen threshold and the validation table at every threshold ``0..H+1``.

    ``table`` rows: ``tau``, ``bound`` (the CRC bound), ``risk`` (mean unit loss), ``false_flag_rate`` and
    ``catch_rate`` (shares of true- / false-answer positions with votes ``>= tau``, pooled over answers, as
    :func:`otguard.evaluation.gate.summarize` pools them), ``true_answers_flagged`` and
    ``false_answers_flagged`` (shares of answers with at least one such position). None where a side is
    empty.
    """

    layer: int
    alpha: float  # this layer's budget (alpha / gated layers)
    previous_threshold: int
    threshold: int
    feasible: bool  # False: no threshold met the bound; the layer is off (threshold = H + 1)
    table: list[dict[str, Any]] = field(default_factory=list)

    def row(self, tau: int | None = None) -> dict[str, Any]:
        """The table row of ``tau`` (default: the chosen threshold)."""
        tau = self.threshold if tau is None else tau
        return next(r for r in self.table if r["tau"] == tau)


@dataclass
class GateCalibration:
    """What :func:`calibrate_gate` did (JSON-ready through :meth:`to_dict`; stored in the new policy's
    ``meta["gate_calibration"]``)."""

    alpha: float  # the target: max_false_flag_rate
    loss: str
    unit: str
    mode: str
    n_questions: int  # validation questions with at least one reference answer
    n_units: int  # units in the bound (questions with a true answer, or true answers)
    n_true_answers: int
    n_false_answers: int
    layers: list[LayerCalibration] = field(default_factory=list)
    rule: str = (
        "smallest tau: (sum_i L_i(tau) + 1) / (n + 1) <= alpha / gated layers (conformal risk control)"
    )

    @property
    def thresholds(self) -> dict[int, int]:
        """Layer -> chosen threshold."""
        return {c.layer: c.threshold for c in self.layers}

    @property
    def previous_thresholds(self) -> dict[int, int]:
        """Layer -> threshold before calibration."""
        return {c.layer: c.previous_threshold for c in self.layers}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (no NaN: an empty side is None)."""
        return json_finite(asdict(self))


# ------------------------------------------------------------------------------ the rule, on arrays
def answer_losses(votes: Sequence[np.ndarray | Sequence[int]], n_heads: int, loss: Loss = "positions"
                  ) -> np.ndarray:  # fmt: skip
    """``(n_answers, n_heads + 2)``: the loss of each answer (its positions' vote counts) at ``tau = 0..H+1``.

    ``"positions"``: share of positions with votes ``>= tau``; ``"answer"``: 1 if any position has.
    """
    if loss not in _LOSSES:
        raise ConfigError(f"Unknown calibration loss {loss!r}; use one of {_LOSSES}.")
    out = np.zeros((len(votes), n_heads + 2), dtype=np.float64)
    for i, v in enumerate(votes):
        v = np.clip(np.asarray(v, dtype=np.int64).ravel(), 0, n_heads)
        if v.size == 0:
            continue
        at_least = np.cumsum(np.bincount(v, minlength=n_heads + 1)[::-1])[::-1]  # (H+1,) count >= tau
        out[i, : n_heads + 1] = at_least / v.size if loss == "positions" else (at_least > 0)
    return out


def unit_losses(losses: np.ndarray, questions: Sequence[int], unit: Unit = "question") -> np.ndarray:
    """Per-unit losses: the answers' rows (``unit="answer"``) or their mean per question (``"question"``)."""
    if unit not in _UNITS:
        raise ConfigError(f"Unknown calibration unit {unit!r}; use one of {_UNITS}.")
    if unit == "answer" or len(losses) == 0:
        return losses
    q = np.asarray(questions)
    return np.stack([losses[q == k].mean(0) for k in np.unique(q)])


def crc_bound(losses: np.ndarray) -> np.ndarray:
    """``(sum_i L_i(tau) + 1) / (n + 1)`` at every ``tau`` (the columns of ``losses``: ``(n, T)``)."""
    losses = np.asarray(losses, dtype=np.float64)
    return (losses.sum(0) + 1.0) / (losses.shape[0] + 1.0)


def choose_threshold(losses: np.ndarray, alpha: float) -> tuple[int, bool]:
    """The smallest column index ``tau`` whose bound is ``<= alpha``, and True; else the last, and False.

    The bound is non-increasing in ``tau`` (each loss is), so the first column that meets it is the rule's
    choice. A tolerance of 1e-12 absorbs the rounding of the sums.
    """
    bound = crc_bound(losses)
    ok = np.flatnonzero(bound <= alpha + 1e-12)
    if ok.size == 0:
        return bound.size - 1, False
    return int(ok[0]), True


# ------------------------------------------------------------------------------ on the model
def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"max_false_flag_rate must be a number in (0, 1), e.g. 0.3; got {alpha!r}.")
    return float(alpha)


def calibrate_gate(
    policy: Any,
    model: Any,
    tokenizer: Any,
    items: Iterable[Any],
    *,
    max_false_flag_rate: float,
    batch_size: int = 32,
    loss: Loss = "positions",
    unit: Unit = "question",
    mode: str = "repair",
    instruction: bool = True,
    gates: Sequence[AnswerGate] | None = None,
) -> tuple[Any, GateCalibration]:
    """Set each gated layer's vote threshold on validation ``items`` (``QAItem``; never test questions) so
    that the conformal-risk-control bound on the false-flag loss of true answers at generation is at most
    ``max_false_flag_rate`` (see the module docstring). Returns a new policy (the input is not changed:
    same tensors, new thresholds, ``meta["gate_calibration"]``) and the record.

    ``gates``: the records of :func:`otguard.evaluation.gate.gate_answers` for ``items`` with ``policy``
    (same ``mode`` and ``instruction``), if already computed: they serve the first gated layer, so a
    one-layer policy is calibrated without a forward pass (several targets from one pass). Later layers
    of a multi-layer policy always run again, with the earlier layers' new thresholds attached.
    """
    alpha = _check_alpha(max_false_flag_rate)
    if loss not in _LOSSES:
        raise ConfigError(f"Unknown calibration loss {loss!r}; use one of {_LOSSES}.")
    if unit not in _UNITS:
        raise ConfigError(f"Unknown calibration unit {unit!r}; use one of {_UNITS}.")
    items = list(items)
    if not items:
        raise DataError("No validation questions to calibrate the gate on; pass the fold's validation "
                        "QAItems (with correct and incorrect answers).")  # fmt: skip
    gated = sorted((k for k, e in enumerate(policy.layers) if e.threshold is not None),
                   key=lambda k: policy.layers[k].layer)  # fmt: skip
    if not gated:
        raise ConfigError(f"The {policy.method!r} policy has no gated layer (no vote threshold) to "
                          "calibrate; calibrate a RADIANT or SLIM policy.")  # fmt: skip
    H = int(policy.model.n_heads)
    budget = alpha / len(gated)
    work = replace(policy, layers=[replace(e) for e in policy.layers], meta=dict(policy.meta))
    record: GateCalibration | None = None
    for step, k in enumerate(gated):
        if step or gates is None:
            gates = gate_answers(model, tokenizer, work, items, mode=mode, batch_size=batch_size,
                                 instruction=instruction)  # fmt: skip
        else:
            _check_records(gates, policy)
        true = [g for g in gates if not g.false]
        if not true:
            raise DataError("The validation questions have no correct reference answer; the false-flag "
                            "rate needs some (pass TruthfulQA items).")  # fmt: skip
        if record is None:
            record = GateCalibration(
                alpha=alpha, loss=loss, unit=unit, mode=mode,
                n_questions=len({g.question for g in gates}),
                n_units=len({g.question for g in true}) if unit == "question" else len(true),
                n_true_answers=len(true), n_false_answers=len(gates) - len(true),
            )  # fmt: skip
        votes = [_layer_votes(g, k) for g in gates]
        edit = work.layers[k]
        layer_cal = _calibrate_layer(edit.layer, int(edit.threshold), gates, votes, H, budget, loss, unit)
        edit.threshold = layer_cal.threshold
        record.layers.append(layer_cal)
        row = layer_cal.row()
        logger.info("gate calibration, layer %d: tau %d -> %d (bound %.3f <= %.3f%s; validation "
                    "false-flag rate %.3f, catch rate %s)", edit.layer, layer_cal.previous_threshold,
                    layer_cal.threshold, row["bound"], budget,
                    "" if layer_cal.feasible else ": NOT MET, layer off", row["false_flag_rate"],
                    row["catch_rate"])  # fmt: skip
        if not layer_cal.feasible:
            logger.warning("Too few validation units (%d) for a false-flag bound of %.3f at layer %d: the "
                           "layer is switched off (tau = %d). Use more validation questions or a larger "
                           "--max-false-flag-rate.", record.n_units, budget, edit.layer, H + 1)  # fmt: skip
    assert record is not None
    work.meta["gate_calibration"] = record.to_dict()
    return work, record


def _check_records(gates: Sequence[AnswerGate], policy: Any) -> None:
    """Precomputed records must carry the per-layer votes of this policy's layers."""
    want = tuple(e.layer for e in policy.layers)
    for g in gates:
        if g.layer_votes is None or g.layers != want:
            raise ConfigError(f"The gate records given were not computed with this policy (their layers "
                              f"{g.layers}, the policy's {want}); leave gates=None.")  # fmt: skip


def _layer_votes(gate: AnswerGate, k: int) -> np.ndarray:
    """Layer ``k``'s vote counts at the answer's positions (the summed count for a one-layer record)."""
    if gate.layer_votes is not None:
        return gate.layer_votes[:, k].numpy()
    return gate.votes.numpy()


def _calibrate_layer(layer: int, previous: int, gates: Sequence[AnswerGate], votes: Sequence[np.ndarray],
                     H: int, budget: float, loss: Loss, unit: Unit) -> LayerCalibration:  # fmt: skip
    true_idx = [i for i, g in enumerate(gates) if not g.false]
    false_idx = [i for i, g in enumerate(gates) if g.false]
    t_votes = [votes[i] for i in true_idx]
    f_votes = [votes[i] for i in false_idx]
    losses = unit_losses(answer_losses(t_votes, H, loss), [gates[i].question for i in true_idx], unit)
    tau, feasible = choose_threshold(losses, budget)
    bound, risk = crc_bound(losses), losses.mean(0)
    t_all = np.concatenate(t_votes) if t_votes else np.zeros(0, dtype=np.int64)
    f_all = np.concatenate(f_votes) if f_votes else np.zeros(0, dtype=np.int64)
    t_max = np.array([v.max() if v.size else -1 for v in t_votes])
    f_max = np.array([v.max() if v.size else -1 for v in f_votes])
    table = [
        {
            "tau": t,
            "bound": float(bound[t]),
            "risk": float(risk[t]),
            "false_flag_rate": _share(t_all >= t),
            "catch_rate": _share(f_all >= t),
            "true_answers_flagged": _share(t_max >= t),
            "false_answers_flagged": _share(f_max >= t),
        }
        for t in range(H + 2)
    ]
    return LayerCalibration(layer=layer, alpha=budget, previous_threshold=previous, threshold=tau,
                            feasible=feasible, table=table)  # fmt: skip


def _share(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None
