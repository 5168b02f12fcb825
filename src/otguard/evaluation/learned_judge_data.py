"""Human-labelled answers for the learned judges: loading, answer identity and the two validation splits.

TruthfulQA ships the examples its GPT-judge and GPT-info were fine-tuned on
(``finetune_truth.jsonl`` / ``finetune_info.jsonl``, one ``{"prompt": "Q: …\\nA: …\\nTrue:",
"completion": " yes"|" no"}`` a line). About a third of the lines are the data set's own reference
answers; the rest are answers written by language models and labelled by people. The learned judge
(:mod:`~otguard.evaluation.learned_judge`) is validated on the latter, two ways
(:func:`split_seen_questions`, :func:`split_unseen_questions`).

Two answers to one question are *the same answer* when their :func:`answer_key` agrees (case,
spacing and a final period ignored): the label files hold many verbatim repeats (several models
answered "They run away."), and a split that put one copy in training and another in validation
would measure memory, not judgement.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from otguard.data.qa import QAItem, normalize_question
from otguard.errors import DataError, DataFileNotFoundError
from otguard.evaluation.verdicts import correct_references

__all__ = [
    "LabelledAnswers",
    "answer_key",
    "references_digest",
    "load_labels",
    "split_seen_questions",
    "split_unseen_questions",
]

_YES, _NO = "yes", "no"


def answer_key(answer: str) -> str:
    """What makes two answers the same: lower case, runs of spaces collapsed, final periods dropped."""
    return " ".join(answer.split()).rstrip(". ").lower()


@dataclass(frozen=True, eq=False)
class LabelledAnswers:
    """Labelled (question, answer) pairs with the reference answers of every question.

    Attributes:
        questions: the distinct questions, in the order of ``items`` (then first appearance).
        correct_refs / incorrect_refs: per question, the reference answers of its
            :class:`~otguard.data.QAItem` (empty for a question the items lack).
        answers: ``(n,)`` answer texts; ``labels``: ``(n,)`` int64, **1 = "yes"** (true, or helpful).
        question_ids: ``(n,)`` int64 index into ``questions``.
        is_reference: ``(n,)`` bool, the answer is one of its question's reference answers.
        keys: ``(n,)`` int64, equal for the same answer (:func:`answer_key`) to the same question.
    """

    questions: tuple[str, ...]
    correct_refs: tuple[tuple[str, ...], ...]
    incorrect_refs: tuple[tuple[str, ...], ...]
    answers: tuple[str, ...]
    labels: np.ndarray
    question_ids: np.ndarray
    is_reference: np.ndarray
    keys: np.ndarray

    def __len__(self) -> int:
        return len(self.answers)


def _parse_line(line: str, where: str) -> tuple[str, str, int]:
    try:
        obj = json.loads(line)
        prompt, completion = obj["prompt"], obj["completion"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(
            f'{where}: not a {{"prompt": ..., "completion": ...}} object ({exc}); use the layout of '
            "TruthfulQA's finetune_truth.jsonl."
        ) from exc
    if not isinstance(prompt, str) or not prompt.startswith("Q: ") or "\nA: " not in prompt:
        raise DataError(
            f'{where}: the prompt must read "Q: <question>\\nA: <answer>\\n<Label>:"; got {prompt!r}.'
        )
    question, _, rest = prompt[3:].partition("\nA: ")
    answer = rest.rsplit("\n", 1)[0] if "\n" in rest else rest
    label = str(completion).strip().lower()
    if label not in (_YES, _NO):
        raise DataError(f'{where}: completion must be " yes" or " no"; got {completion!r}.')
    return question, answer, int(label == _YES)


def load_labels(path: str | os.PathLike[str], items: Sequence[QAItem] = ()) -> LabelledAnswers:
    """Read a label file in the layout of TruthfulQA's ``finetune_truth.jsonl``.

    ``items`` supply each question's reference answers (matched by whitespace-normalised question
    text): they mark which labelled answers are references and give the judge its reference features.
    Questions of the file that ``items`` lack are kept, without references.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataFileNotFoundError(
            f"Label file {str(p)!r} not found. Pass the path of a JSONL file in the layout of TruthfulQA's "
            "finetune_truth.jsonl (or set --data-dir / OTGUARD_DATA_DIR to the shared data folder)."
        )
    questions: list[str] = []
    correct: list[tuple[str, ...]] = []
    incorrect: list[tuple[str, ...]] = []
    index: dict[str, int] = {}
    for item in items:
        k = normalize_question(item.question)
        if k not in index:
            index[k] = len(questions)
            questions.append(item.question)
            correct.append(tuple(correct_references(item)))
            incorrect.append(tuple(item.incorrect_answers))
    answers: list[str] = []
    labels: list[int] = []
    qids: list[int] = []
    with open(p, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            question, answer, label = _parse_line(line, f"{p}, line {n}")
            k = normalize_question(question)
            if k not in index:
                index[k] = len(questions)
                questions.append(question)
                correct.append(())
                incorrect.append(())
            answers.append(answer)
            labels.append(label)
            qids.append(index[k])
    if not answers:
        raise DataError(
            f'{p}: no labelled lines. Add lines like {{"prompt": "Q: ...\\nA: ...\\nTrue:", ...}}.'
        )
    ref_keys = [{answer_key(a) for a in c + i} for c, i in zip(correct, incorrect, strict=True)]
    key_ids: dict[tuple[int, str], int] = {}
    keys = [key_ids.setdefault((q, answer_key(a)), len(key_ids)) for q, a in zip(qids, answers, strict=True)]
    is_ref = [answer_key(a) in ref_keys[q] for q, a in zip(qids, answers, strict=True)]
    return LabelledAnswers(
        questions=tuple(questions),
        correct_refs=tuple(correct),
        incorrect_refs=tuple(incorrect),
        answers=tuple(answers),
        labels=np.asarray(labels, dtype=np.int64),
        question_ids=np.asarray(qids, dtype=np.int64),
        is_reference=np.asarray(is_ref, dtype=bool),
        keys=np.asarray(keys, dtype=np.int64),
    )


def _validation_pool(data: LabelledAnswers) -> np.ndarray:
    """The answers validation is measured on: those written by models, or every answer if none is."""
    pool = ~data.is_reference
    return pool if pool.any() else np.ones(len(data), dtype=bool)


def split_seen_questions(data: LabelledAnswers, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split (a), *seen questions, unseen answers*: ``(train, test)`` example indices (sorted int64).

    Test = the answers of a seeded half of the distinct model-written answers (by :attr:`keys`, so
    no answer is on both sides); train = everything else (references included). A label file without
    model-written answers (NQ-Open's, built from references) draws the half from all answers.
    """
    pool = _validation_pool(data)
    distinct = np.unique(data.keys[pool])
    held = np.random.default_rng(seed).permutation(distinct)[: len(distinct) // 2]
    test = pool & np.isin(data.keys, held)
    return np.flatnonzero(~test).astype(np.int64), np.flatnonzero(test).astype(np.int64)


def split_unseen_questions(data: LabelledAnswers, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Split (b), *unseen questions*: train on every label of one half of the questions, test on the
    model-written answers of the other half. ``fold`` (0 or 1) is the tested half.

    The halves are contiguous blocks of question indices (``np.array_split``, as
    :func:`otguard.data.group_kfold` with ``contiguous=True`` and two folds: questions 0–408 and
    409–816 of TruthfulQA).
    """
    if fold not in (0, 1):
        raise DataError(f"fold must be 0 or 1 (two halves of the questions); got {fold}.")
    present = np.unique(data.question_ids)
    test_questions = np.array_split(present, 2)[fold]
    tested = np.isin(data.question_ids, test_questions)
    test = tested & _validation_pool(data)
    return np.flatnonzero(~tested).astype(np.int64), np.flatnonzero(test).astype(np.int64)


def references_digest(data: LabelledAnswers) -> str:
    """Hex SHA-256 of the questions and their reference answers (they shape the judge's features)."""
    h = hashlib.sha256()
    for q, c, i in zip(data.questions, data.correct_refs, data.incorrect_refs, strict=True):
        h.update(json.dumps([q, list(c), list(i)], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()
