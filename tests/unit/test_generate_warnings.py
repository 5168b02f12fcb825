"""otguard's own calls use the current KV-cache argument: no "past_key_values is deprecated" notice.

transformers 5.2x renamed ``past_key_values`` to ``cache``; the old keyword still works but warns
(a ``FutureWarning`` for arguments of ``forward``/``generate``, a logged warning for the
``output.past_key_values`` attribute). Here both become errors while the decoding, MC, drift,
generation and toxicity paths run on tiny models, with and without a policy.
"""

from __future__ import annotations

import logging

import pytest
import torch

from otguard.decoding import decode
from otguard.evaluation.drift import measure_drift_many
from otguard.evaluation.toxicity_gen import continuation_perplexity, sample_continuations
from otguard.evaluation.truthfulqa_gen import generate_answers
from otguard.evaluation.truthfulqa_mc import score_mc
from otguard.generation import generate_texts
from tests.tiny_models import tiny_lm
from tests.unit.test_truthfulqa_mc import ITEMS, always_on_policy, gpt2_style

torch.set_num_threads(1)

QUESTIONS = ["Where is Paris?", "What is 1 + 1?", "Is the sky blue?"]


@pytest.fixture
def logged_deprecations_are_errors(monkeypatch):
    """transformers' logged once-only warnings that name ``past_key_values`` raise (the
    ``FutureWarning``s are errors by the ``filterwarnings`` mark of each test)."""
    original = logging.Logger.warning_once

    def warning_once(self, msg, *args, **kwargs):
        if "past_key_values" in str(msg):
            raise AssertionError(f"deprecated cache argument used: {msg}")
        return original(self, msg, *args, **kwargs)

    monkeypatch.setattr(logging.Logger, "warning_once", warning_once)


@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_no_deprecated_cache_argument_in_otguard_calls(kind: str, logged_deprecations_are_errors) -> None:
    tok = gpt2_style()
    model = tiny_lm(kind, len(tok), tok.pad_token_id)
    policy = always_on_policy(model)
    with torch.no_grad():
        for p in (None, policy):
            for evict in (True, False):
                generate_answers(model, tok, QUESTIONS, policy=p, max_new_tokens=4, batch_size=2,
                                 progress=False, evict=evict)  # fmt: skip
            generate_texts(model, tok, QUESTIONS, policy=p, max_new_tokens=4, batch_size=2)
            score_mc(model, tok, ITEMS[:2], policy=p, batch_size=4, progress=False)
            samples = sample_continuations(model, tok, QUESTIONS[:2], policy=p, n=2, max_new_tokens=3,
                                           batch_size=2)  # fmt: skip
        continuation_perplexity(model, samples.prompt_ids, samples.token_ids, pad_id=tok.pad_token_id)
        tok.padding_side = "right"
        docs = ["hello hello world", "Paris is in France."]
        measure_drift_many(model, tok, docs, {"p": policy, "none": None}, max_tokens=16)
        tok.padding_side = "left"
        enc = tok(["Q: Where is Paris?\nA:", "Q: What?\nA:"], return_tensors="pt", padding=True)
        decode(model, tok, enc["input_ids"], enc["attention_mask"], None, max_new_tokens=3, eos_token_ids=[])


@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")
def test_the_checks_catch_the_deprecated_name(logged_deprecations_are_errors) -> None:
    """Both checks are live: the old keyword and the old output attribute raise."""
    from transformers import DynamicCache

    tok = gpt2_style()
    model = tiny_lm("llama", len(tok), tok.pad_token_id)
    with torch.no_grad():
        with pytest.raises(FutureWarning, match="past_key_values"):
            model(input_ids=torch.tensor([[5, 6]]), past_key_values=DynamicCache(), use_cache=True)
        out = model(input_ids=torch.tensor([[5, 6]]), use_cache=True)
        with pytest.raises(AssertionError, match="past_key_values"):
            out.past_key_values  # noqa: B018
