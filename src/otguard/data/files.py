"""User data sets from JSON-lines, CSV or TSV files.

Lets people fit an intervention on their own labelled texts without writing a loader. Parsing is
strict on purpose: a silently misread label flips what the intervention steers away from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from otguard.data._base import TextDataset, read_csv_records
from otguard.errors import DataError, DataFileNotFoundError

__all__ = ["SUPPORTED_SUFFIXES", "from_file"]

#: File name endings :func:`from_file` understands.
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def _parse_label(value: Any, where: str, column: str) -> int:
    """0/1 ints or the strings "0"/"1"; everything else (True, 0.0, "yes", "toxic") is rejected."""
    if isinstance(value, bool):
        value = repr(value)  # JSON true/false: reject explicitly below
    elif isinstance(value, int) and value in (0, 1):
        return int(value)
    elif isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    raise DataError(
        f"{where}: label column {column!r} is {value!r}; it must be 0 or 1 (1 = undesirable, e.g. "
        "false or toxic; 0 = desirable). Convert the labels before loading."
    )


def _json_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``[(where, record)]`` from JSON lines, or from a JSON array when a ``.json`` file holds one."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc}). Save the file as UTF-8.") from exc
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror}); check its permissions.") from exc
    out: list[tuple[str, dict[str, Any]]] = []
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {exc.lineno}: malformed JSON ({exc.msg}).") from exc
        for i, rec in enumerate(records):
            where = f"{path}, record {i}"
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object per record; got {type(rec).__name__}.")
            out.append((where, rec))
        return out
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: malformed JSON ({exc.msg}, column {exc.colno}). Each line must be one JSON "
                'object, e.g. {"text": "...", "label": 1}.'
            ) from exc
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object; got {type(rec).__name__}.")
        out.append((where, rec))
    return out


def _table_records(path: Path, delimiter: str, required: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    header, rows = read_csv_records(path, delimiter=delimiter)
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(
            f"{path}, line 1: missing column(s) {missing} in the header {header}. Add them, or name the "
            "right columns (command line: --text-column/--label-column; Python: text_column=/label_column=)."
        )
    return [(f"{path}, line {line}", row) for line, row in rows]


def from_file(
    path: str | os.PathLike[str],
    *,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = "group",
) -> TextDataset:
    """Load labelled texts from a ``.jsonl``/``.json`` (JSON lines or an array), ``.csv`` or ``.tsv`` file.

    Each record needs a non-empty text and a label that is 0 or 1 (int or the string "0"/"1"), where
    **1 = undesirable**. The group column is optional: when no record has it (or ``group_column`` is
    None) every row is its own group; when it is used, every record must have it. Texts that share a
    group (answers to one prompt) are kept in one fold. Group ids follow first appearance in the file,
    so contiguous folds follow file order. Errors name the file and the line (or record) number.
    """
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{p}: unsupported file type {suffix or '(none)'!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}."
        )
    if not p.is_file():
        raise DataFileNotFoundError(f"Data file {str(p)!r} not found. Check the path.")
    if suffix in (".jsonl", ".json"):
        records = _json_records(p)
    else:
        records = _table_records(p, "\t" if suffix == ".tsv" else ",", (text_column, label_column))
    if not records:
        raise DataError(f"{p}: no records. Add rows with columns {text_column!r} and {label_column!r}.")
    use_groups = group_column is not None and any(group_column in rec for _, rec in records)

    texts: list[str] = []
    labels: list[int] = []
    group_ids: list[int] = []
    group_index: dict[str, int] = {}
    for i, (where, rec) in enumerate(records):
        for col in (text_column, label_column) + ((group_column,) if use_groups else ()):
            if col not in rec or rec[col] is None:
                raise DataError(
                    f"{where}: missing column {col!r}; found {sorted(map(str, rec))}. Add it, or name the "
                    "right columns (command line: --text-column/--label-column/--group-column; Python: "
                    "text_column=/label_column=/group_column=)."
                )
        text = rec[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: column {text_column!r} must be a non-empty string; got {text!r}.")
        labels.append(_parse_label(rec[label_column], where, label_column))
        texts.append(text)
        if use_groups and group_column is not None:
            g = rec[group_column]
            if isinstance(g, bool) or not isinstance(g, str | int) or (isinstance(g, str) and not g.strip()):
                raise DataError(
                    f"{where}: group column {group_column!r} must be a non-empty string or int; got {g!r}."
                )
            key = str(g).strip()
        else:
            key = str(i)
        group_ids.append(group_index.setdefault(key, len(group_index)))
    return TextDataset(
        name=p.stem,
        texts=tuple(texts),
        labels=np.asarray(labels, dtype=np.int64),
        groups=np.asarray(group_ids, dtype=np.int64),
        group_names=tuple(group_index),
    )
