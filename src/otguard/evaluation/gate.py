"""The gate measured where it is used: TruthfulQA reference answers teacher-forced in the generation prompt.

A policy is validated on the last token of ``Q: … A: …`` bank texts, but at generation time it gates
every position of ``instruction + primer + "\\n\\nQ: {q}\\nA:"`` from the last prompt token on, with
the activations of the (edited) model. This module runs exactly that: each correct and incorrect
reference answer ``" {answer}"`` is appended to its question's generation prompt and teacher-forced
with the policy attached (``mode="repair"`` by default: a later hooked layer sees the edits of the
earlier ones, as it would had the model generated that answer; an edit at layer l reaches only later
layers, so for the usual one-layer policy the record is the same in ``"monitor"`` mode), and the
hook's per-position record (:meth:`otguard.hook.PolicyHandle.records`) gives, at every answer token:

- whether the position is flagged (on at least one hooked layer) and the vote count (summed over
  hooked layers; the layer's vote count for the usual one-layer policy), and the vote count of each
  hooked layer (``layer_votes``: what :mod:`otguard.gate_calibration` sets the thresholds on);
- how many heads are edited and how many of those the head's own probe calls desirable after the
  edit (probe logit of the edited activation < 0) and after the full map ``A a + b``.

Reported (:class:`GateResult`): ``false_flag_rate`` (share of true-answer positions flagged),
``catch_rate`` (share of false-answer positions flagged), ``gate_auroc`` (AUROC of the vote count,
false-answer positions as positives, ties counted one half), the answer-level shares (answers with at
least one flagged position), the last prompt token's flag rate (it gates the first answer token; it
is the same for every answer of a question, so it is kept out of the position rates), and the
**guarantee check**: the share of edited head activations that their probe calls desirable after the
edit, next to the nominal level ``Phi(alpha)`` of the chance constraint (SLIM: ``alpha =
Phi^-1(1 - gamma)``, so ``1 - gamma``; RADIANT: ``alpha`` is the margin, read as a chance constraint
``Phi(margin)``, about 1 - 4e-51 for the default 15, docs/method.md §3.2). The constraint is about
the full map; SLIM applies ``kappa p`` of its displacement, which for ``kappa p >= 1`` can only move a
voting head further along the probe direction (the logit is linear), so the after-edit share is at
least the full map's there. Both shares are reported. The bank-level validation figures of the policy
(validation FPR / 1 - FNR of the chosen layer, the per-head held-out guarantee rates) are copied next
to them where the policy's metadata has them.

Cost: the prefix (instruction + primer) runs once without the policy and its KV cache is forked;
each question's tokens run once on top of it (in scope from the last prompt token, as in
generation: edits there enter the cache), and its answers run in one batch on forks of the
question's cache (right-padded, logits of the last position only); no Python loop over tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from otguard.decoding import accepts_argument, cache_kwarg, fork_cache, output_cache
from otguard.errors import DataError
from otguard.evaluation.truthfulqa_mc import answer_span
from otguard.prompts import qa_prefix, qa_prompt

logger = logging.getLogger(__name__)

__all__ = [
    "AnswerGate", "GateResult", "auroc", "bank_figures", "gate_answers", "measure_gate", "nominal_level",
    "summarize",
]  # fmt: skip


@dataclass
class AnswerGate:
    """The detector at one teacher-forced reference answer (CPU tensors over its ``n`` answer tokens)."""

    question: int  # index into the items given
    answer: str
    false: bool  # an incorrect reference answer (what the detector should flag)
    prompt_tokens: int  # tokens before the answer; the answer's tokens are at positions prompt_tokens...
    positions: torch.Tensor  # (n,) absolute positions of the answer tokens
    flagged: torch.Tensor  # (n,) bool
    votes: torch.Tensor  # (n,) int64: votes summed over hooked layers
    edited: torch.Tensor  # (n,) int64: edited heads, summed over layers
    desirable: torch.Tensor  # (n,) int64: edited heads called desirable after the edit
    mapped_desirable: torch.Tensor  # (n,) int64: ... after the full map A a + b
    prompt_flagged: bool  # the last prompt token (it gates the first answer token)
    prompt_votes: int
    # (n, L) int64: votes per hooked layer, in the order of ``layers`` (the policy's layer order); what a
    # per-layer threshold acts on (otguard.gate_calibration). None when built by hand without them.
    layer_votes: torch.Tensor | None = None
    layers: tuple[int, ...] = ()


@dataclass
class GateResult:
    """Point-of-use detector figures of one policy (see the module docstring)."""

    false_flag_rate: float
    catch_rate: float
    gate_auroc: float
    true_answers_flagged: float  # share of true answers with at least one flagged position
    false_answers_flagged: float
    prompt_flag_rate: float  # share of questions whose last prompt token is flagged
    guarantee_share: float  # edited head activations called desirable after the edit
    mapped_share: float  # ... after the full map A a + b
    nominal_level: float | None  # Phi(alpha) of the chance constraint; None without one
    edited_heads: int
    n_questions: int
    n_true_answers: int
    n_false_answers: int
    n_true_positions: int
    n_false_positions: int
    mode: str = "repair"
    bank: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN where a rate has no denominator)."""
        return asdict(self)


