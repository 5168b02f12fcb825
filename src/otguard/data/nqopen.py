"""NQ-Open in TruthfulQA CSV layout: an out-of-distribution evaluation set for transfer.

Interventions fitted on TruthfulQA are evaluated on these 3,610 questions (best answer, correct
answers, one incorrect answer); no activations are collected on them (docs/method.md §1.3).
"""

from __future__ import annotations

import os

from otguard.data._base import DATA_DIR_ENV, require_file, resolve_data_dir
from otguard.data.qa import QAItem, qa_items_from_csv
from otguard.errors import DataError

__all__ = ["nqopen_items"]

_CSV_FILE = "nqopen/NQOpen.csv"


def nqopen_items(data_dir: str | os.PathLike[str] | None = None) -> list[QAItem]:
    """NQ-Open questions from ``<data_dir>/nqopen/NQOpen.csv`` (TruthfulQA layout), in file order.

    There is no download fallback: the converted CSV is not published as a Hub data set, so a local
    folder is required (``data_dir`` or ``$OTGUARD_DATA_DIR``). The ``Category`` column of this file is
    a conversion placeholder ("Misconceptions") and carries no meaning.
    """
    path = resolve_data_dir(data_dir)
    if path is None:
        raise DataError(
            f"NQ-Open is only read from a local file: pass --data-dir (Python: data_dir=) or set "
            f"{DATA_DIR_ENV} to a folder containing {_CSV_FILE} (the ITI authors' iti_nq_open_val set in "
            "TruthfulQA CSV layout), or "
            "load any CSV in that layout with qa_items_from_csv(path)."
        )
    return qa_items_from_csv(require_file(path, _CSV_FILE))
