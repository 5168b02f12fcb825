"""TruthfulQA: the MC2 (question, answer) bank that probes are trained on, and generation references.

Local layout (``--data-dir`` / ``$OTGUARD_DATA_DIR``)::

    <data_dir>/truthfulqa/mc_task.json    817 entries {question, mc1_targets, mc2_targets}
    <data_dir>/truthfulqa/TruthfulQA.csv  817 rows (Type, Category, Question, Best Answer, ...)

Without a data folder the same data comes from the Hugging Face Hub (``truthfulqa/truthful_qa``,
configs ``multiple_choice`` and ``generation``, split ``validation``) through the optional
``datasets`` package. ``mc_task.json`` order is the Hub order, the one the methods' folds use.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from otguard.data._base import DATA_DIR_ENV, TextDataset, require_file, resolve_data_dir
from otguard.data.qa import QAItem, normalize_question, qa_items_from_csv
from otguard.errors import DataError

__all__ = ["DEFAULT_TEMPLATE", "GENERATION_TEMPLATE", "HUB_DATASET", "truthfulqa_items", "truthfulqa_mc2"]

logger = logging.getLogger(__name__)

#: Text fed to the model for one (question, answer) pair, exactly as in RADIANT/SLIM (docs/method.md §1.1).
DEFAULT_TEMPLATE = "Q: {question} A: {answer}"
#: The same pair as generation reads it (``context="generation"``): what follows the instruction + primer
#: prefix (``otguard.prompts.qa_prefix()``) in the generation prompt ``qa_prompt(question)``, then the
#: answer as the gate teacher-forces it (``" " + answer.strip()``).
GENERATION_TEMPLATE = "\n\nQ: {question}\nA: {answer}"
#: Hugging Face Hub copy used when no local data folder is given.
HUB_DATASET = "truthfulqa/truthful_qa"

_MC_FILE = "truthfulqa/mc_task.json"
_CSV_FILE = "truthfulqa/TruthfulQA.csv"
_HINT = (
    f"pass --data-dir (Python: data_dir=) or set {DATA_DIR_ENV} to a folder containing {_MC_FILE} and "
    f"{_CSV_FILE}"
)


@dataclass(frozen=True)
class _MCEntry:
    question: str
    mc1: tuple[tuple[str, int], ...]
    mc2: tuple[tuple[str, int], ...]


def _targets_from_mapping(obj: Any, where: str, key: str) -> tuple[tuple[str, int], ...]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: {key!r} must be an object mapping answer -> 1 (true) / 0 (false).")
    out: list[tuple[str, int]] = []
    for answer, label in obj.items():
        if isinstance(label, bool) or label not in (0, 1):
            raise DataError(f"{where}: {key!r} label of answer {answer!r} is {label!r}; expected 0 or 1.")
        out.append((str(answer), int(label)))
    return tuple(out)


def _read_mc_file(path: Path) -> list[_MCEntry]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}, line {exc.lineno}: malformed JSON ({exc.msg}). Re-download the file."
        ) from exc
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of questions; got {type(raw).__name__}.")
    entries: list[_MCEntry] = []
    for i, item in enumerate(raw):
        where = f"{path}, entry {i}"
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("question"), str)
            or not item["question"].strip()
        ):
            raise DataError(f"{where}: expected an object with a non-empty 'question' string.")
        where = f"{where} (question {item['question'][:60]!r})"
        for key in ("mc1_targets", "mc2_targets"):
            if key not in item:
                raise DataError(f"{where}: missing {key!r}.")
        mc2 = _targets_from_mapping(item["mc2_targets"], where, "mc2_targets")
        if not mc2:
            raise DataError(f"{where}: 'mc2_targets' is empty; every question needs answer choices.")
        entries.append(
            _MCEntry(item["question"], _targets_from_mapping(item["mc1_targets"], where, "mc1_targets"), mc2)
        )
    if not entries:
        raise DataError(f"{path}: no questions in the file.")
    return entries


def _hub_split(config: str) -> Any:
    """Load one config of the Hub copy; only reached when no local data folder is given."""
    try:
        datasets = importlib.import_module("datasets")
    except ImportError as exc:
        raise DataError(
            f"No local data folder is set, and loading TruthfulQA from the Hugging Face Hub needs the "
            f"'datasets' package. Run `pip install datasets`, or {_HINT}."
        ) from exc
    try:
        return datasets.load_dataset(HUB_DATASET, config, split="validation")
    except Exception as exc:  # network, auth, cache or schema problems all end here
        raise DataError(
            f"Could not load {HUB_DATASET} (config {config!r}, split 'validation') from the Hugging Face "
            f"Hub: {type(exc).__name__}: {exc}. Check the network connection, or {_HINT}."
        ) from exc


def _hub_targets(obj: Any, where: str, key: str) -> tuple[tuple[str, int], ...]:
    try:
        choices, labels = list(obj["choices"]), list(obj["labels"])
    except (TypeError, KeyError) as exc:
        raise DataError(
            f"{where}: {key!r} lacks 'choices'/'labels'; the Hub schema may have changed."
        ) from exc
    return _targets_from_mapping(dict(zip(choices, labels, strict=True)), where, key)


def _load_mc(data_dir: Path | None) -> tuple[list[_MCEntry], str]:
    if data_dir is not None:
        path = require_file(data_dir, _MC_FILE)
        return _read_mc_file(path), str(path)
    source = f"{HUB_DATASET} (multiple_choice)"
    entries = []
    for i, row in enumerate(_hub_split("multiple_choice")):
        where = f"{source}, row {i}"
        entries.append(
            _MCEntry(
                str(row["question"]),
                _hub_targets(row["mc1_targets"], where, "mc1_targets"),
                _hub_targets(row["mc2_targets"], where, "mc2_targets"),
            )
        )
    return entries, source


def _load_generation(data_dir: Path | None) -> tuple[list[QAItem], str]:
    if data_dir is not None:
        path = require_file(data_dir, _CSV_FILE)
        return qa_items_from_csv(path), str(path)
    source = f"{HUB_DATASET} (generation)"
    items = []
    for row in _hub_split("generation"):
        best = str(row["best_answer"]).strip()
        items.append(
            QAItem(
                question=str(row["question"]).strip(),
                best_answer=best,
                correct_answers=tuple(a.strip() for a in row["correct_answers"] if a.strip()) or (best,),
                incorrect_answers=tuple(a.strip() for a in row["incorrect_answers"] if a.strip()),
                category=(str(row.get("category") or "").strip() or None),
            )
        )
    return items, source


def _check_template(template: str) -> None:
    try:
        template.format(question="q", answer="a")
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(
            f"Invalid text template {template!r} ({type(exc).__name__}: {exc}); it may only use the fields "
            "{question} and {answer}, and must contain {answer}."
        ) from exc
    if "{answer}" not in template:
        raise DataError(
            f"Text template {template!r} must contain {{answer}}, or all answers of a question look alike."
        )


def truthfulqa_mc2(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    template: str = DEFAULT_TEMPLATE,
    context: Literal["bank", "generation"] = "bank",
) -> TextDataset:
    """TruthfulQA MC2 (question, answer) pairs: the texts whose activations train the probes.

    One text per (question, MC2 answer) in file order, ``template`` filled with the question and the
    answer. **label = 1 − MC2 label**, so 1 = false answer = undesirable (the methods' convention).
    Group = question index in ``mc_task.json`` order (the Hub order), so a fold never splits the
    answers of one question; ``group_names`` are the questions. The full set has 6,204 pairs, of
    which 3,369 are false.

    ``data_dir=None`` falls back to ``$OTGUARD_DATA_DIR``, then to the Hub (needs ``datasets``).

    ``context="generation"``: the texts are :data:`GENERATION_TEMPLATE` (answers stripped), the part of
    the generation prompt + answer after the shared prefix, for probes trained where the gate runs:
    collect them with that prefix, ``collect(model, tok, data, prefix=otguard.prompts.qa_prefix())``,
    and ``qa_prefix() + text`` is exactly the gate's teacher-forced string. Same rows, labels and
    groups as the bank, so folds and splits carry over; the name is ``truthfulqa-mc2-generation``.
    """
    if context not in ("bank", "generation"):
        raise DataError(f"context must be 'bank' or 'generation', got {context!r}.")
    if context == "generation" and template != DEFAULT_TEMPLATE:
        raise DataError("context='generation' fixes the text format; leave template at its default.")
    _check_template(template)
    entries, _ = _load_mc(resolve_data_dir(data_dir))
    texts: list[str] = []
    labels: list[int] = []
    groups: list[int] = []
    for g, entry in enumerate(entries):
        for answer, truth in entry.mc2:
            if context == "generation":
                texts.append(GENERATION_TEMPLATE.format(question=entry.question, answer=answer.strip()))
            else:
                texts.append(template.format(question=entry.question, answer=answer))
            labels.append(1 - truth)
            groups.append(g)
    return TextDataset(
        name="truthfulqa-mc2" if context == "bank" else "truthfulqa-mc2-generation",
        texts=tuple(texts),
        labels=np.asarray(labels, dtype=np.int64),
        groups=np.asarray(groups, dtype=np.int64),
        group_names=tuple(e.question for e in entries),
    )


def truthfulqa_items(data_dir: str | os.PathLike[str] | None = None) -> list[QAItem]:
    """TruthfulQA questions in ``mc_task.json`` order with generation and MC references.

    Generation references (best / correct / incorrect answers, category) come from
    ``TruthfulQA.csv`` matched **by question text** (whitespace-normalised): the CSV is in GitHub order
    and its text differs in whitespace from ``mc_task.json``. A question without a CSV row is an error
    (listing the first one) rather than a silent fallback to the MC answers: generation scores would
    otherwise be computed against different references without anyone noticing.
    """
    path = resolve_data_dir(data_dir)
    entries, mc_source = _load_mc(path)
    gen_items, gen_source = _load_generation(path)
    by_question: dict[str, QAItem] = {}
    for item in gen_items:
        key = normalize_question(item.question)
        if key in by_question:
            raise DataError(
                f"{gen_source}: question {item.question!r} appears twice; questions must be unique to be "
                "matched with the multiple-choice file."
            )
        by_question[key] = item
    mc_keys = [normalize_question(e.question) for e in entries]
    unmatched = [e.question for e, k in zip(entries, mc_keys, strict=True) if k not in by_question]
    if unmatched:
        raise DataError(
            f"{len(unmatched)} of {len(entries)} questions of {mc_source} have no row in {gen_source} "
            f"(matched by whitespace-normalised question text); first unmatched: {unmatched[0]!r}. "
            "Use the TruthfulQA.csv and mc_task.json of the same TruthfulQA release."
        )
    extra = len(set(by_question) - set(mc_keys))
    if extra:
        logger.warning(
            "%s has %d questions that are not in %s; they are ignored.", gen_source, extra, mc_source
        )
    items: list[QAItem] = []
    for e, key in zip(entries, mc_keys, strict=True):
        ref = by_question[key]
        items.append(
            QAItem(
                question=e.question,
                best_answer=ref.best_answer,
                correct_answers=ref.correct_answers,
                incorrect_answers=ref.incorrect_answers,
                category=ref.category,
                mc1_targets=e.mc1,
                mc2_targets=e.mc2,
            )
        )
    return items