# ------------------------------------------------------------------------------------ metrics
def auroc(positives: Sequence[float] | np.ndarray | torch.Tensor,
          negatives: Sequence[float] | np.ndarray | torch.Tensor) -> float:  # fmt: skip
    """P(score of a positive > score of a negative) + 1/2 P(tie) (Mann-Whitney); NaN if a side is empty."""
    pos = np.asarray(positives, dtype=np.float64).ravel()
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    neg_sorted = np.sort(neg)
    below = np.searchsorted(neg_sorted, pos, side="left")  # negatives strictly below each positive
    tied = np.searchsorted(neg_sorted, pos, side="right") - below
    return float((below.sum() + 0.5 * tied.sum()) / (pos.size * neg.size))


def nominal_level(policy: Any) -> float | None:
    """``Phi(alpha)``: the level the chance constraint of Stage 2 promises for the full map, or None.

    ``alpha`` is the constraint's multiplier (``policy.meta["alpha_multiplier"]``, else SLIM's
    ``Phi^-1(1 - gamma)`` or RADIANT's margin from the parameters). SLIM: exactly ``1 - gamma``.
    """
    alpha = policy.meta.get("alpha_multiplier")
    if alpha is None:
        if "gamma" in policy.params:
            return 1.0 - float(policy.params["gamma"])
        alpha = policy.params.get("margin")
    if alpha is None:
        return None
    return NormalDist().cdf(float(alpha))


def bank_figures(policy: Any) -> dict[str, Any]:
    """The policy's bank-level validation figures, in the point-of-use names (empty without them)."""
    meta = policy.meta
    out: dict[str, Any] = {}
    layer, report = meta.get("layer"), meta.get("detector_val")
    if layer is not None and isinstance(report, dict) and "fpr" in report and "fnr" in report:
        out["false_flag_rate"] = float(report["fpr"][layer])
        out["catch_rate"] = 1.0 - float(report["fnr"][layer])
        out["layer"] = int(layer)
    rates = [r for r in meta.get("guarantee_rate_val") or [] if r is not None and math.isfinite(r)]
    if rates:
        out["guarantee_rate_val_mean"] = float(np.mean(rates))
        out["guarantee_rate_val"] = list(meta["guarantee_rate_val"])
    return out


def _rate(num: float, den: float) -> float:
    return num / den if den else float("nan")


# ------------------------------------------------------------------------------------ running
_Row = tuple[int, str, bool, list[int], int]  # question, answer, false, token ids, first answer token


def _rows(tokenizer: Any, items: Sequence[Any], instruction: bool) -> list[_Row]:
    """(question, answer, false, ids, answer start) for every non-empty reference answer."""
    rows = []
    for i, item in enumerate(items):
        context = qa_prompt(item.question, instruction=instruction)
        for answers, false in ((item.correct_answers, False), (item.incorrect_answers, True)):
            for answer in answers:
                if not answer.strip():
                    continue
                ids, start = answer_span(tokenizer, context, " " + answer.strip())
                if start < 1 or start >= len(ids):
                    continue
                rows.append((i, answer, false, ids, start))
    return rows


