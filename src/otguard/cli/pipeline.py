"""``otguard collect`` and ``otguard fit`` (with SLIM's Stage 3)."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from otguard.cli import runtime
from otguard.cli.args import (
    INF,
    add_common,
    add_data,
    add_force,
    float_in,
    int_at_least,
    positive_floats,
)
from otguard.errors import UsageError
from otguard.methods import METHOD_IDS

logger = logging.getLogger("otguard")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("collect", help="collect per-head activations of a labelled dataset (cached)")
    add_common(p)
    add_data(p)
    p.add_argument("--positions", default="last", choices=["last", "mean"])
    p.add_argument("--out", default=None, help="also save the activation folder here")
    add_force(p, "activation")

    p = sub.add_parser("fit", help="fit an intervention policy on one cross-validation fold")
    add_common(p)
    add_data(p)
    p.add_argument("--method", default="slim", choices=METHOD_IDS)
    p.add_argument("--fold", type=int_at_least(0), default=0, help="test fold, 0..--folds-1 (default 0)")
    p.add_argument("--folds", type=int_at_least(2), default=2)
    p.add_argument(
        "--val-ratio",
        type=float_in(0.0, 1.0, low_open=True, high_open=True),
        default=0.2,
        help="share of the training questions held out for validation, in (0, 1) (default 0.2)",
    )
    p.add_argument("--seed", type=int, default=0, help="probe initialisation seed (splits use --split-seed)")
    p.add_argument("--split-seed", type=int, default=42)
    p.add_argument("--epochs", type=int_at_least(1), default=None, help="probe training epochs")
    p.add_argument(
        "--fnr-weight", type=float_in(0.0, INF, high_open=True), default=None,
        help="bl: weight of FNR in the probe loss",
    )  # fmt: skip
    p.add_argument(
        "--margin", type=float_in(0.0, INF, high_open=True), default=None,
        help="RADIANT margin multiplier alpha",
    )  # fmt: skip
    p.add_argument(
        "--gamma", type=float_in(0.0, 0.5, low_open=True, high_open=True), default=None,
        help="SLIM chance-constraint tolerance gamma, in (0, 0.5)",
    )  # fmt: skip
    p.add_argument(
        "--kappa", type=float_in(0.0, INF, high_open=True), default=None, help="SLIM strength kappa"
    )
    p.add_argument("--top-k", type=int_at_least(1), default=None, help="ITI: number of heads")
    p.add_argument(
        "--strength", type=float_in(-INF, INF, low_open=True, high_open=True), default=None,
        help="ITI / mean shift strength",
    )  # fmt: skip
    p.add_argument(
        "--kappa-grid", type=positive_floats, default="5,10,20,40", help="SLIM Stage 3: kappa values to try"
    )
    p.add_argument(
        "--stage3-questions",
        type=int_at_least(0),
        default=24,
        help="SLIM Stage 3: validation questions used to choose kappa (0 = skip Stage 3)",
    )
    p.add_argument(
        "--stage3-max-new-tokens", type=int_at_least(1), default=50, help="SLIM Stage 3: answer length"
    )
    p.add_argument(
        "--embedder",
        default="minilm",
        help="sentence-transformers model for Stage 3 (default: the packaged all-MiniLM-L6-v2)",
    )
    p.add_argument("--out", required=True, help="policy folder to write")
    add_force(p, "policy")



def cmd_collect(args: argparse.Namespace) -> int:
    from otguard.io import prepare_output_dir

    out = prepare_output_dir(args.out, "activations", force=args.force) if args.out is not None else None
    runtime.check_model_args(args)
    dataset = runtime.load_data(args)
    model, tok = runtime.load(args)
    t0 = time.perf_counter()
    acts = runtime.collect(args, model, tok, dataset)
    logger.info(
        "Activations %s (%s) ready in %.1f s",
        tuple(acts.acts.shape),
        acts.acts.dtype,
        time.perf_counter() - t0,
    )
    if out is not None:
        acts.save(out)
        logger.info("Saved to %s", out)
    print(
        f"activations: {tuple(acts.acts.shape)}  undesirable: {int(acts.labels.sum())}/{len(acts)}  "
        f"cache key: {acts.meta.get('cache_key')}"
    )
    return 0


_METHOD_FLAGS = {
    "epochs": "epochs",
    "fnr_weight": "fnr_weight",
    "margin": "margin",
    "gamma": "gamma",
    "kappa": "kappa",
    "top_k": "top_k",
    "strength": "strength",
    "seed": "seed",
}


def _runs_stage3(args: argparse.Namespace) -> bool:
    return args.method == "slim" and args.kappa is None and args.stage3_questions > 0


def cmd_fit(args: argparse.Namespace) -> int:
    from otguard.data import group_kfold
    from otguard.io import prepare_output_dir
    from otguard.methods import get_method

    if args.fold >= args.folds:
        raise UsageError(
            f"--fold {args.fold} does not exist with --folds {args.folds}; use 0..{args.folds - 1}."
        )
    out = prepare_output_dir(args.out, "policy", force=args.force)
    method = get_method(args.method)
    valid = method.get_params()
    given = {flag: getattr(args, flag) for flag in _METHOD_FLAGS if getattr(args, flag) is not None}
    ignored = sorted(f"--{flag.replace('_', '-')}" for flag in given if _METHOD_FLAGS[flag] not in valid)
    if ignored and ignored != ["--seed"]:
        logger.warning("Not used by --method %s (ignored): %s", args.method, ", ".join(ignored))
    method.set_params(**{_METHOD_FLAGS[f]: v for f, v in given.items() if _METHOD_FLAGS[f] in valid})
    runtime.check_model_args(args)
    dataset = runtime.load_data(args)
    split = group_kfold(
        dataset, n_folds=args.folds, fold=args.fold, val_ratio=args.val_ratio, seed=args.split_seed
    )
    if args.method != "none":
        dataset.subset(split.train).check_two_classes("training split")
    stage3 = _prepare_stage3(args, dataset, split) if _runs_stage3(args) else None
    model, tok = runtime.load(args)
    acts = runtime.collect(args, model, tok, dataset)
    t0 = time.perf_counter()
    method.fit(acts, split.train, split.val)
    policy = method.policy_
    if stage3 is not None:
        policy = _stage3(args, policy, model, tok, *stage3)
    policy.meta.update(
        {
            "fold": args.fold,
            "folds": args.folds,
            "val_ratio": args.val_ratio,
            "split_seed": args.split_seed,
            "limit": args.limit,
            "fit_seconds": time.perf_counter() - t0,
        }
    )
    policy.save(out)
    print(policy.summary())
    print(f"saved to {out}")
    return 0


def _prepare_stage3(args: argparse.Namespace, dataset: Any, split: Any) -> tuple[Any, Any] | None:
    """SLIM Stage 3's validation questions and embedder, loaded before the model (errors come first)."""
    import numpy as np

    from otguard.data import truthfulqa_items
    from otguard.evaluation.semantic import SentenceEmbedder

    if args.dataset not in ("truthfulqa", "truthfulqa-mc2"):
        logger.warning(
            "Stage 3 needs desirable/undesirable reference answers; %s has none, so SLIM keeps its default "
            "kappa (pass --kappa to choose one).",
            args.dataset,
        )
        return None
    items = truthfulqa_items(args.data_dir)
    val_groups = np.unique(dataset.groups[split.val])[: args.stage3_questions]
    embedder = SentenceEmbedder(args.embedder)
    embedder.encode(["otguard"])  # loads it now: a wrong --embedder fails before the model loads
    return [items[g] for g in val_groups], embedder


def _stage3(
    args: argparse.Namespace, policy: Any, model: Any, tok: Any, questions: Any, embedder: Any
) -> Any:
    """Choose SLIM's kappa on validation questions (needs generation references: TruthfulQA)."""
    from otguard.methods.stage3 import select_kappa

    grid = list(args.kappa_grid)
    logger.info("SLIM Stage 3: choosing kappa from %s on %d validation questions", grid, len(questions))
    selection = select_kappa(
        policy,
        model,
        tok,
        questions,
        embedder,
        grid=grid,
        max_new_tokens=args.stage3_max_new_tokens,
    )
    policy = policy.with_kappa(selection.kappa)
    policy.params["kappa"] = selection.kappa
    policy.meta["stage3"] = selection.to_dict()
    logger.info("SLIM Stage 3 chose kappa=%g", selection.kappa)
    return policy
