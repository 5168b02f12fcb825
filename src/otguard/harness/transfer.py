"""Transfer question sets of the truthfulness task (``--transfer nqopen`` or a CSV in TruthfulQA's
layout): which questions, which judge, and under which metric-id prefix."""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from otguard.errors import DataError

if TYPE_CHECKING:
    from otguard.data.qa import QAItem
    from otguard.harness.config import CompareConfig

logger = logging.getLogger(__name__)

__all__ = ["TRANSFER_KEYS", "TransferSet", "build_transfer_sets"]

#: Metric keys every transfer set reports, after its prefix (e.g. ``nq_true``).
TRANSFER_KEYS = ("true", "info", "true_x_info_product", "sem")


@dataclass
class TransferSet:
    """One transfer question set: metric-id ``prefix``, display ``label``, its questions, its judge
    and the label of that judge (``sem`` True when SEM is computed next to it)."""

    source: str
    prefix: str
    label: str
    items: list[QAItem]
    judge: Any
    judge_label: str
    record: dict[str, Any]
    sem: bool
    info_label: str = "non-refusal"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "set"


def build_transfer_sets(
    cfg: CompareConfig,
    choice: Any,
    judge_main: Any,
    sem_judge: Any,
    n_transfer: int,
    reserved: Collection[str] = (),
) -> list[TransferSet]:
    """The ``--transfer`` question sets: a seeded sample of ``n_transfer`` questions each, judged by the
    learned judge trained on the set's own labels where they exist, else by the run's main judge
    (``choice``: its :class:`~otguard.harness.judges.JudgeChoice`). A CSV's metric ids may not clash
    with the task's own (``reserved``)."""
    from otguard.data import nqopen_items
    from otguard.data.qa import qa_items_from_csv
    from otguard.harness.judges import build_main_judge, unvalidated

    out: list[TransferSet] = []
    taken: set[str] = set()  # prefixes of the sets before; a CSV's may not clash with any metric id
    for source in cfg.transfer:
        try:
            if source == "nqopen":
                items, prefix, label = nqopen_items(cfg.data_dir), "nq_", "NQ-Open"
                labels = _nqopen_labels(cfg)
            else:
                path = Path(source).expanduser()
                items, label = qa_items_from_csv(path), path.stem
                prefix = _slug(path.stem) + "_"
                sibling = path.with_name(f"{path.stem}.finetune_truth.jsonl")
                labels = str(sibling) if sibling.is_file() else None
        except DataError as exc:
            logger.warning("Transfer set %s skipped: %s", source, exc)
            continue
        while prefix in taken or (
            source != "nqopen" and any(f"{prefix}{k}" in reserved for k in TRANSFER_KEYS)
        ):
            prefix = prefix[:-1] + "x_"
        taken.add(prefix)
        n = min(n_transfer, len(items))
        pick = np.sort(np.random.default_rng(cfg.seed).choice(len(items), size=n, replace=False))
        items = [items[i] for i in pick]
        if choice.kind == "learned" and labels is not None:
            own = build_main_judge(cfg.judge, cfg, sem_judge, labels=labels)
            judge, judge_label, record, sem = (
                own.judge,
                f"learned judge: {label}",
                own.records["true"],
                False,
            )
            info_label = own.info_label
        else:
            judge, judge_label, sem = judge_main, choice.label, choice.kind != "sem"
            info_label = choice.info_label
            if choice.kind == "learned":
                judge_label = "learned judge: TruthfulQA"
            record = {
                **choice.records["true"],
                "note": "the TruthfulQA judge: no labels for this set",
            }
        if sem:
            record = {**record, "secondary": unvalidated("sem", sem_judge.name)}
        out.append(TransferSet(source, prefix, label, items, judge, judge_label, record, sem, info_label))
    return out


def _nqopen_labels(cfg: CompareConfig) -> str | None:
    """``"nqopen"`` (the learned judge's label source, with NQ-Open's references) if it has labels."""
    from otguard.data._base import resolve_data_dir

    root = resolve_data_dir(cfg.data_dir)
    path = None if root is None else root / "nqopen" / "finetune_truth.jsonl"
    return "nqopen" if path is not None and path.is_file() else None
