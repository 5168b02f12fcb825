"""``otguard rescore``: score a toxicity run's saved continuations with another scorer; no model runs.

Scores of different scorers are not comparable, so a rescored run is a new output folder whose
results name the new scorer; every metric that does not depend on the scorer (perplexity, dist-n,
flag rates, CE/KL) is kept as it was.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from otguard.errors import DataError
from otguard.harness.run import OUTPUT_KIND, write_csv
from otguard.harness.toxicity import ToxicityTask, toxicity_metrics
from otguard.io import prepare_output_dir, write_marker
from otguard.results import MetricSummary, RunResults

__all__ = ["rescore_toxicity"]

_KINDS = ("hate", "neutral")
# The sweeps' figures that the scorer made (the grid points' continuations are not saved, so they cannot
# be rescored): validation non-toxicity, and the frontier's mean toxicities.
_SCORED_SWEEP_KEYS = ("nontoxic", "tox_mean", "neutral_tox_mean")


def _drop_stale_sweep_figures(results: RunResults, old_scorer: Any) -> None:
    """Drop the frontier's scorer-made figures (test side and the reference line): they would mix the old
    scorer's numbers into a run that names the new one. The validation figures stay, because they are
    what chose each operating point; ``selection.scored_by`` says which scorer made them."""
    for entry in results.methods.values():
        for point in entry.sweep or []:
            for test in [point.test, *(f.test for f in point.folds)]:
                for key in _SCORED_SWEEP_KEYS:
                    test.pop(key, None)
    if results.selection is not None:
        reference = results.selection.extra.get("reference")
        if isinstance(reference, dict):
            for key in _SCORED_SWEEP_KEYS:
                reference.pop(key, None)
        results.selection.extra["scored_by"] = old_scorer


def _scorers(results: RunResults, folds: list[int], scorer: str, data_dir: str | None) -> dict[int, Any]:
    """One scorer per fold: the ``embedding`` scorer is refitted on the groups the fold did not evaluate."""
    from otguard.evaluation.factory import make_scorer

    scorers: dict[int, Any] = {}
    first = results.methods[results.method_ids[0]] if results.methods else None
    for fold in folds:
        if scorer.split(":")[0] == "embedding":
            record = first.folds[fold] if first is not None and fold < len(first.folds) else None
            groups = (record.meta.get("eval_groups") if record is not None else None) or []
            scorers[fold] = make_scorer(scorer, data_dir=data_dir, exclude_groups=groups)
        else:
            scorers[fold] = scorers.get(folds[0]) or make_scorer(scorer)
    return scorers


def _scorer_record(
    results: RunResults, folds: list[int], scorers: dict[int, Any], spec: str, name: str, data_dir: str | None
) -> dict[str, Any]:
    """The new scorer's ``judges`` record, validated on each fold's held-out groups as a run does (the
    original run's record describes the old scorer)."""
    from otguard.evaluation.toxicity_validation import (
        VALIDATED_KINDS,
        check_scorer,
        judge_record,
        not_validated_note,
        not_validated_record,
    )

    kind = spec.split(":")[0]
    if kind not in VALIDATED_KINDS:
        return not_validated_record(name, not_validated_note(kind))
    from otguard.data import toxigen_statements

    try:
        dataset = toxigen_statements(data_dir, source="both")
    except DataError as exc:
        return not_validated_record(name, f"the held-out check could not run: {exc}")
    first = results.methods[results.method_ids[0]]
    seed = int(results.config.get("seed", 0) or 0)
    checks = []
    for fold in folds:
        groups = (first.folds[fold].meta.get("eval_groups") if fold < len(first.folds) else None) or []
        if not groups:
            continue
        try:
            checks.append(
                check_scorer(scorers[fold], dataset, groups, seed=seed, split=f"fold{fold}_heldout_groups")
            )
        except DataError as exc:  # e.g. a run on other data: say why instead of failing the rescore
            return not_validated_record(name, f"the held-out check could not run: {exc}")
    from otguard.evaluation.toxicity_scorers import scorer_measure

    return judge_record(name, checks, seed=seed, measure=scorer_measure(scorers[folds[0]]))


def rescore_toxicity(
    run_dir: str | os.PathLike[str],
    scorer: str,
    out_dir: str | os.PathLike[str],
    *,
    data_dir: str | None = None,
    force: bool = False,
    option: str = "out_dir",
) -> RunResults:
    """Score the saved continuations of a toxicity run with another scorer; no model is run.

    Reads ``run_dir/results.json`` and ``run_dir/continuations.csv``, recomputes the toxicity metrics
    (expected max, probability, mean, neutral mean) per method and fold with ``scorer`` (the
    ``embedding`` scorer is refitted per fold on the groups that fold did not evaluate), keeps every
    other metric, and writes ``results.json``, ``continuations.csv`` and the report into ``out_dir``.
    """
    from otguard.report import write_report

    src = Path(run_dir)
    results = RunResults.from_json(src / "results.json")
    if results.task != ToxicityTask.name or not (src / ToxicityTask.csv_name).is_file():
        raise DataError(
            f"{src} is not a toxicity run (need results.json with dataset toxigen and continuations.csv)."
        )
    out = prepare_output_dir(out_dir, OUTPUT_KIND, force=force, option=option)
    text = (src / ToxicityTask.csv_name).read_text(encoding="utf-8")
    rows: list[dict[str, Any]] = list(csv.DictReader(text.splitlines(keepends=True)))
    data_dir = data_dir or results.config.get("data_dir")
    folds = sorted({int(r["fold"]) for r in rows})
    scorers = _scorers(results, folds, scorer, data_dir)
    by_key: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault((int(r["fold"]), r["method"], r["kind"]), []).append(r)
    name = scorer
    for (fold, _, _), group_rows in by_key.items():
        sc = scorers[fold]
        name = getattr(sc, "name", scorer)
        scores = np.asarray(sc.score([r["continuation"] for r in group_rows]), dtype=np.float64)
        for r, s in zip(group_rows, scores, strict=True):
            r["toxicity"] = float(s)
    for method, entry in results.methods.items():
        values: dict[str, list[float]] = {}
        for fold in folds:
            per_kind: dict[str, list[list[float]]] = {}
            for kind in _KINDS:
                per_prompt: dict[tuple[str, str], list[float]] = {}
                for r in by_key.get((fold, method, kind), []):
                    per_prompt.setdefault((r["group"], r["prompt"]), []).append(float(r["toxicity"]))
                if per_prompt:
                    per_kind[kind] = list(per_prompt.values())
            if "hate" in per_kind:
                for key, value in toxicity_metrics(per_kind["hate"], per_kind.get("neutral")).items():
                    values.setdefault(key, []).append(value)
        for key, vals in values.items():
            # the file's own std convention; the new scores have no paired intervals (delta_vs_none)
            entry.metrics[key] = MetricSummary.of(vals, ddof=results.std_ddof)
    old_scorer = results.config.get("judge")
    _drop_stale_sweep_figures(results, old_scorer)
    results.config["judge"] = name
    results.config["rescored_from"] = str(src.resolve())
    results.judges = {
        **results.judges,
        "toxicity": _scorer_record(results, folds, scorers, scorer, name, data_dir),
    }
    write_marker(out, OUTPUT_KIND)
    results.write(out / "results.json")
    write_csv(out / ToxicityTask.csv_name, ToxicityTask.csv_fields, rows)
    write_report(out / "results.json", out, how_to_read=ToxicityTask.how_to_read(results))
    return results
