"""Name -> training data set, so the CLI can take ``--data truthfulqa`` or ``--data my.jsonl``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from otguard.data._base import TextDataset
from otguard.data.files import SUPPORTED_SUFFIXES, from_file
from otguard.data.toxigen import toxigen_statements
from otguard.data.truthfulqa import truthfulqa_mc2
from otguard.errors import DataError, DataFileNotFoundError

__all__ = ["DATASETS", "load_dataset"]

#: Built-in training sets by name (``data_dir`` is passed through).
DATASETS: dict[str, Callable[[str | os.PathLike[str] | None], TextDataset]] = {
    "truthfulqa": lambda data_dir: truthfulqa_mc2(data_dir),
    "truthfulqa-mc2": lambda data_dir: truthfulqa_mc2(data_dir),
    "toxigen": lambda data_dir: toxigen_statements(data_dir),
}


def load_dataset(
    name_or_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    **columns: str,
) -> TextDataset:
    """A built-in data set by name (see :data:`DATASETS`), else a user file (see :func:`from_file`).

    ``columns`` (``text_column``, ``label_column``, ``group_column``) name the columns of a user
    file; built-in data sets have fixed columns, so passing them there is an error.
    """
    key = str(name_or_path)
    unknown = sorted(set(columns) - {"text_column", "label_column", "group_column"})
    if unknown:
        raise TypeError(f"load_dataset() got unexpected keyword arguments {unknown}.")
    if key.lower() in DATASETS:
        if columns:
            given = ", ".join(f"{k} (--{k.replace('_', '-')})" for k in sorted(columns))
            raise DataError(f"{given}: only for data files; the built-in data set {key!r} has fixed columns.")
        return DATASETS[key.lower()](data_dir)
    path = Path(key).expanduser()
    if path.is_dir():
        raise DataError(
            f"{key!r} is a folder; --dataset takes a built-in name or a data file. For the folder of the "
            "built-in data sets use --data-dir (Python: data_dir=)."
        )
    if path.is_file():
        return from_file(path, **columns)
    known = ", ".join(sorted(DATASETS))
    if path.suffix.lower() in SUPPORTED_SUFFIXES:
        raise DataFileNotFoundError(
            f"Data file {key!r} not found. Check the path, or use a built-in data set: {known}."
        )
    raise DataError(
        f"Unknown data set {key!r}: not a built-in name ({known}) and not an existing file. Give one of "
        f"those names or a path to a {'/'.join(SUPPORTED_SUFFIXES)} file."
    )
