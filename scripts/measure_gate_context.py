"""Do probes trained in the generation context gate better where the gate runs? SmolLM2 + TruthfulQA, fold 0.

Fits RADIANT (default parameters, method seed 0) on fold 0 of the default split (2 folds by question,
20 % of the training pool for validation, split seed 42; as ``otguard compare``) twice:

- ``bank``: activations at the last token of ``Q: {question} A: {answer}`` (the papers' bank, today);
- ``generation``: the same (question, answer) rows read in the generation context, i.e. the text
  ``"\\n\\nQ: {question}\\nA: {answer}"`` after the instruction + six-shot primer
  (``truthfulqa_mc2(context="generation")`` collected with ``prefix=qa_prefix()``), the last answer
  token; ``qa_prefix() + text`` is exactly the string the gate teacher-forces.

For each, on a seeded sample of ``--questions`` test questions (all their reference answers,
teacher-forced in the generation prompt: :func:`otguard.evaluation.gate.gate_answers`): the point-of-use
false-flag rate (true-answer positions flagged), catch rate (false-answer positions flagged), AUROC of
the vote count and the shares of answers with at least one edited position, at the policy's bank
threshold and after :func:`otguard.gate_calibration.calibrate_gate` at ``--max-false-flag-rate`` on the
fold's validation questions (loss ``positions``, today's default, and ``answer``).

From the same per-position vote records, **answer-level decision rules** (a decision carried across
the answer's tokens), each with its threshold calibrated on the validation questions by the same
conformal-risk-control rule (per-question units, loss = "this true answer is flagged") to the same
target, and reported on the test answers (false-flag = share of true answers flagged, catch = share of
false answers flagged, AUROC of the rule's answer score):

- ``any-position``: today's gate read per answer (score: the answer's largest vote count);
- ``first-position``: decide at the first answer token, keep the decision (score: its vote count);
- ``running-mean``: flag from the first position where the mean vote over the answer so far reaches
  the threshold, and keep editing (score: the largest running mean; causal);
- ``mean`` (not causal, needs the whole answer: the ceiling of an answer-level vote detector);
- ``last-position`` (not causal: the answer's last token is only known once it is written; the position
  the probes are trained on, so it separates what the probes learnt from how they transfer along the
  answer): its vote count;
- ``majority`` (not causal): more than half of the positions have votes >= the calibrated
  position threshold (score: that share; threshold 0.5, not calibrated).

For the causal rules, the share of true- and false-answer positions that the rule edits is reported too.

    export OTGUARD_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1
    .venv/bin/python scripts/measure_gate_context.py --out /tmp/gate_context.json

Cost on one CPU thread: collecting the generation-context activations of fold 0's training pool
(~3,100 texts after a 215-token prefix) takes about 7 minutes the first time (the whole first run: 14
minutes on a shared 2-core machine; later runs about 7) and is cached
(``~/.cache/otguard/activations``); ``--train-questions N`` fits both arms on N seeded training
questions (and all validation questions) to cut it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from otguard.evaluation.gate import AnswerGate, auroc, gate_answers, summarize
from otguard.gate_calibration import calibrate_gate, choose_threshold, crc_bound, unit_losses

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure_gate_calibration import rates_at  # noqa: E402  (the per-position figures at a threshold)

logger = logging.getLogger("measure_gate_context")

FOLD = 0


# --------------------------------------------------------------------------- answer-level rules
def _votes(g: AnswerGate) -> np.ndarray:
    return g.votes.numpy().astype(np.float64)


def _running_mean(v: np.ndarray) -> np.ndarray:
    return np.cumsum(v) / np.arange(1, v.size + 1)


#: rule -> (answer score, positions edited at threshold theta or None when the rule is not causal)
Rule = tuple[Callable[[np.ndarray], float], Callable[[np.ndarray, float], np.ndarray] | None]
RULES: dict[str, Rule] = {
    "any-position": (lambda v: float(v.max()), lambda v, th: v >= th),
    "first-position": (lambda v: float(v[0]), lambda v, th: np.full(v.size, v[0] >= th)),
    "running-mean": (
        lambda v: float(_running_mean(v).max()),
        lambda v, th: np.maximum.accumulate(_running_mean(v) >= th - 1e-12),
    ),
    "mean": (lambda v: float(v.mean()), None),
    "last-position": (lambda v: float(v[-1]), None),
}


def calibrate_scores(scores: np.ndarray, false: np.ndarray, questions: np.ndarray, alpha: float
                     ) -> tuple[float, bool, float]:  # fmt: skip
    """The smallest threshold on validation answer ``scores`` whose conformal-risk-control bound on the
    share of flagged true answers (per-question units) is <= ``alpha``; (threshold, feasible, bound)."""
    candidates = np.append(np.unique(scores), np.inf)  # ascending: the losses are non-increasing
    true = ~false
    losses = (scores[true][:, None] >= candidates[None, :] - 1e-12).astype(np.float64)
    units = unit_losses(losses, questions[true].tolist(), "question")
    k, feasible = choose_threshold(units, alpha)
    return float(candidates[k]), feasible, float(crc_bound(units)[k])


def answer_rule_figures(val: Sequence[AnswerGate], test: Sequence[AnswerGate], alpha: float, tau_pos: int
                        ) -> dict[str, Any]:  # fmt: skip
    """Every answer-level rule, calibrated on ``val`` and measured on ``test`` (see the module docstring)."""
    out: dict[str, Any] = {}

    def arrays(gates: Sequence[AnswerGate], score: Callable[[np.ndarray], float]) -> tuple[np.ndarray, ...]:
        s = np.array([score(_votes(g)) for g in gates])
        return s, np.array([g.false for g in gates]), np.array([g.question for g in gates])

    for name, (score, edits) in RULES.items():
        vs, vf, vq = arrays(val, score)
        ts, tf, _ = arrays(test, score)
        theta, feasible, bound = calibrate_scores(vs, vf, vq, alpha)
        entry: dict[str, Any] = {
            "threshold": theta, "feasible": feasible, "bound": bound,
            "validation": {"false_flag_rate": float((vs[~vf] >= theta - 1e-12).mean()),
                           "catch_rate": float((vs[vf] >= theta - 1e-12).mean()),
                           "auroc": auroc(vs[vf], vs[~vf])},
            "test": {"false_flag_rate": float((ts[~tf] >= theta - 1e-12).mean()),
                     "catch_rate": float((ts[tf] >= theta - 1e-12).mean()),
                     "auroc": auroc(ts[tf], ts[~tf])},
        }  # fmt: skip
        if edits is not None and np.isfinite(theta):
            t_pos = np.concatenate([edits(_votes(g), theta) for g in test if not g.false])
            f_pos = np.concatenate([edits(_votes(g), theta) for g in test if g.false])
            entry["test"]["true_positions_edited"] = float(t_pos.mean())
            entry["test"]["false_positions_edited"] = float(f_pos.mean())
        out[name] = entry
    # majority of positions at the calibrated position threshold: fixed answer threshold 0.5
    share = lambda gs: np.array([float((_votes(g) >= tau_pos).mean()) for g in gs])  # noqa: E731

    def majority(gs: Sequence[AnswerGate]) -> dict[str, float]:
        s, f = share(gs), np.array([g.false for g in gs])
        return {"false_flag_rate": float((s[~f] > 0.5).mean()), "catch_rate": float((s[f] > 0.5).mean()),
                "auroc": auroc(s[f], s[~f])}  # fmt: skip

    out["majority"] = {"threshold": 0.5, "position_tau": tau_pos, "feasible": True, "bound": None,
                       "validation": majority(val), "test": majority(test)}  # fmt: skip
    return out


def paired_bootstrap(a: Sequence[AnswerGate], b: Sequence[AnswerGate], n: int, seed: int) -> dict[str, Any]:
    """95 % paired bootstrap intervals (resampling test questions) of AUROC(b) - AUROC(a): per position and
    per answer score of each rule. ``a`` and ``b`` are the two arms' records of the same answers."""
    key = lambda g: (g.question, g.answer, g.false)  # noqa: E731
    assert [key(g) for g in a] == [key(g) for g in b], "the arms' records are not of the same answers"
    questions = np.array([g.question for g in a])
    uniq = np.unique(questions)
    by_q = [np.flatnonzero(questions == q) for q in uniq]
    false = np.array([g.false for g in a])
    rng = np.random.default_rng(seed)
    draws = [np.concatenate([by_q[i] for i in rng.integers(0, len(uniq), len(uniq))]) for _ in range(n)]
    votes = [[_votes(g) for g in arm] for arm in (a, b)]
    out: dict[str, Any] = {}

    def diff(name: str, idx: np.ndarray) -> float:
        """AUROC(b) - AUROC(a) on the answers ``idx`` (positions pooled, or one score per answer)."""
        vals: list[float] = []
        for v in votes:
            if name == "positions":
                f = np.concatenate([v[i] for i in idx if false[i]])
                t = np.concatenate([v[i] for i in idx if not false[i]])
            else:
                x = per_answer[name][len(vals)][idx]
                f, t = x[false[idx]], x[~false[idx]]
            vals.append(auroc(f, t))
        return vals[1] - vals[0]

    per_answer = {r: [np.array([RULES[r][0](x) for x in v]) for v in votes] for r in RULES}
    for name in ["positions", *RULES]:
        boot = np.array([diff(name, idx) for idx in draws])
        lo, hi = np.quantile(boot, [0.025, 0.975])
        out[name] = {"auroc_difference": diff(name, np.arange(len(a))), "ci95": [float(lo), float(hi)]}
    return out


