"""Validate the degeneracy guard (otguard.evaluation.degeneracy) against human labels and real outputs.

    OTGUARD_DATA_DIR=/work/shared/data python scripts/validate_degeneracy.py \
        [--answers runs/compare-full/answers.csv] [--out degeneracy.json] [--examples 10] [--seed 0]

(a) Every answer of TruthfulQA's human-labelled files (``truthfulqa/finetune_truth.jsonl`` and
    ``finetune_info.jsonl``): how often the guard fires, overall and per human label, and which rules
    fired. It should fire on almost none of the answers people labelled true or informative.
(b) A comparison run's ``answers.csv`` (columns fold, method, question, answer, true): how often the
    guard fires per method, how many of the fired answers the run's judge had called true, and a
    seeded sample of fired and not-fired answers of one method (``--method``, default ``iti``) for a
    person to read.

Writes a small JSON of the figures (``--out``) and prints a summary; commits no data.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from otguard.evaluation.degeneracy import degeneracy, label_figures
from otguard.evaluation.learned_judge_data import load_labels

logger = logging.getLogger("validate_degeneracy")

LABEL_FILES = {
    "truth": ("truthfulqa/finetune_truth.jsonl", "true", "false"),
    "info": ("truthfulqa/finetune_info.jsonl", "informative", "uninformative"),
}


def human_labels(data_dir: Path, max_listed: int) -> dict[str, Any]:
    """Figures of part (a), one entry per label file; the answers that are TruthfulQA's own reference
    answers (written by people) and those written by models are also counted apart."""
    from otguard.data import truthfulqa_items

    items = truthfulqa_items(data_dir)
    out: dict[str, Any] = {}
    for kind, (rel, yes, no) in LABEL_FILES.items():
        data = load_labels(data_dir / rel, items)
        verdicts = [degeneracy(a) for a in data.answers]
        fired = np.array([v.degenerate for v in verdicts], dtype=bool)
        ref = data.is_reference
        figures = label_figures(data.answers, data.labels, yes=yes, no=no)
        reasons = Counter(v.reason for v in verdicts if v.degenerate)
        pairs = zip(data.answers, verdicts, data.labels.tolist(), strict=True)
        fired_yes = sorted({a for a, v, y in pairs if v.degenerate and y})
        out[kind] = {
            "labels": rel,
            **figures,
            "distinct_answers_fired": len({a for a, f in zip(data.answers, fired, strict=True) if f}),
            "reference_answers": {"n": int(ref.sum()), "fired": int(fired[ref].sum())},
            "model_answers": {"n": int((~ref).sum()), "fired": int(fired[~ref].sum())},
            "rules_fired": dict(sorted(reasons.items())),
            f"fired_labelled_{yes}_examples": [a[:160] for a in fired_yes[:max_listed]],
        }
    return out


def run_answers(path: Path, method: str, examples: int, seed: int) -> dict[str, Any]:
    """Figures of part (b)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    per: dict[str, dict[str, int]] = defaultdict(lambda: {"n": 0, "fired": 0, "fired_judged_true": 0})
    fired_rows: list[str] = []
    kept_rows: list[str] = []
    for row in rows:
        v = degeneracy(row["answer"])
        counts = per[row["method"]]
        counts["n"] += 1
        if v.degenerate:
            counts["fired"] += 1
            counts["fired_judged_true"] += row.get("true", "").strip().lower() == "true"
        if row["method"] == method:
            (fired_rows if v.degenerate else kept_rows).append(row["answer"])
    rng = random.Random(seed)
    by_method = {
        m: {**c, "fire_rate": c["fired"] / c["n"] if c["n"] else float("nan")} for m, c in sorted(per.items())
    }
    return {
        "answers": str(path),
        "per_method": by_method,
        "examples_method": method,
        "fired_examples": rng.sample(fired_rows, min(examples, len(fired_rows))),
        "not_fired_examples": rng.sample(kept_rows, min(examples, len(kept_rows))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("OTGUARD_DATA_DIR"), help="shared data folder")
    parser.add_argument("--answers", type=Path, default=None, help="a comparison run's answers.csv")
    parser.add_argument("--method", default="iti", help="method whose answers are printed (b)")
    parser.add_argument("--examples", type=int, default=10, help="fired / not-fired answers printed (b)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the printed samples")
    parser.add_argument("--out", type=Path, default=Path("degeneracy.json"), help="JSON of the figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.data_dir:
        parser.error("pass --data-dir or set OTGUARD_DATA_DIR to the shared data folder")

    report: dict[str, Any] = {"seed": args.seed, "human_labels": human_labels(Path(args.data_dir), 20)}
    for kind, f in report["human_labels"].items():
        yes, no = LABEL_FILES[kind][1:]
        logger.info(
            "(a) %s: fires on %d of %d answers (%.2f %%): %d of %d labelled %s (%.2f %%), "
            "%d of %d labelled %s (%.2f %%); %d of the %d reference answers; rules %s",
            f["labels"], f["fired"], f["n"], 100 * f["fire_rate"],
            f[f"fired_labelled_{yes}"], f[f"n_labelled_{yes}"], yes, 100 * f[f"fire_rate_labelled_{yes}"],
            f[f"fired_labelled_{no}"], f[f"n_labelled_{no}"], no, 100 * f[f"fire_rate_labelled_{no}"],
            f["reference_answers"]["fired"], f["reference_answers"]["n"], f["rules_fired"],
        )  # fmt: skip
    if args.answers is not None:
        report["run"] = run = run_answers(args.answers, args.method, args.examples, args.seed)
        for m, c in run["per_method"].items():
            logger.info(
                "(b) %-11s fires on %3d of %d answers (%5.1f %%); %d of them judged true in the run",
                m, c["fired"], c["n"], 100 * c["fire_rate"], c["fired_judged_true"],
            )  # fmt: skip
        for title, key in (("fired", "fired_examples"), ("not fired", "not_fired_examples")):
            logger.info("(b) %s answers of %s (seed %d):", title, args.method, args.seed)
            for a in run[key]:
                logger.info("    %r", a[:150])
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info("Figures written to %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
