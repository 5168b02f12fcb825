"""Toxicity elicitation: prompt sources, seeded nucleus sampling with shared prompt caches, perplexity.

Tiny random Llama / GPT-2 models in float64 with an offline-trained tokenizer; perplexity is checked
against one plain forward per (prompt + continuation).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from otguard.decoding import top_p_sample
from otguard.errors import DataError, DataFileNotFoundError
from otguard.evaluation.toxicity_gen import (
    continuation_perplexity,
    prompts_from_file,
    sample_continuations,
    toxigen_prompt_set,
)
from tests.tiny_models import tiny_lm
from tests.unit.test_truthfulqa_mc import always_on_policy, gpt2_style

torch.set_num_threads(1)

PROMPTS = [
    "- Paris is in France.\n- The sky is blue.\n-",
    "Q: What is 1 + 1?\nA:",
    "hello hello",
    "- naïve café\n-",
]


@pytest.fixture(scope="module")
def tok():
    return gpt2_style()


def _model(tok, kind: str = "llama", seed: int = 0):
    return tiny_lm(kind, len(tok), tok.pad_token_id, seed=seed).double()


# ------------------------------------------------------------------------------------------- top-p
def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64).expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    draws = top_p_sample(probs.log(), 0.7, gen)  # keeps {0, 1}: 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    counts = torch.bincount(draws, minlength=4).double() / len(draws)
    assert counts[2] == 0 and counts[3] == 0
    assert counts[0] == pytest.approx(0.5 / 0.8, abs=0.03)
    assert (top_p_sample(probs.log(), 0.1, gen) == 0).all()  # the top token alone
    full = top_p_sample(probs.log(), 1.0, gen)
    assert set(full.tolist()) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------------------- sampling
def test_sampling_is_seeded_shaped_and_bounded(tok) -> None:
    model = _model(tok)
    model.generation_config.eos_token_id = None
    a = sample_continuations(model, tok, PROMPTS, n=3, max_new_tokens=5, seed=7, batch_size=2)
    b = sample_continuations(model, tok, PROMPTS, n=3, max_new_tokens=5, seed=7, batch_size=2)
    c = sample_continuations(model, tok, PROMPTS, n=3, max_new_tokens=5, seed=8, batch_size=2)
    assert a.texts == b.texts and a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert len(a.texts) == len(PROMPTS) and all(len(t) == 3 for t in a.texts)
    assert all(len(ids) == 5 for per in a.token_ids for ids in per)
    assert a.prompt_ids[1] == tok(PROMPTS[1])["input_ids"]
    assert a.flag_rate is None
    # samples of one prompt differ (random model, high-entropy next-token distributions)
    assert any(len({tuple(s) for s in per}) > 1 for per in a.token_ids)


def test_sampling_matches_one_prompt_at_a_time_when_greedy_like(tok) -> None:
    """With top_p ~ 0 sampling is greedy: batching/left padding and the shared prompt cache then give
    exactly the continuations of unbatched generation."""
    model = _model(tok, "gpt2")
    model.generation_config.eos_token_id = None
    batched = sample_continuations(model, tok, PROMPTS, n=2, max_new_tokens=6, top_p=1e-9, batch_size=4)
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
        expected = out[0, ids.shape[1] :].tolist()
        assert batched.token_ids[i] == [expected, expected]


def test_sampling_with_a_policy_reports_its_flag_rate(tok) -> None:
    model = _model(tok)
    policy = always_on_policy(model)
    s = sample_continuations(model, tok, PROMPTS, policy=policy, n=2, max_new_tokens=4, seed=0, batch_size=3)
    plain = sample_continuations(model, tok, PROMPTS, n=2, max_new_tokens=4, seed=0, batch_size=3)
    assert s.flag_rate == pytest.approx(1.0)  # the always-on policy flags every position in scope
    assert s.stats["positions"] > 0
    assert s.token_ids != plain.token_ids
    assert all(m._forward_pre_hooks == {} for m in model.modules() if hasattr(m, "_forward_pre_hooks"))


# --------------------------------------------------------------------------------------- perplexity
@torch.no_grad()
def _naive_ppl(model, prompt_ids, cont) -> float:
    ids = torch.tensor([prompt_ids + cont])
    logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    P = len(prompt_ids)
    nll = [-float(logp[P - 1 + t, c]) for t, c in enumerate(cont)]
    return math.exp(sum(nll) / len(nll))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_perplexity_equals_one_forward_per_continuation(tok, kind) -> None:
    model = _model(tok, kind)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    rng = np.random.default_rng(0)
    conts = [
        [list(rng.integers(5, len(tok), size=int(rng.integers(1, 6)))) for _ in range(3)] for _ in PROMPTS
    ]
    conts[2][1] = []  # an empty continuation: NaN
    ppl = continuation_perplexity(model, prompt_ids, conts, pad_id=tok.pad_token_id, batch_size=3)
    assert ppl.shape == (len(PROMPTS), 3)
    for i, per in enumerate(conts):
        for j, cont in enumerate(per):
            if not cont:
                assert np.isnan(ppl[i, j])
            else:
                assert ppl[i, j] == pytest.approx(
                    _naive_ppl(model, prompt_ids[i], [int(c) for c in cont]), rel=1e-6
                )


def test_perplexity_input_checks(tok) -> None:
    model = _model(tok)
    with pytest.raises(ValueError, match="continuation lists"):
        continuation_perplexity(model, [[1, 2]], [])


# ------------------------------------------------------------------------------------------ prompts
def test_prompts_from_txt_and_jsonl(tmp_path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second prompt\n")
    assert [p.text for p in prompts_from_file(txt)] == ["first prompt", "  second prompt"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(
        json.dumps({"prompt": {"text": "RealToxicityPrompts style", "toxicity": 0.9}}) + "\n"
        + json.dumps({"prompt": "plain"}) + "\n" + json.dumps({"text": "langtest style"}) + "\n"
    )  # fmt: skip
    assert [p.text for p in prompts_from_file(jl)] == ["RealToxicityPrompts style", "plain", "langtest style"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"other": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        prompts_from_file(bad)
    with pytest.raises(DataFileNotFoundError, match="not found"):
        prompts_from_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no prompts"):
        prompts_from_file(empty)


def test_toxigen_prompt_set_skips_missing_neutral_files(data_dir) -> None:
    hate = toxigen_prompt_set(data_dir, ["trans", "women"], kind="hate", per_group=2)
    assert [p.group for p in hate] == ["trans", "trans", "women", "women"]
    assert all(p.kind == "hate" and p.text.rstrip().endswith("-") for p in hate)
    neutral = toxigen_prompt_set(data_dir, ["trans", "women"], kind="neutral", per_group=2)
    assert [p.group for p in neutral] == ["women", "women"]  # ToxiGen has no neutral_trans prompts
