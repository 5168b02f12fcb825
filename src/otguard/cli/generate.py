"""``otguard generate`` (text with or without a policy) and ``otguard evaluate`` (does it help?)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from otguard.cli import runtime
from otguard.cli.args import INF, add_common, float_in, int_at_least, non_empty
from otguard.errors import UsageError

logger = logging.getLogger("otguard")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text with or without a policy")
    add_common(p)
    p.add_argument("--policy", default="none",
                   help="policy folder or hf://org/name[@revision], or none for the plain model")  # fmt: skip
    p.add_argument(
        "--prompt", action="append", required=True, type=non_empty, help="prompt (repeat for several)"
    )
    p.add_argument("--qa", action="store_true", help="wrap each prompt in the TruthfulQA QA prompt")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=50)
    p.add_argument("--sample", action="store_true", help="nucleus sampling (top-p 0.9) instead of greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kappa", type=float_in(0.0, INF, high_open=True), default=None,
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
    add_common(p)
    p.add_argument("--policy", required=True, help="policy folder (from `otguard fit`) or hf://org/name")
    p.add_argument("--data-dir", default=None,
                   help="TruthfulQA folder (else $OTGUARD_DATA_DIR, else the HF Hub)")  # fmt: skip
    p.add_argument("--questions", type=int_at_least(1), default=100,
                   help="seeded sample of the policy's test-fold questions (default 100)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the question sample")
    p.add_argument("--judge", default="learned",
                   help="learned (trained on TruthfulQA's human labels; the default), sem or openai")
    p.add_argument("--batch-size", type=int_at_least(1), default=16)
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=50)
    p.add_argument("--examples", type=int_at_least(0), default=3, help="examples of each kind to print")
    p.add_argument("--no-gate", action="store_true", help="skip the point-of-use detector measurement")
    p.add_argument("--out", default=None, help="also write the figures and examples to this JSON file")


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
    runtime.check_model_args(args)
    model, tok = runtime.load(args)
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
    runtime.check_model_args(args)
    model, tok = runtime.load(args)
    report = evaluate_heldout(model, tok, policy, items, judge, policy_name=str(args.policy), fold=fold,
                              folds=folds, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              examples=args.examples, gate=not args.no_gate)  # fmt: skip
    print(report.render())
    if out is not None:
        atomic_write_text(out, json.dumps(report.to_dict(), indent=2, default=float) + "\n")
        print(f"\nwritten: {out}")
    return 0
