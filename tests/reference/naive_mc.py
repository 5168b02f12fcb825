"""Naive TruthfulQA MC scorer: one full forward per (question, answer), no cache, no batching.

The reference for :func:`otguard.evaluation.truthfulqa_mc.score_mc`: same prompt, same answer
tokens (:func:`answer_span` of the full string), same edited positions, nothing shared.
"""

from __future__ import annotations

from typing import Any

import torch

from otguard.evaluation.truthfulqa_mc import MCResult, answer_span, mc_answers
from otguard.prompts import qa_prompt


@torch.no_grad()
def score_answer(model: Any, tokenizer: Any, context: str, answer: str, handle: Any = None) -> float:
    """Sum of the log-probabilities of the answer's tokens in ``context + answer``."""
    ids, start = answer_span(tokenizer, context, answer)
    start = max(start, 1)  # the first token of a sequence has no prediction
    if start >= len(ids):
        return 0.0
    if handle is not None:
        handle.set_answer_start(start)
    x = torch.tensor([ids], device=model.get_input_embeddings().weight.device)
    logits = model(input_ids=x, use_cache=False).logits[0]
    total = 0.0
    for pos in range(start, len(ids)):  # the token at `pos` is predicted at `pos - 1`
        total += float(logits[pos - 1].double().log_softmax(-1)[ids[pos]])
    return total


def score_mc_naive(
    model: Any, tokenizer: Any, items: Any, *, policy: Any = None, instruction: bool = True
) -> MCResult:
    items = list(items)
    handle = policy.attach(model, scope="answer") if policy is not None else None
    try:
        results = []
        for item in items:
            context = qa_prompt(item.question, instruction=instruction)
            results.append(
                {a: score_answer(model, tokenizer, context, " " + a, handle) for a in mc_answers(item)}
            )
    finally:
        if handle is not None:
            handle.remove()
    return MCResult.from_scores(items, results, {"scorer": "naive"})