def records(gates: Sequence[AnswerGate]) -> list[dict[str, Any]]:
    """The per-answer vote records, JSON-ready (for re-analysis without the model)."""
    return [{"question": g.question, "false": g.false, "votes": g.votes.tolist()} for g in gates]


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--questions", type=int, default=100, help="test questions sampled (seeded)")
    parser.add_argument("--val-questions", type=int, default=0, help="validation questions (0: all)")
    parser.add_argument("--train-questions", type=int, default=0,
                        help="training questions (seeded sample; 0: all of the fold)")  # fmt: skip
    parser.add_argument("--max-false-flag-rate", type=float, default=0.3)
    parser.add_argument("--arms", nargs="+", default=["bank", "generation"], choices=["bank", "generation"])
    parser.add_argument("--seed", type=int, default=0, help="torch seed (the fits use CompareConfig().seed)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (0: none)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    started = time.time()

    from otguard.activations import collect
    from otguard.data import group_kfold, truthfulqa_items, truthfulqa_mc2
    from otguard.harness.config import CompareConfig
    from otguard.harness.truthfulqa import gate_sample
    from otguard.methods import get_method
    from otguard.methods.stage3 import sample_questions
    from otguard.models import load_model
    from otguard.prompts import qa_prefix

    cfg = CompareConfig()
    model, tok = load_model(cfg.model)
    items = truthfulqa_items(None)
    datasets = {"bank": truthfulqa_mc2(None), "generation": truthfulqa_mc2(None, context="generation")}
    bank = datasets["bank"]
    assert np.array_equal(bank.groups, datasets["generation"].groups)
    assert np.array_equal(bank.labels, datasets["generation"].labels)
    split = group_kfold(bank, n_folds=cfg.folds, fold=FOLD, val_ratio=cfg.val_ratio, seed=cfg.split_seed)
    train_q = np.unique(bank.groups[split.train])
    if args.train_questions:
        train_q = np.sort(np.asarray(sample_questions(list(train_q), args.train_questions, cfg.seed)))
    train_rows = split.train[np.isin(bank.groups[split.train], train_q)]
    rows = np.concatenate([train_rows, split.val])  # what the probes see: the arms' only difference
    train_idx, val_idx = np.arange(len(train_rows)), np.arange(len(train_rows), len(rows))
    val_items = [items[g] for g in np.unique(bank.groups[split.val])]
    if args.val_questions:
        val_items = gate_sample(val_items, args.val_questions, 0, seed=cfg.seed + FOLD)
    test_items = [items[g] for g in np.unique(bank.groups[split.test])]
    sample = gate_sample(test_items, args.questions, 0, seed=cfg.seed + FOLD)
    assert not {it.question for it in sample} & {it.question for it in val_items}
    logger.info("fold %d: %d training questions (%d texts), %d validation, %d of %d test questions", FOLD,
                len(train_q), len(train_rows), len(val_items), len(sample), len(test_items))  # fmt: skip

    alpha = args.max_false_flag_rate
    out: dict[str, Any] = {
        "fold": FOLD, "method": "radiant", "max_false_flag_rate": alpha, "train_questions": int(len(train_q)),
        "train_texts": int(len(train_rows)), "val_texts": int(len(split.val)),
        "val_questions": len(val_items), "test_questions": len(sample), "argv": sys.argv[1:], "arms": {},
    }  # fmt: skip
    test_records: dict[str, list[AnswerGate]] = {}
    for arm in args.arms:
        t0 = time.time()
        if arm == "bank":  # the whole bank (the compare run's cache entry), then the rows
            acts = collect(model, tok, bank, batch_size=cfg.batch_size, progress=False).subset(rows)
        else:
            acts = collect(model, tok, datasets[arm].subset(rows), batch_size=cfg.batch_size, progress=False,
                           prefix=qa_prefix())  # fmt: skip
        collect_s = time.time() - t0
        method = get_method("radiant")
        valid = method.get_params()
        params = {k: v for k, v in {"seed": cfg.seed, "progress": False}.items() if k in valid}
        policy = method.set_params(**params).fit(acts, train_idx, val_idx).policy_
        if len(policy.layers) != 1:
            raise SystemExit(f"{arm}: {len(policy.layers)} layers; this script reads one-layer gates.")
        fit_s = time.time() - t0 - collect_s
        val_gates = gate_answers(model, tok, policy, val_items, batch_size=args.batch_size)
        test_gates = gate_answers(model, tok, policy, sample, batch_size=args.batch_size)
        tau0 = int(policy.layers[0].threshold)
        before = rates_at(test_gates, tau0)
        measured = summarize(test_gates, policy)
        got = (measured.false_flag_rate, measured.catch_rate)
        if (before["false_flag_rate"], before["catch_rate"]) != got:
            raise SystemExit(f"votes >= tau disagree with the recorded flags: {before} vs {measured}")
        entry: dict[str, Any] = {
            "policy": policy.summary(), "layer": int(policy.layers[0].layer), "collect_seconds": collect_s,
            "fit_seconds": fit_s, "bank_validation": measured.bank, "bank_tau": before,
            "bank_tau_validation": rates_at(val_gates, tau0), "calibrated": {},
        }  # fmt: skip
        for loss in ("positions", "answer"):
            new, cal = calibrate_gate(policy, model, tok, val_items, max_false_flag_rate=alpha, loss=loss,
                                      gates=val_gates)  # fmt: skip
            tau = int(new.layers[0].threshold)
            layer = cal.layers[0]
            entry["calibrated"][loss] = {"tau": tau, "feasible": layer.feasible, "validation": layer.row(),
                                         "test": rates_at(test_gates, tau)}  # fmt: skip
        tau_pos = entry["calibrated"]["positions"]["tau"]
        entry["answer_rules"] = answer_rule_figures(val_gates, test_gates, alpha, tau_pos)
        entry["records"] = {"validation": records(val_gates), "test": records(test_gates)}
        entry["seconds"] = time.time() - t0
        out["arms"][arm] = entry
        test_records[arm] = test_gates
        logger.info("%s done in %.0f s (collect %.0f s, fit %.0f s)", arm, entry["seconds"], collect_s, fit_s)
    if args.bootstrap and len(test_records) == 2:
        out["generation_minus_bank"] = paired_bootstrap(test_records["bank"], test_records["generation"],
                                                        args.bootstrap, cfg.seed)  # fmt: skip
    out["seconds"] = time.time() - started
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        logger.info("wrote %s", args.out)
    logger.info("\n%s", table(out))
    return 0


def table(out: dict[str, Any]) -> str:
    """The figures as Markdown tables (positions, then answer-level rules)."""
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [
        f"fold {out['fold']}: {out['train_questions']} training questions, {out['val_questions']} "
        f"validation, {out['test_questions']} test questions ({out['seconds']:.0f} s)\n",
        "| probes | layer | τ rule | τ | false-flag % (pos.) | catch % (pos.) | AUROC (pos.) "
        "| true ans. ≥1 edit % | false ans. ≥1 edit % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, e in out["arms"].items():
        for label, r in [("bank", e["bank_tau"])] + [(f"calibrated ({k})", c["test"])
                                                     for k, c in e["calibrated"].items()]:  # fmt: skip
            lines.append(f"| {arm} | {e['layer']} | {label} | {r['tau']} | {pct(r['false_flag_rate'])} | "
                         f"{pct(r['catch_rate'])} | {r['gate_auroc']:.3f} | "
                         f"{pct(r['true_answers_flagged'])} | "
                         f"{pct(r['false_answers_flagged'])} |")  # fmt: skip
    lines += ["", "| probes | answer rule | threshold | false-flag % (answers) | catch % (answers) "
              "| AUROC (answers) | true pos. edited % | false pos. edited % |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm, e in out["arms"].items():
        for rule, r in e["answer_rules"].items():
            t = r["test"]
            th = f"{r['threshold']:.2f}" + ("" if r["feasible"] else " (off)")
            lines.append(f"| {arm} | {rule} | {th} | {pct(t['false_flag_rate'])} | {pct(t['catch_rate'])} | "
                         f"{t['auroc']:.3f} | {pct(t.get('true_positions_edited'))} | "
                         f"{pct(t.get('false_positions_edited'))} |")  # fmt: skip
    if "generation_minus_bank" in out:
        lines += ["", "| AUROC, generation − bank | difference | 95 % paired bootstrap (test questions) |",
                  "|---|---|---|"]  # fmt: skip
        for name, d in out["generation_minus_bank"].items():
            lo, hi = d["ci95"]
            lines.append(f"| {name} | {d['auroc_difference']:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
