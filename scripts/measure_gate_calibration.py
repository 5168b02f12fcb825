"""Measure the conformal gate calibration (otguard.gate_calibration) on SmolLM2 + TruthfulQA, fold 0.

Fits the default RADIANT and SLIM policies on fold 0 as ``otguard compare`` does (2 folds by question,
20 % of the training pool for validation, split seed 42, method seed 0; SLIM's Stage 3 is skipped: κ
scales the edit, not the vote, so it changes no flag of a one-layer policy), calibrates each policy's
vote threshold on the fold's validation questions (all by default) at the targets ``--alphas``, and
measures the gate before and after on a seeded sample of ``--questions`` test questions (all their reference
answers, teacher-forced in the generation prompt; :func:`otguard.evaluation.gate.measure_gate`).

One teacher-forced pass per policy and question set: a one-layer policy's votes at its layer do not
depend on its own threshold, so the flags at every threshold are ``votes >= tau`` of the same records;
one calibrated policy is also measured with a fresh pass, and the script stops if the two disagree.
Also reports the per-answer decision (``loss="answer"``: the share of true answers with any flagged
position, bounded instead of the share of positions).

    export OTGUARD_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1
    .venv/bin/python scripts/measure_gate_calibration.py --out /tmp/gate_calibration.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otguard.evaluation.gate import AnswerGate, auroc, gate_answers, summarize
from otguard.gate_calibration import calibrate_gate

logger = logging.getLogger("measure_gate_calibration")


def rates_at(gates: list[AnswerGate], tau: int) -> dict[str, float]:
    """The point-of-use figures of a one-layer gate at threshold ``tau``, from the records' votes."""
    true = [g for g in gates if not g.false]
    false = [g for g in gates if g.false]
    t = torch.cat([g.votes for g in true]) if true else torch.zeros(0)
    f = torch.cat([g.votes for g in false]) if false else torch.zeros(0)
    return {  # shares as summarize computes them (integer counts / numel), so they compare exactly
        "tau": tau,
        "false_flag_rate": float(int((t >= tau).sum())) / t.numel(),
        "catch_rate": float(int((f >= tau).sum())) / f.numel(),
        "gate_auroc": auroc(f.numpy(), t.numpy()),
        "true_answers_flagged": float(np.mean([bool((g.votes >= tau).any()) for g in true])),
        "false_answers_flagged": float(np.mean([bool((g.votes >= tau).any()) for g in false])),
    }


