"""Batched text generation with left padding (the only padding decoder-only generation supports).

Used by the CLI, by SLIM's Stage 3 and by the evaluation harness. A policy, when given, is attached
for the whole call with edit scope ``"generation"``; its handle resets per batch, so the prompt of
each batch is what the edit scope refers to.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from otguard.hook import attached

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    policy: Any = None,
    max_new_tokens: int = 50,
    batch_size: int = 8,
    do_sample: bool = False,
    top_p: float = 0.9,
    num_return_sequences: int = 1,
    seed: int = 0,
    kappa: float | None = None,
    progress: bool = False,
) -> list[list[str]]:
    """Generate continuations for ``prompts``; returns ``num_return_sequences`` texts per prompt.

    Prompts are sorted by length and batched; greedy by default (the TruthfulQA protocol), nucleus
    sampling with ``do_sample=True`` (seeded per batch, so results do not depend on earlier calls).
    """
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[str]] = [[] for _ in prompts]
    try:
        with attached(policy, model, scope="generation", kappa=kappa):
            for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
                idx = order[start : start + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
                if do_sample:
                    torch.manual_seed(seed + start)
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    top_p=top_p if do_sample else None,
                    top_k=0 if do_sample else None,
                    temperature=1.0 if do_sample else None,
                    num_return_sequences=num_return_sequences,
                    pad_token_id=tokenizer.pad_token_id,
                )
                new = out[:, enc["input_ids"].shape[1] :]
                texts = tokenizer.batch_decode(new, skip_special_tokens=True)
                for j, i in enumerate(idx):
                    results[i] = texts[j * num_return_sequences : (j + 1) * num_return_sequences]
    finally:
        tokenizer.padding_side = old_side
    return results
