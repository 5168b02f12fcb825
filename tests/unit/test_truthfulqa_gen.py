"""TruthfulQA generation: the row-dropping greedy decoder gives the answers of ``model.generate``.

Tiny random Llama and GPT-2 models in float64 (no near-ties), with trained offline tokenizers. To make
rows finish at different steps, a token that some rows produce early is declared the EOS, so the
decoder really drops rows from the batch and its KV cache mid-way.
"""

from __future__ import annotations

import pytest
import torch

from otguard.decoding import decode, finished
from otguard.evaluation.truthfulqa_gen import generate_answers
from otguard.generation import generate_texts
from otguard.prompts import postprocess_answer, qa_prompt
from otguard.sites import find_head_sites
from tests.tiny_models import tiny_lm
from tests.unit.test_truthfulqa_mc import always_on_policy, gpt2_style, llama2_style

torch.set_num_threads(1)

QUESTIONS = [
    "Where is Paris?",
    "What happens if you say hello?",
    "Is the sky blue?",
    "What is 1 + 1?",
    "Where were the 1992 Olympics held?",
    "Who was president of the United States in 1955?",
    "What is the square root of banana?",
]


def _model(kind: str, tok, seed: int = 0):
    return tiny_lm(kind, len(tok), tok.pad_token_id, seed=seed).double()


def _early_token(model, tok) -> int:
    """A token that some, but not all, rows write within their first few steps (greedy, no EOS)."""
    _, raw = generate_answers(model, tok, QUESTIONS, max_new_tokens=6, batch_size=8, progress=False,
                              evict=False)  # fmt: skip
    firsts = [tok(r, add_special_tokens=False)["input_ids"][:4] for r in raw]
    counts: dict[int, int] = {}
    for ids in firsts:
        for t in set(ids):
            counts[t] = counts.get(t, 0) + 1
    partial = [t for t, c in counts.items() if 0 < c < len(QUESTIONS)]
    assert partial, "the tiny model wrote the same tokens in every row; change the seed"
    return max(partial, key=lambda t: counts[t])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("with_policy", [False, True])
def test_row_dropping_decoder_equals_generate(kind: str, with_policy: bool) -> None:
    tok = llama2_style() if kind == "llama" else gpt2_style()
    model = _model(kind, tok)
    model.generation_config.eos_token_id = _early_token(model, tok)
    policy = always_on_policy(model) if with_policy else None
    for batch_size in (3, 8):
        kw = dict(policy=policy, max_new_tokens=12, batch_size=batch_size, progress=False)
        fast = generate_answers(model, tok, QUESTIONS, evict=True, **kw)
        ref = generate_answers(model, tok, QUESTIONS, evict=False, **kw)
        assert fast == ref
    # ... and both equal plain generation of each full prompt (no shared prefix cache at all)
    prompts = [qa_prompt(q) for q in QUESTIONS]
    uncached = generate_texts(model, tok, prompts, policy=policy, max_new_tokens=12, batch_size=8)
    assert fast[0] == [postprocess_answer(texts[0]) for texts in uncached]
    lengths = {len(tok(r, add_special_tokens=False)["input_ids"]) for r in fast[1]}
    assert len(lengths) > 1  # rows really finished at different steps
    if with_policy:  # the policy changes the answers, so the equality above covers the edit path
        plain = generate_answers(model, tok, QUESTIONS, max_new_tokens=12, batch_size=8, progress=False)
        assert plain[1] != fast[1]
    assert all(m._forward_pre_hooks == {} for m in find_head_sites(model).modules)


def test_decode_stops_rows_and_respects_the_limit() -> None:
    """One row ends at its first EOS (and leaves the batch), the other runs to the limit; both exactly
    as greedy ``model.generate`` without EOS, cut after the first EOS."""
    tok = gpt2_style()
    model = _model("gpt2", tok, seed=1)
    tok.padding_side = "left"
    enc = tok(["Q: Where is Paris?\nA:", "Q: What is 1 + 1?\nA:"], return_tensors="pt", padding=True)
    model.generation_config.eos_token_id = None
    full = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    free = full[:, enc["input_ids"].shape[1] :].tolist()
    # EOS: a token that row 1 writes first at step k >= 1 and row 0 never writes.
    k = next(i for i in range(1, 4) if free[1][i] not in free[1][:i] and free[1][i] not in free[0])
    eos = free[1][k]
    rows = decode(model, tok, enc["input_ids"], enc["attention_mask"], None, max_new_tokens=5,
                  stop_strings=(), eos_token_ids=[eos])  # fmt: skip
    assert rows == [free[0], free[1][: k + 1]]
    assert len(rows[0]) == 5 and rows[1][-1] == eos


def test_finished_detects_stop_strings_split_across_tokens() -> None:
    tok = gpt2_style()
    ids = tok("The answer.\n\nQ:", add_special_tokens=False)["input_ids"]
    assert finished(tok, ids, ("Q:",), set())
    assert "Q:" not in tok.decode(ids[:-1]) and not finished(tok, ids[:-1], ("Q:",), set())
    hello = tok("hello", add_special_tokens=False)["input_ids"]
    assert finished(tok, hello, (), {hello[-1]})
    assert not finished(tok, hello, (), set())


def test_decode_refuses_models_without_position_ids() -> None:
    class NoPositions(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=True):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match="position_ids"):
        decode(NoPositions(), None, torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2), max_new_tokens=1,
               eos_token_ids=[])  # fmt: skip
