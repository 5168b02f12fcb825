"""Which validation score should pick each method's grid point: MC2 (the default) or judged answers?

Issue 12 asks to measure both. This script re-creates, fold by fold, exactly what ``otguard compare``
did before it chose (same configuration, split, fitted grid points, calibrated gates, validation
questions and validation documents), scores every grid point on the validation questions by MC2 *and*
by the learned judge's True and True×Info of greedy answers, applies the one selection rule
(:func:`otguard.harness.sweep.select_point`, KL budget included) with each score, and reads the test
figures of the chosen points from the finished run's frontier (``sweep[i].folds[k].test`` of its
``results.json``: every grid point on the same test questions). It stops if the MC2 choice does not
reproduce the run's own choice, so the comparison is about the score, nothing else.

    export OTGUARD_DATA_DIR=/work/shared/data OMP_NUM_THREADS=2
    .venv/bin/python scripts/measure_selection_rules.py --run runs/compare-full --out /tmp/selection.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("measure_selection_rules")

SCORES = ("mc2", "true", "true_x_info")
# Settings that decide the fitted points and the validation samples: they must match the run's.
_SAME = (
    "model",
    "seed",
    "split_seed",
    "val_ratio",
    "folds",
    "limit",
    "kl_budget",
    "sweep_questions",
    "sweep_docs",
    "sweep_tokens",
    "gate_questions",
    "gate_answers",
    "max_false_flag_rate",
    "grids",
    "method_params",
    "drift_source",
    "drift_docs",
    "batch_size",
    "mc_batch_size",
    "max_new_tokens",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", required=True, help="a finished `otguard compare` output folder (TruthfulQA)"
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True, help="JSON file for the figures")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from otguard.activations import collect
    from otguard.data import group_kfold
    from otguard.harness.config import CompareConfig
    from otguard.harness.run import CompareRun, _grid_points, _point_key, fit_policies
    from otguard.harness.sweep import select_point
    from otguard.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    saved = json.loads((Path(args.run) / "results.json").read_text())
    cfg_saved = saved["config"]
    swept_methods = [m for m, e in saved["methods"].items() if e.get("sweep")]
    config = CompareConfig(
        data_dir=args.data_dir or cfg_saved.get("data_dir"), methods=("none", *swept_methods)
    )
    mine = config.to_dict()
    differ = [
        k
        for k in _SAME
        if json.dumps(mine.get(k), sort_keys=True) != json.dumps(cfg_saved.get(k), sort_keys=True)
        and not (k == "model" and cfg_saved.get(k, "").endswith("SmolLM2-135M-Instruct"))
    ]
    if differ:
        logger.error("the run was not made with the default settings (%s differ); not comparable", differ)
        return 2
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        run = CompareRun(config, Path(tmp) / "out", progress=False)
        task = run.task
        model, tok = load_model(config.model, dtype=cfg_saved.get("dtype", "auto"))
        task.bind(model, tok)
        acts = collect(model, tok, task.dataset, batch_size=config.batch_size, progress=False)
        folds: list[dict[str, Any]] = []
        for fold in range(config.folds):
            split = group_kfold(
                task.dataset,
                n_folds=config.folds,
                fold=fold,
                val_ratio=config.val_ratio,
                seed=config.split_seed,
            )
            task.start_fold(fold, split)
            sweeps = fit_policies(config, swept_methods, acts, split, task, False)
            task.calibrate_gates(sweeps, float(config.max_false_flag_rate))
            points = _grid_points(sweeps)
            by_mc2 = task.validate(points, dict.fromkeys(points, "mc2"))
            judged = task.validate(points, dict.fromkeys(points, "true"))
            kls = run._grid_kls(run.val_docs[fold :: config.folds], points)
            record: dict[str, Any] = {"fold": fold, "methods": {}}
            for name, sw in sweeps.items():
                keys = [_point_key(name, i) for i in range(len(sw.policies))]
                rows = [{**by_mc2[k], **judged[k], "kl": kls.get(k)} for k in keys]
                saved_points = saved["methods"][name]["sweep"]
                here = [next(f for f in p["folds"] if f["fold"] == fold) for p in saved_points]
                tests = [f["test"] for f in here]
                ran = next(i for i, f in enumerate(here) if f["selected"])
                chosen = {s: select_point(rows, s, config.kl_budget)[0] for s in SCORES}
                if chosen["mc2"] != ran:
                    logger.error(
                        "fold %d %s: MC2 picks point %d here but the run picked %d; not comparable",
                        fold,
                        name,
                        chosen["mc2"],
                        ran,
                    )
                    return 3
                record["methods"][name] = {
                    "params": [p["params"] for p in saved_points],
                    "validation": rows,
                    "chosen": chosen,
                    "chosen_test": {s: tests[i] for s, i in chosen.items()},
                }
                logger.info(
                    "fold %d %s: %s",
                    fold,
                    name,
                    ", ".join(f"{s} -> {saved_points[i]['params']}" for s, i in chosen.items()),
                )
            folds.append(record)
    summary: dict[str, Any] = {}
    for s in SCORES:
        picks = [m["chosen_test"][s] for f in folds for m in f["methods"].values()]
        summary[s] = {
            k: float(np.mean([p[k] for p in picks if p.get(k) is not None]))
            for k in ("true", "mc2", "info", "kl")
        }
        summary[s]["same_as_mc2"] = sum(
            m["chosen"][s] == m["chosen"]["mc2"] for f in folds for m in f["methods"].values()
        )
    summary["choices"] = sum(len(f["methods"]) for f in folds)
    out = {
        "run": str(Path(args.run).resolve()),
        "folds": folds,
        "summary": summary,
        "frontier_questions": cfg_saved.get("frontier_questions"),
        "seconds": time.time() - t0,
    }
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    for s in SCORES:
        r = summary[s]
        logger.info(
            "select by %-11s: test True %.3f, MC2 %.3f, Info %.3f, KL %.3f (same point as MC2 in %d of %d)",
            s,
            r["true"],
            r["mc2"],
            r["info"],
            r["kl"],
            r["same_as_mc2"],
            summary["choices"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
