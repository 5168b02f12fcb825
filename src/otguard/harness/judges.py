"""The judges of a TruthfulQA comparison, named and described for ``results.json`` and the tables.

Every generation metric names its judge (``"True (learned judge)"``, ``"SEM (MiniLM)"``, ``"Info
(non-refusal)"``), and ``results.json`` carries a record per judge role: its name, whether it was
validated against held-out human labels and, where it was, the validation figures of the learned
judge's cross-fitted runs (``{"name", "model", "labels", "n_train", "train_seconds", "splits": [{"split":
"seen_questions", "accuracy", "auroc", "tpr", "tnr", "n"}, ...]}``, from
:meth:`LearnedJudge.validation`). SEM, BLEU, ROUGE-L and the refusal rule are marked
``"validated": false``.

The learned judge and SEM carry a degeneracy guard (:mod:`otguard.evaluation.degeneracy`, on by
default): an answer that is a repetition loop or character garbage counts as neither true nor
informative. A learned judge's records say so under ``"degeneracy_guard"`` (``{"on", "rule",
"human_labels": {"labels", "n", "fired", "fire_rate", "fire_rate_labelled_true", ...}}``, from
:meth:`LearnedJudge.guard_record`: how often the guard fires on the human-labelled answers the verdict
was trained on); SEM's note says so.

The learned judges live in :mod:`otguard.evaluation.learned_judge` (built through
:func:`otguard.evaluation.factory.make_judge` ``("learned", ...)``); this module is the one place the
harness touches them, so their API is used here only.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["JudgeChoice", "build_main_judge", "judge_label", "learned_problem", "unvalidated"]

_LEARNED_MODULE = "otguard.evaluation.learned_judge"
#: Judges without a validation against human labels, described once.
_UNVALIDATED = {
    "sem": "MiniLM cosine similarity to the correct vs. the incorrect reference answers; not validated "
    "against human labels here; degeneracy guard on: repetition loops and character garbage count as "
    "neither true nor informative (otguard.evaluation.degeneracy)",
    "bleu": "BLEU of the answer against the correct vs. the incorrect references; not validated here",
    "rouge": "ROUGE-L of the answer against the correct vs. the incorrect references; not validated here",
    "refusal": "informative unless empty or a refusal ('I have no comment' and variants); a rule, not "
    "TruthfulQA's info judge",
    "openai": "an OpenAI-compatible judge server; its validation is the server's",
}


def learned_problem() -> str | None:
    """Why ``--judge learned`` cannot work in this installation (None when it can)."""
    if importlib.util.find_spec(_LEARNED_MODULE) is None:
        return ("the learned judge is not available in this otguard (no otguard.evaluation.learned_judge); "
                "use --judge sem")  # fmt: skip
    return None


def unvalidated(kind: str, name: str) -> dict[str, Any]:
    """The record of a judge without held-out validation."""
    return {"name": name, "validated": False, "note": _UNVALIDATED.get(kind, "not validated")}


@dataclass
class JudgeChoice:
    """The main judge of a run: the judge object, the short label its columns carry, the label of its
    informativeness verdict, and the records of ``results.json``'s ``judges`` (by role)."""

    judge: Any
    kind: str
    label: str
    info_label: str
    records: dict[str, dict[str, Any]] = field(default_factory=dict)


def judge_label(kind: str, judge: Any) -> str:
    """The short name a column carries: "learned judge", "SEM, MiniLM", "BLEU", "GPT judge: <model>"."""
    name = str(getattr(judge, "name", kind))
    if kind == "learned":
        return "learned judge"
    if kind == "sem":
        model = name.partition(":")[2] or "minilm"
        return "SEM, " + ("MiniLM" if model.lower() == "minilm" else model)
    if kind == "bleu":
        return "BLEU"
    if kind.startswith("rouge"):
        return "ROUGE-L"
    if kind == "openai":
        return "LLM judge: " + (name.partition(":")[2] or "server")
    return name


def _guard_record(judge: Any, role: str) -> dict[str, Any] | None:
    """The degeneracy guard's record of a learned judge's ``truth`` or ``info`` verdict (None if the
    judge has no guard)."""
    guard_record = getattr(judge, "guard_record", None)
    return guard_record(role) if callable(guard_record) else None


def _learned_record(judge: Any, role: str) -> dict[str, Any]:
    """Name and held-out validation figures of a learned judge (whatever of them it exposes)."""
    record: dict[str, Any] = {"name": str(getattr(judge, "name", "learned")), "validated": False}
    validation = getattr(judge, "validation", None)
    if callable(validation):
        validation = validation()
    if isinstance(validation, dict) and validation.get("splits"):
        record["validated"] = True
        record["validation"] = validation
    else:
        record["note"] = "no held-out validation figures available"
    record["role"] = role
    return record


def build_main_judge(spec: str, config: Any, sem_judge: Any, *, labels: str | None = None) -> JudgeChoice:
    """The judge ``spec`` names (``learned``, ``sem[:model]``, ``bleu``, ``rougeL``, ``openai``) with its
    labels and records. ``sem_judge`` is reused for ``sem`` (one embedder per run); ``labels`` is a
    learned judge's training file (None: TruthfulQA's)."""
    from otguard.evaluation.factory import make_judge

    kind = spec.partition(":")[0].strip().lower()
    if kind == "learned":
        options: dict[str, Any] = {"data_dir": config.data_dir}
        if labels is not None:
            options["labels"] = labels
        judge = make_judge(spec, **options)
        has_info = getattr(judge, "judges_info", True)
        records = {"true": _learned_record(judge, "truth")}
        info_judge = getattr(judge, "info_judge", None)
        if has_info:
            records["info"] = _learned_record(info_judge if info_judge is not None else judge, "info")
            records["info"]["name"] = f"{getattr(judge, 'name', 'learned judge')}, info verdict"
        else:
            records["info"] = unvalidated("refusal", "refusal rule")
        for key, role in (("true", "truth"), ("info", "info")):
            guard = _guard_record(judge, role)
            if guard is not None:
                records[key]["degeneracy_guard"] = guard
        return JudgeChoice(
            judge, kind, "learned judge", "learned judge" if has_info else "non-refusal", records
        )
    if kind == "sem" and (spec.strip().lower() == "sem" or spec == f"sem:{config.embedder}"):
        judge = sem_judge
    else:
        judge = make_judge(spec, **config.judge_options)
    name = str(getattr(judge, "name", spec))
    norm = "rouge" if kind.startswith("rouge") else kind
    label = judge_label(norm, judge)
    if norm == "openai":
        judges_info = bool(getattr(judge, "judge_info", True))
        records = {"true": unvalidated("openai", name)}
        records["info"] = (
            unvalidated("openai", name) if judges_info else unvalidated("refusal", "refusal rule")
        )
        return JudgeChoice(judge, norm, label, label if judges_info else "non-refusal", records)
    records = {"true": unvalidated(norm, name), "info": unvalidated("refusal", "refusal rule")}
    return JudgeChoice(judge, norm, label, "non-refusal", records)