def same_detector(a: Any, b: Any) -> bool:
    """Same layers, thresholds and probes: the same votes and flags (the maps may differ)."""
    if len(a.layers) != len(b.layers):
        return False
    return all(
        x.layer == y.layer and x.threshold == y.threshold and torch.equal(x.probe_weight, y.probe_weight)
        and torch.equal(x.probe_bias, y.probe_bias)
        for x, y in zip(a.layers, b.layers, strict=True)
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=100, help="test questions sampled (seeded)")
    parser.add_argument("--val-questions", type=int, default=0, help="validation questions (0: all)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.30, 0.20])
    parser.add_argument("--methods", nargs="+", default=["radiant", "slim"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    started = time.time()

    from otguard.activations import collect
    from otguard.data import group_kfold, truthfulqa_items, truthfulqa_mc2
    from otguard.harness.config import CompareConfig
    from otguard.harness.truthfulqa import gate_sample
    from otguard.methods import get_method
    from otguard.models import load_model

    cfg = CompareConfig()
    model, tok = load_model(cfg.model)
    dataset, items = truthfulqa_mc2(None), truthfulqa_items(None)
    acts = collect(model, tok, dataset, batch_size=cfg.batch_size, progress=False)
    fold = 0
    split = group_kfold(dataset, n_folds=cfg.folds, fold=fold, val_ratio=cfg.val_ratio, seed=cfg.split_seed)
    val_items = [items[g] for g in np.unique(dataset.groups[split.val])]
    if args.val_questions:
        val_items = gate_sample(val_items, args.val_questions, 0, seed=cfg.seed + fold)
    test_items = [items[g] for g in np.unique(dataset.groups[split.test])]
    sample = gate_sample(test_items, args.questions, 0, seed=cfg.seed + fold)
    assert not {it.question for it in sample} & {it.question for it in val_items}
    logger.info("fold 0: %d validation questions, %d of %d test questions sampled", len(val_items),
                len(sample), len(test_items))  # fmt: skip

    out: dict[str, Any] = {"fold": fold, "val_questions": len(val_items), "test_questions": len(sample),
                           "alphas": args.alphas, "methods": {}}  # fmt: skip
    cache: list[tuple[Any, list[AnswerGate], list[AnswerGate]]] = []
    checked = False
    for name in args.methods:
        t0 = time.time()
        method = get_method(name)
        valid = method.get_params()
        params = {k: v for k, v in {"seed": cfg.seed, "progress": False}.items() if k in valid}
        policy = method.set_params(**params).fit(acts, split.train, split.val).policy_
        if len(policy.layers) != 1:
            raise SystemExit(f"{name}: {len(policy.layers)} layers; this script reads one-layer gates.")
        fit_s = time.time() - t0
        reuse = next((c for c in cache if same_detector(c[0], policy)), None)
        if reuse is not None:
            logger.info("%s has the same detector as %s: its records are reused", name, reuse[0].method)
            val_gates, test_gates = reuse[1], reuse[2]
        else:
            val_gates = gate_answers(model, tok, policy, val_items, batch_size=args.batch_size)
            test_gates = gate_answers(model, tok, policy, sample, batch_size=args.batch_size)
            cache.append((policy, val_gates, test_gates))
        tau0 = policy.layers[0].threshold
        before = rates_at(test_gates, tau0)
        measured = summarize(test_gates, policy)
        got = (measured.false_flag_rate, measured.catch_rate)
        if (before["false_flag_rate"], before["catch_rate"]) != got:
            raise SystemExit(f"votes >= tau disagree with the recorded flags: {before} vs {measured}")
        entry: dict[str, Any] = {"policy": policy.summary(), "fit_seconds": fit_s, "before": before,
                                 "before_validation": rates_at(val_gates, tau0), "after": []}  # fmt: skip
        for loss in ("positions", "answer"):
            for alpha in args.alphas:
                new, cal = calibrate_gate(policy, model, tok, val_items, max_false_flag_rate=alpha, loss=loss,
                                          gates=val_gates)  # fmt: skip
                tau = new.layers[0].threshold
                after = rates_at(test_gates, tau)
                if not checked and loss == "positions":  # one fresh pass with the calibrated policy
                    fresh = summarize(gate_answers(model, tok, new, sample, batch_size=args.batch_size), new)
                    got = (fresh.false_flag_rate, fresh.catch_rate)
                    if got != (after["false_flag_rate"], after["catch_rate"]):
                        raise SystemExit(f"fresh pass disagrees: {fresh.false_flag_rate} vs {after}")
                    checked = True
                layer = cal.layers[0]
                entry["after"].append({
                    "loss": loss, "alpha": alpha, "tau": tau, "feasible": layer.feasible,
                    "validation": layer.row(), "test": after, "calibration": cal.to_dict(),
                })  # fmt: skip
        entry["seconds"] = time.time() - t0
        out["methods"][name] = entry
    out["seconds"] = time.time() - started
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(table(out))
    return 0


def table(out: dict[str, Any]) -> str:
    """The before/after figures as a Markdown table."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [
        f"fold 0: calibrated on {out['val_questions']} validation questions, tested on "
        f"{out['test_questions']} test questions ({out['seconds']:.0f} s)\n",
        "| method | loss bounded | α | τ | bound (val) | false-flag % | catch % | AUROC "
        "| true ans. ≥1 flag % | false ans. ≥1 flag % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in out["methods"].items():
        b = e["before"]
        lines.append(f"| {name} | (bank τ) | – | {b['tau']} | – | {pct(b['false_flag_rate'])} | "
                     f"{pct(b['catch_rate'])} | {b['gate_auroc']:.3f} | {pct(b['true_answers_flagged'])} | "
                     f"{pct(b['false_answers_flagged'])} |")  # fmt: skip
        for a in e["after"]:
            t = a["test"]
            off = "" if a["feasible"] else " (off)"
            lines.append(f"| {name} | {a['loss']} | {a['alpha']:.2f} | {a['tau']}{off} | "
                         f"{a['validation']['bound']:.3f} | {pct(t['false_flag_rate'])} | "
                         f"{pct(t['catch_rate'])} | {t['gate_auroc']:.3f} | "
                         f"{pct(t['true_answers_flagged'])} | "
                         f"{pct(t['false_answers_flagged'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
