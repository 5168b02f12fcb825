"""Question/answer references for generation and multiple-choice evaluation.

TruthfulQA, NQ-Open and any transfer set share one CSV layout (``Question``, ``Best Answer``,
``Correct Answers``, ``Incorrect Answers``, answers separated by ``"; "``); :func:`qa_items_from_csv`
reads it once for all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from otguard.data._base import read_csv_records
from otguard.errors import DataError, DataFileNotFoundError

__all__ = ["QA_REQUIRED_COLUMNS", "QAItem", "normalize_question", "qa_items_from_csv", "split_answers"]

#: Columns a QA CSV must have; ``Type``, ``Category`` and ``Source`` are optional.
QA_REQUIRED_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")


@dataclass(frozen=True)
class QAItem:
    """Generation (and, for TruthfulQA, multiple-choice) references for one question.

    ``mc1_targets`` / ``mc2_targets`` hold ``(answer, 1 true / 0 false)`` pairs in file order; note
    that this is the *source's* convention (1 = true), unlike :class:`TextDataset` labels where
    1 = undesirable. They are empty for sources without multiple-choice targets (NQ-Open, user CSVs).
    """

    question: str
    best_answer: str
    correct_answers: tuple[str, ...]
    incorrect_answers: tuple[str, ...]
    category: str | None = None
    mc1_targets: tuple[tuple[str, int], ...] = ()
    mc2_targets: tuple[tuple[str, int], ...] = ()


def normalize_question(text: str) -> str:
    """Collapse runs of whitespace and strip: the key used to match questions across files.

    The TruthfulQA CSV and ``mc_task.json`` differ in trailing spaces, so exact matching fails.
    """
    return " ".join(text.split())


def split_answers(field: str) -> tuple[str, ...]:
    """Split a ``"; "``-separated answer list, stripping spaces and dropping empty pieces.

    Splitting on ``";"`` (not ``"; "``) also handles the trailing ``";"`` some TruthfulQA rows have.
    """
    return tuple(p.strip() for p in field.split(";") if p.strip())


def qa_items_from_csv(path: str | os.PathLike[str]) -> list[QAItem]:
    """Read a CSV in TruthfulQA layout (TruthfulQA, NQ-Open, TriviaQA or your own transfer set).

    Required columns: ``Question``, ``Best Answer``, ``Correct Answers``, ``Incorrect Answers``; an
    optional ``Category`` column fills :attr:`QAItem.category`. An empty ``Correct Answers`` falls back
    to the best answer. Raises :class:`DataFileNotFoundError` for a missing file and
    :class:`DataError` (naming file and line) for missing columns or empty questions/answers.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataFileNotFoundError(
            f"QA file {str(p)!r} not found. Give the path to a CSV with columns "
            f"{', '.join(QA_REQUIRED_COLUMNS)}."
        )
    header, rows = read_csv_records(p)
    missing = [c for c in QA_REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{p}, line 1: missing column(s) {missing}; a QA CSV needs {list(QA_REQUIRED_COLUMNS)} "
            f"(TruthfulQA layout, answers separated by '; '). Found columns: {header}."
        )
    items: list[QAItem] = []
    for line, row in rows:
        question = row["Question"].strip()
        best = row["Best Answer"].strip()
        if not question:
            raise DataError(f"{p}, line {line}: empty Question. Fill it in or delete the row.")
        if not best:
            raise DataError(f"{p}, line {line}: empty Best Answer for question {question!r}. Fill it in.")
        correct = split_answers(row["Correct Answers"]) or (best,)
        category = row.get("Category", "").strip() or None
        items.append(
            QAItem(
                question=question,
                best_answer=best,
                correct_answers=correct,
                incorrect_answers=split_answers(row["Incorrect Answers"]),
                category=category,
            )
        )
    if not items:
        raise DataError(f"{p}: no data rows after the header. Add at least one question.")
    return items
