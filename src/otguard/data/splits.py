"""Group-aware train / validation / test splits.

Splits are made over *groups*, never over examples: the answers to one TruthfulQA question share
most of their text, so putting some in training and others in test would leak the answer. The
randomness is a local ``np.random.default_rng(seed + fold)``, so a split depends only on its
arguments, never on what consumed the global RNG before (a reproducibility bug of the original code).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from otguard.data._base import TextDataset
from otguard.errors import DataError

__all__ = ["Split", "group_kfold", "group_split_by_names"]


@dataclass(frozen=True, eq=False)
class Split:
    """Example indices (sorted ``np.int64`` arrays) of the train, validation and test parts.

    Use them with :meth:`TextDataset.subset` or to index activation arrays ``(N, ...)`` directly.
    Probes train on ``train``; early stopping, threshold and layer choice use ``val``; metrics use
    ``test``.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def train_val(self) -> np.ndarray:
        """``train`` ∪ ``val``, sorted (SLIM estimates transport moments on both)."""
        return np.union1d(self.train, self.val).astype(np.int64)


def _examples_of(dataset: TextDataset, group_ids: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.isin(dataset.groups, group_ids)).astype(np.int64)


def _check_val_ratio(val_ratio: float) -> None:
    if not 0.0 <= val_ratio < 1.0:
        raise DataError(f"val_ratio must be in [0, 1); got {val_ratio}.")


def _split_pool(
    dataset: TextDataset,
    pool: np.ndarray,
    test_groups: np.ndarray,
    val_ratio: float,
    rng: np.random.Generator,
) -> Split:
    """Draw validation groups from the training pool and build the :class:`Split`."""
    n_pool = len(pool)
    n_train = int(np.floor(n_pool * (1.0 - val_ratio) + 1e-9))
    n_val = n_pool - n_train
    if val_ratio > 0 and n_val == 0:
        n_val, n_train = 1, n_pool - 1
    if n_train < 1:
        raise DataError(
            f"Too few groups in {dataset.name!r} to split: the training pool has {n_pool} group(s), and "
            f"val_ratio={val_ratio} leaves none for training. Use more data (raise --limit on the command "
            "line) or lower val_ratio."
        )
    val_groups = rng.choice(pool, size=n_val, replace=False) if n_val else np.empty(0, dtype=np.int64)
    train_groups = np.setdiff1d(pool, val_groups)
    return Split(
        train=_examples_of(dataset, train_groups),
        val=_examples_of(dataset, val_groups),
        test=_examples_of(dataset, test_groups),
    )


def group_kfold(
    dataset: TextDataset,
    n_folds: int = 2,
    fold: int = 0,
    *,
    val_ratio: float = 0.2,
    seed: int = 42,
    contiguous: bool = True,
) -> Split:
    """Fold ``fold`` of ``n_folds`` over groups, with a validation part drawn from the training pool.

    ``contiguous=True`` follows docs/method.md §1.2: fold k's test set is the k-th contiguous block of group
    ids (``np.array_split``, so for 817 TruthfulQA questions and 2 folds: 0–408 and 409–816; no
    shuffling, as in RADIANT/SLIM). ``contiguous=False`` shuffles the groups first with
    ``np.random.default_rng(seed)`` (the same permutation for every fold, so the folds still partition).
    Validation = a random ``val_ratio`` of the remaining groups (``floor(n·(1−val_ratio))`` groups
    train), drawn with ``np.random.default_rng(seed + fold)``. Only groups that have examples count,
    so this also works on a :meth:`TextDataset.subset`. Every group is in exactly one test fold.
    """
    if n_folds < 2:
        raise DataError(f"n_folds must be >= 2 (a test fold and a training pool); got {n_folds}.")
    if not 0 <= fold < n_folds:
        raise DataError(f"fold must be in 0..{n_folds - 1} for n_folds={n_folds}; got {fold}.")
    _check_val_ratio(val_ratio)
    present = np.unique(dataset.groups)
    if len(present) < n_folds:
        raise DataError(
            f"{dataset.name!r} has {len(present)} group(s) but n_folds={n_folds} needs at least one per "
            "fold. Use more data (raise --limit on the command line) or fewer folds."
        )
    # The shuffle must not depend on the fold, or the test folds would not partition the groups.
    order = present if contiguous else np.random.default_rng(seed).permutation(present)
    blocks = np.array_split(order, n_folds)
    test_groups = np.sort(blocks[fold])
    pool = np.sort(np.concatenate([b for k, b in enumerate(blocks) if k != fold]))
    return _split_pool(dataset, pool, test_groups, val_ratio, np.random.default_rng(seed + fold))


def group_split_by_names(
    dataset: TextDataset,
    test_groups: Iterable[str],
    val_ratio: float = 0.2,
    seed: int = 42,
) -> Split:
    """Test = the groups named in ``test_groups``; train/val = the other groups (val drawn by group).

    Built for ToxiGen: evaluating on target groups never seen in training measures whether the
    detector learned toxicity rather than the group's vocabulary. Validation groups are drawn with
    ``np.random.default_rng(seed)`` from the remaining groups.
    """
    _check_val_ratio(val_ratio)
    names = [test_groups] if isinstance(test_groups, str) else list(test_groups)
    index = {n: i for i, n in enumerate(dataset.group_names)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise DataError(
            f"Unknown test group(s) {unknown} for {dataset.name!r}; available: "
            f"{', '.join(dataset.group_names)}."
        )
    if not names:
        raise DataError("test_groups is empty; name at least one group to hold out.")
    test = np.array(sorted({index[n] for n in names}), dtype=np.int64)
    pool = np.setdiff1d(np.unique(dataset.groups), test)
    if len(pool) == 0:
        raise DataError(f"All groups of {dataset.name!r} are test groups; leave some for training.")
    return _split_pool(dataset, pool, test, val_ratio, np.random.default_rng(seed))