class _Forward:
    """One forward call on top of a cache with the handle's scope and record reset for it."""

    def __init__(self, model: Any, handle: Any, device: torch.device, pad: int) -> None:
        self.model, self.handle, self.device, self.pad = model, handle, device, pad
        self.pos_ids = accepts_argument(model, "position_ids")
        self.keep_logits = accepts_argument(model, "logits_to_keep")  # no (B, T, vocab) logits
        self.cache_name = cache_kwarg(model)

    def __call__(self, rows: Sequence[Sequence[int]], past: int, cache: Any, in_scope_from: torch.Tensor | int
                 ) -> tuple[list[dict[str, torch.Tensor]], Any]:  # fmt: skip
        """Run right-padded ``rows`` at positions ``past...``; the records per row and the cache after it."""
        B, L = len(rows), max(len(r) for r in rows)
        x = torch.full((B, L), self.pad, dtype=torch.long)
        mask = torch.zeros((B, past + L), dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[b, : past + len(r)] = 1
        kwargs: dict[str, Any] = {}
        if self.pos_ids:
            kwargs["position_ids"] = torch.arange(past, past + L, device=self.device).expand(B, L)
        if self.keep_logits:
            kwargs["logits_to_keep"] = 1
        if cache is not None:
            kwargs[self.cache_name] = cache
        self.handle.reset()
        if torch.is_tensor(in_scope_from):
            in_scope_from = in_scope_from.to(self.device)
        self.handle.set_answer_start(in_scope_from)
        out = self.model(input_ids=x.to(self.device), attention_mask=mask.to(self.device),
                         use_cache=cache is not None, **kwargs)  # fmt: skip
        return self.handle.records(), (output_cache(out) if cache is not None else None)


def _question_context(rows: Sequence[_Row], prefix_ids: list[int]) -> int | None:
    """The first answer token shared by all of a question's rows, if their prompt tokens are the same
    and extend the shared prefix; else None (the rows then run whole)."""
    starts = {r[4] for r in rows}
    if len(starts) != 1:
        return None
    start = starts.pop()
    context = rows[0][3][:start]
    P = len(prefix_ids)
    if not P or start - 1 < P or context[:P] != prefix_ids or any(r[3][:start] != context for r in rows):
        return None
    return start


@torch.inference_mode()
def gate_answers(
    model: Any,
    tokenizer: Any,
    policy: Any,
    items: Iterable[Any],
    *,
    mode: str = "repair",
    kappa: float | None = None,
    batch_size: int = 32,
    instruction: bool = True,
) -> list[AnswerGate]:
    """Teacher-force every reference answer of ``items`` (``QAItem``) in its generation prompt with
    ``policy`` attached and return the detector's record at each answer (see the module docstring).

    The positions in scope are the generation scope's: each row's last prompt token and its answer
    tokens. The shared prefix runs once; each question's tokens run once on a fork of its cache (the
    last prompt token in scope), and its answers in batches of up to ``batch_size`` on forks of the
    question's cache. A question whose answers' tokenizations disagree on the prompt tokens, or do
    not extend the shared prefix, has its answers run whole (no shared cache).
    """
    items = list(items)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    rows = _rows(tokenizer, items, instruction)
    if not rows:
        raise DataError("No reference answer to teacher-force: the items have no correct or incorrect "
                        "answers; pass TruthfulQA items (otguard.data.truthfulqa_items).")  # fmt: skip
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prefix_ids = list(tokenizer(qa_prefix(instruction))["input_ids"])
    P = len(prefix_ids)
    by_question: dict[int, list[int]] = {}
    for j, r in enumerate(rows):
        by_question.setdefault(r[0], []).append(j)
    starts = {q: _question_context([rows[j] for j in js], prefix_ids) for q, js in by_question.items()}
    alone = [j for q, js in by_question.items() if starts[q] is None for j in js]
    if alone:
        logger.info("%d of %d answers run without a shared cache (tokenization).", len(alone), len(rows))
    prefix_cache = None
    if len(alone) < len(rows):
        prefix_t = torch.tensor([prefix_ids], device=device)
        prefix_cache = output_cache(model(input_ids=prefix_t, use_cache=True))
    out: list[AnswerGate | None] = [None] * len(rows)
    with policy.attach(model, scope="answer", kappa=kappa, mode=mode, record=True) as handle:
        run = _Forward(model, handle, device, pad)
        layers = tuple(int(layer) for layer in handle.layers)
        for q, js in by_question.items():
            start = starts[q]
            if start is None:
                continue
            context = rows[js[0]][3]
            # The question's tokens: in scope from the last prompt token (the generation scope).
            (prompt_rec,), q_cache = run([context[P:start]], P, fork_cache(prefix_cache, 1), start - 1)
            for lo in range(0, len(js), batch_size):
                chunk = js[lo : lo + batch_size]
                answers = [rows[j][3][start:] for j in chunk]
                recs, _ = run(answers, start, fork_cache(q_cache, len(chunk)), start)
                for j, rec in zip(chunk, recs, strict=True):
                    out[j] = _answer_gate(rows[j], _join(prompt_rec, rec), layers)
        order = sorted(alone, key=lambda j: -len(rows[j][3]))
        for lo in range(0, len(order), batch_size):
            chunk = order[lo : lo + batch_size]
            first = torch.tensor([rows[j][4] - 1 for j in chunk])
            recs, _ = run([rows[j][3] for j in chunk], 0, None, first)
            for j, rec in zip(chunk, recs, strict=True):
                out[j] = _answer_gate(rows[j], rec, layers)
    return [g for g in out if g is not None]


def _join(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two records of one row (consecutive forward calls) as one."""
    return {key: torch.cat((a[key], b[key])) for key in a}


def _answer_gate(row: _Row, rec: dict[str, torch.Tensor], layers: tuple[int, ...] = ()) -> AnswerGate:
    question, answer, false, ids, start = row
    pos = rec["positions"]
    keep = (pos >= start) & (pos < len(ids))
    at_prompt = pos == start - 1
    votes = rec["votes"].sum(-1)
    return AnswerGate(
        question=question,
        answer=answer,
        false=false,
        prompt_tokens=start,
        positions=pos[keep],
        flagged=rec["flagged"][keep],
        votes=votes[keep],
        edited=rec["edited"].sum(-1)[keep],
        desirable=rec["desirable"].sum(-1)[keep],
        mapped_desirable=rec["mapped_desirable"].sum(-1)[keep],
        prompt_flagged=bool(rec["flagged"][at_prompt].any()),
        prompt_votes=int(votes[at_prompt].sum()),
        layer_votes=rec["votes"][keep],
        layers=layers,
    )


def summarize(gates: Sequence[AnswerGate], policy: Any, *, mode: str = "repair") -> GateResult:
    """Pool the per-answer records into the point-of-use rates (positions pooled over answers)."""
    true = [g for g in gates if not g.false]
    false = [g for g in gates if g.false]

    def cat(gs: Sequence[AnswerGate], key: str) -> torch.Tensor:
        parts = [getattr(g, key) for g in gs]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    t_flag, f_flag = cat(true, "flagged"), cat(false, "flagged")
    edited = sum(int(g.edited.sum()) for g in gates)
    desirable = sum(int(g.desirable.sum()) for g in gates)
    mapped = sum(int(g.mapped_desirable.sum()) for g in gates)
    prompts: dict[int, bool] = {}
    for g in gates:
        prompts[g.question] = prompts.get(g.question, False) or g.prompt_flagged
    return GateResult(
        false_flag_rate=_rate(float(t_flag.sum()), t_flag.numel()),
        catch_rate=_rate(float(f_flag.sum()), f_flag.numel()),
        gate_auroc=auroc(cat(false, "votes").numpy(), cat(true, "votes").numpy()),
        true_answers_flagged=_rate(sum(bool(g.flagged.any()) for g in true), len(true)),
        false_answers_flagged=_rate(sum(bool(g.flagged.any()) for g in false), len(false)),
        prompt_flag_rate=_rate(sum(prompts.values()), len(prompts)),
        guarantee_share=_rate(desirable, edited),
        mapped_share=_rate(mapped, edited),
        nominal_level=nominal_level(policy),
        edited_heads=edited,
        n_questions=len(prompts),
        n_true_answers=len(true),
        n_false_answers=len(false),
        n_true_positions=int(t_flag.numel()),
        n_false_positions=int(f_flag.numel()),
        mode=mode,
        bank=bank_figures(policy),
        info={"policy": policy.summary(), "rule": policy.rule, "kappa": policy.kappa},
    )


def measure_gate(
    model: Any,
    tokenizer: Any,
    policy: Any,
    items: Iterable[Any],
    *,
    mode: str = "repair",
    kappa: float | None = None,
    batch_size: int = 32,
    instruction: bool = True,
) -> GateResult:
    """:func:`gate_answers` then :func:`summarize`: the gate's rates on ``items``' reference answers."""
    gates = gate_answers(model, tokenizer, policy, items, mode=mode, kappa=kappa, batch_size=batch_size,
                         instruction=instruction)  # fmt: skip
    result = summarize(gates, policy if kappa is None else policy.with_kappa(kappa), mode=mode)
    return result
