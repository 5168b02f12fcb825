"""Core data container and data-directory helpers shared by every source.

Every source returns a :class:`TextDataset`: texts, binary labels (**1 = undesirable**) and a group id
per text. Groups exist so that folds never split texts that share a prompt (all answers to one
question, all statements about one target group), which would leak information between splits.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from otguard.errors import DataError, DataFileNotFoundError

__all__ = ["DATA_DIR_ENV", "TextDataset", "resolve_data_dir"]

#: Environment variable read by :func:`resolve_data_dir` when no ``--data-dir`` is given.
DATA_DIR_ENV = "OTGUARD_DATA_DIR"

_FINGERPRINT_VERSION = b"otguard-textdataset-v1"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """Return the local data folder: the argument, else ``$OTGUARD_DATA_DIR``, else ``None``.

    ``None`` means "no local copy": sources that have a public online copy (TruthfulQA on the
    Hugging Face Hub) download it, the others raise :class:`DataError` with a hint. A folder that was
    named but does not exist is an error here, at the boundary, rather than a confusing "file not
    found" deep inside a loader.
    """
    origin = "data_dir argument (--data-dir)"
    if data_dir is None or str(data_dir) == "":
        env = os.environ.get(DATA_DIR_ENV, "").strip()
        if not env:
            return None
        data_dir, origin = env, f"environment variable {DATA_DIR_ENV}"
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataFileNotFoundError(
            f"Data folder {str(path)!r} (from the {origin}) does not exist or is not a folder. "
            f"Pass --data-dir (Python: data_dir=) or set {DATA_DIR_ENV} to an existing folder, or unset it "
            "to download public data sets from the Hugging Face Hub."
        )
    return path


def require_file(data_dir: Path, relative: str) -> Path:
    """Return ``data_dir/relative`` or raise :class:`DataFileNotFoundError` saying how to fix it."""
    path = data_dir / relative
    if not path.is_file():
        raise DataFileNotFoundError(
            f"Data file {str(path)!r} not found. Pass --data-dir (Python: data_dir=) or set {DATA_DIR_ENV} "
            f"to a folder containing {relative}."
        )
    return path


def _as_int64_vector(values: object, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"TextDataset {what} must be a 1-D array; got shape {arr.shape}.")
    integral = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)
    whole_floats = np.issubdtype(arr.dtype, np.floating) and bool(np.all(arr == np.round(arr)))
    if arr.size and not (integral or whole_floats):
        raise DataError(f"TextDataset {what} must be integers; got dtype {arr.dtype}.")
    out = np.array(arr, dtype=np.int64, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class TextDataset:
    """Labelled texts with group ids; all texts of one group (e.g. answers of one question) stay in one fold.

    Attributes:
        name: short identifier of the source, e.g. ``"truthfulqa-mc2"``.
        texts: the N strings fed to the model.
        labels: ``(N,)`` int64 in {0, 1}; **1 = undesirable** (false answer, toxic statement).
        groups: ``(N,)`` int64 group ids in ``0..G-1``.
        group_names: ``(G,)`` human-readable group names (question text, ToxiGen target group...).

    :meth:`subset` and :meth:`select_groups` keep the group ids and ``group_names`` unchanged, so
    ids stay comparable with the parent dataset and with a :class:`~otguard.data.Split`. The arrays
    are read-only: a dataset is a value, and its fingerprint must not drift after it was computed.
    """

    name: str
    texts: tuple[str, ...]
    labels: np.ndarray
    groups: np.ndarray
    group_names: tuple[str, ...]

    def __post_init__(self) -> None:
        texts = tuple(self.texts)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise DataError(f"TextDataset {self.name!r}: text {bad} is {type(texts[bad]).__name__}, not str.")
        labels = _as_int64_vector(self.labels, "labels")
        groups = _as_int64_vector(self.groups, "groups")
        group_names = tuple(str(g) for g in self.group_names)
        n = len(texts)
        if labels.shape[0] != n or groups.shape[0] != n:
            raise DataError(
                f"TextDataset {self.name!r}: {n} texts but {labels.shape[0]} labels and "
                f"{groups.shape[0]} group ids; they must have the same length."
            )
        if n and not np.isin(labels, (0, 1)).all():
            seen = sorted(set(np.unique(labels).tolist()) - {0, 1})
            raise DataError(
                f"TextDataset {self.name!r}: labels must be 0 or 1 (1 = undesirable); found {seen[:5]}."
            )
        if n and (groups.min() < 0 or groups.max() >= len(group_names)):
            raise DataError(
                f"TextDataset {self.name!r}: group ids must lie in 0..{len(group_names) - 1} "
                f"(one per group name); found {int(groups.min())}..{int(groups.max())}."
            )
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "group_names", group_names)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def n_groups(self) -> int:
        """Number of group names ``G`` (some may be empty after :meth:`subset`)."""
        return len(self.group_names)

    def fingerprint(self) -> str:
        """SHA-256 hex digest of name, texts, labels, groups and group names.

        Used as a cache key for activations and fitted policies: two runs on the same data get the
        same key on any machine, and any edit of a text, label or grouping changes it (stale caches
        keyed by file names were a real bug in the original code). Every field is length-prefixed
        so that e.g. ``("ab", "c")`` and ``("a", "bc")`` hash differently.
        """
        return self._digest

    @cached_property
    def _digest(self) -> str:
        # cached_property writes the instance __dict__ directly, which a frozen dataclass allows.
        h = hashlib.sha256()
        h.update(_FINGERPRINT_VERSION)

        def _put(b: bytes) -> None:
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)

        _put(self.name.encode("utf-8"))
        h.update(len(self.texts).to_bytes(8, "little"))
        for t in self.texts:
            _put(t.encode("utf-8"))
        _put(self.labels.astype("<i8").tobytes())
        _put(self.groups.astype("<i8").tobytes())
        h.update(len(self.group_names).to_bytes(8, "little"))
        for g in self.group_names:
            _put(g.encode("utf-8"))
        return h.hexdigest()

    def subset(self, idx: Sequence[int] | np.ndarray) -> TextDataset:
        """Examples at ``idx`` (int indices in the given order, or a boolean mask); group ids kept."""
        arr = np.asarray(idx)
        if arr.dtype == np.bool_:
            if arr.shape != (len(self),):
                raise DataError(f"subset mask has shape {arr.shape}; expected ({len(self)},).")
            arr = np.flatnonzero(arr)
        elif arr.size == 0:
            arr = arr.astype(np.int64)
        elif not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"subset indices must be integers or a boolean mask; got dtype {arr.dtype}.")
        arr = arr.astype(np.int64).reshape(-1)
        if arr.size and (arr.min() < -len(self) or arr.max() >= len(self)):
            raise DataError(
                f"subset index out of range for dataset {self.name!r} of {len(self)} examples "
                f"(got {int(arr.min())}..{int(arr.max())})."
            )
        return TextDataset(
            name=self.name,
            texts=tuple(self.texts[i] for i in arr.tolist()),
            labels=self.labels[arr],
            groups=self.groups[arr],
            group_names=self.group_names,
        )

    def select_groups(self, group_ids: Iterable[int]) -> TextDataset:
        """Examples whose group id is in ``group_ids`` (file order kept, group ids kept)."""
        ids = np.asarray(list(group_ids), dtype=np.int64)
        unknown = ids[(ids < 0) | (ids >= self.n_groups)]
        if unknown.size:
            raise DataError(
                f"select_groups: group ids {unknown[:5].tolist()} do not exist in {self.name!r} "
                f"(valid ids 0..{self.n_groups - 1})."
            )
        return self.subset(np.isin(self.groups, ids))

    def limit_groups(self, n: int) -> TextDataset:
        """The first ``n`` groups only (for quick ``--limit`` runs); ``group_names`` truncated to ``n``."""
        if n < 1:
            raise DataError(f"limit_groups needs n >= 1; got {n}.")
        if n >= self.n_groups:
            return self
        keep = self.groups < n
        sub = self.subset(keep)
        return TextDataset(
            name=self.name,
            texts=sub.texts,
            labels=sub.labels,
            groups=sub.groups,
            group_names=self.group_names[:n],
        )

    def class_counts(self) -> tuple[int, int]:
        """``(n_label0, n_label1)``: desirable and undesirable example counts."""
        n1 = int(self.labels.sum())
        return len(self) - n1, n1

    def check_two_classes(self, what: str = "training data") -> None:
        """Raise :class:`DataError` unless both labels occur: probes cannot be fitted on one class."""
        n0, n1 = self.class_counts()
        if n0 and n1:
            return
        if not len(self):
            raise DataError(
                f"The {what} ({self.name!r}) is empty. Use more groups (raise --limit on the command line) "
                "or check the data source."
            )
        only = "1 (undesirable)" if n1 else "0 (desirable)"
        missing = "0 (desirable)" if n1 else "1 (undesirable)"
        raise DataError(
            f"The {what} ({self.name!r}, {len(self)} examples in {len(np.unique(self.groups))} groups) "
            f"has only label {only}; it needs examples of label {missing} too. Add such examples, check the "
            "label column (1 = undesirable), or use more groups (raise --limit on the command line, or "
            "change the split)."
        )


def read_csv_records(
    path: Path, *, delimiter: str = ","
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Read a CSV/TSV file into ``(header, [(line_number, row), ...])``.

    Line numbers are 1-based physical lines where each record *starts* (fields may span lines), so
    error messages can point at the row a person sees in an editor. A UTF-8 byte-order mark (Excel
    writes one; the TruthfulQA CSV has one) is removed. Rows with too many or too few fields are
    errors rather than being silently padded.
    """
    import csv

    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"{path}: the file is empty; expected a header row.") from None
            header = [h.strip() for h in header]
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise DataError(
                    f"{path}, line 1: duplicate column names {dupes}; column names must be unique."
                )
            rows: list[tuple[int, dict[str, str]]] = []
            prev_end = reader.line_num
            for values in reader:
                start = prev_end + 1
                prev_end = reader.line_num
                if not values or all(not v.strip() for v in values):
                    continue  # blank line
                if len(values) != len(header):
                    raise DataError(
                        f"{path}, line {start}: {len(values)} fields but the header has {len(header)} "
                        f"({', '.join(header)}). Quote fields that contain the delimiter {delimiter!r}."
                    )
                rows.append((start, dict(zip(header, values, strict=True))))
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({exc}).") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc}). Save the file as UTF-8.") from exc
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror}); check its permissions.") from exc
    return header, rows
