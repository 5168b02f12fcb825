"""TruthfulQA-style generation: greedy answers with the shared prompt prefix computed once.

Every question's prompt is ``instruction + primer + "\\n\\nQ: {q}\\nA:"`` (method.md §5.1). The prefix
(instruction + primer, ~200 tokens) is identical for all questions, so its KV cache is computed once
per call and copied for each batch; only the question tokens and the answer are run per row. Rows
are left-padded *between* the prefix and the question; the attention mask hides the padding and
position ids follow the mask, so each row sees exactly its own prompt.

Decoding (:func:`otguard.decoding.decode`) drops finished rows from the batch and its KV cache: a
row is finished once it has written ``"Q:"`` (the model starting a new question, which
post-processing cuts anyway) or an end-of-sequence token. The answers equal ``model.generate``'s
(tested); models whose forward takes no ``position_ids`` use ``model.generate``.

A policy is attached with edit scope ``"generation"``: the prefix runs before the policy is
attached, and the first forward inside ``generate`` (the question tokens) sets the prompt length,
so the last prompt token and every generated token are edited, as in the papers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from otguard.decoding import accepts_argument, cache_kwarg, decode, fork_cache, output_cache
from otguard.hook import attached
from otguard.prompts import postprocess_answer, qa_prefix

logger = logging.getLogger(__name__)


def _split_prompt_ids(
    tokenizer: Any, prefix: str, suffixes: Sequence[str]
) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prefix and of each suffix, such that prefix + suffix == tokenize(prefix + suffix).

    Raises ``ValueError`` if the tokenizer merges across the boundary (then no prefix cache can be used).
    """
    prefix_ids = tokenizer(prefix)["input_ids"]
    out = []
    for s in suffixes:
        full = tokenizer(prefix + s)["input_ids"]
        if full[: len(prefix_ids)] != prefix_ids:
            raise ValueError("the tokenizer merges tokens across the prefix/question boundary")
        out.append(full[len(prefix_ids) :])
    return prefix_ids, out


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    *,
    policy: Any = None,
    kappa: float | None = None,
    max_new_tokens: int = 50,
    batch_size: int = 32,
    prefix: str | None = None,
    progress: bool = True,
    evict: bool | None = None,
) -> tuple[list[str], list[str]]:
    """Greedy answers to ``questions``; returns ``(answers, raw_completions)``.

    ``answers`` are post-processed (text before the next ``"Q:"``, stripped). ``evict`` picks the
    decoder: the row-dropping loop (:func:`otguard.decoding.decode`, default where the model takes
    ``position_ids``) or ``model.generate`` (``evict=False``); the answers are the same.
    """
    if evict is None:
        evict = accepts_argument(model, "position_ids")
    prefix = qa_prefix() if prefix is None else prefix
    suffixes = [f"\n\nQ: {q}\nA:" for q in questions]
    device = model.get_input_embeddings().weight.device
    try:
        prefix_ids, suffix_ids = _split_prompt_ids(tokenizer, prefix, suffixes)
    except ValueError:
        logger.warning("Tokenizer merges across the prompt prefix; generating without the prefix cache.")
        from otguard.generation import generate_texts

        texts = generate_texts(model, tokenizer, [prefix + s for s in suffixes], policy=policy,
                               kappa=kappa, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               progress=progress)  # fmt: skip
        whole = [t[0] for t in texts]
        return [postprocess_answer(r) for r in whole], whole

    P = len(prefix_ids)
    prefix_t = torch.tensor([prefix_ids], device=device)
    prefix_cache = output_cache(model(input_ids=prefix_t, use_cache=True))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(questions)), key=lambda i: -len(suffix_ids[i]))
    raw: list[str] = [""] * len(questions)
    with attached(policy, model, scope="generation", kappa=kappa) as handle:
        for start in tqdm(range(0, len(order), batch_size), desc="answers", disable=not progress):
            idx = order[start : start + batch_size]
            B = len(idx)
            Q = max(len(suffix_ids[i]) for i in idx)
            ids = torch.full((B, P + Q), pad, dtype=torch.long, device=device)
            mask = torch.zeros((B, P + Q), dtype=torch.long, device=device)
            ids[:, :P] = prefix_t
            mask[:, :P] = 1
            for row, i in enumerate(idx):
                n = len(suffix_ids[i])
                ids[row, P + Q - n :] = torch.tensor(suffix_ids[i], device=device)
                mask[row, P + Q - n :] = 1
            cache = fork_cache(prefix_cache, B)
            if evict:
                if handle is not None:
                    handle.reset()
                new_tokens: Any = decode(model, tokenizer, ids, mask, cache, max_new_tokens=max_new_tokens,
                                         stop_strings=("Q:",))  # fmt: skip
            else:
                new_tokens = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    **{cache_kwarg(model): cache},
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    top_p=None,
                    top_k=None,
                    temperature=None,
                    pad_token_id=pad,
                    stop_strings=["Q:"],
                    tokenizer=tokenizer,
                )[:, P + Q :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for row, i in enumerate(idx):
                raw[i] = texts[row]
    return [postprocess_answer(r) for r in raw], raw
