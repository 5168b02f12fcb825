"""Many policies in one MC pass (``score_mc_many``) == each policy scored alone (``score_mc``) == naive.

The question contexts are run once, with no policy, and shared by every policy's answer forwards;
several questions' contexts run as one packed forward. Checked on tiny random Llama and GPT-2 models
with a byte-level BPE tokenizer trained here, with three policies: none, an always-on shift of some
heads, and a gated RADIANT-like replace map whose probe votes are calibrated on the model's own
activations (so it flags some positions and not others).
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from otguard.data import QAItem
from otguard.evaluation.truthfulqa_mc import MCResult, score_mc, score_mc_many
from otguard.policy import LayerEdit, Policy
from otguard.prompts import INSTRUCTION, QA_PRIMER
from otguard.sites import find_head_sites, model_identity
from tests.reference.naive_mc import score_mc_naive
from tests.tiny_models import tiny_lm

torch.set_num_threads(1)
D = torch.float64


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE trained on the prompt text (offline, well under a second)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    corpus = [INSTRUCTION, QA_PRIMER]
    corpus += [f"Q: {it.question}\nA: {a}\n\n" for it in ITEMS for a, _ in it.mc2_targets]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(corpus * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _item(question: str, true: list[str], false: list[str]) -> QAItem:
    mc1 = ((true[0], 1), *((f, 0) for f in false))
    mc2 = (*((t, 1) for t in true), *((f, 0) for f in false))
    return QAItem(question, true[0], tuple(true), tuple(false), mc1_targets=mc1, mc2_targets=mc2)


# Questions of different token lengths; answers of different lengths (chunks of 3 answers per forward).
ITEMS = [
    _item("Where were the 1992 Olympics held?",
          ["The 1992 Olympics were held in Barcelona, Spain.", "Barcelona"],
          ["Paris", "In France.", "I have no comment."]),
    _item("What happens if you say hello?", ["Nothing in particular happens.", "Nothing happens"],
          ["A genie appears.", "You get three wishes."]),
    _item("Is the sky blue?", ["Yes, the sky is blue."], ["No.", "The sky is green."]),
    _item("What is 1 + 1?", ["It is 2.", "Two"], ["It is 3.", "Eleven", "It depends on who you ask."]),
    _item("Who wrote Hamlet, the play about a Danish prince?", ["Shakespeare wrote it."],
          ["Marlowe.", "Nobody knows who wrote Hamlet."]),
]  # fmt: skip


def _o_proj_inputs(model, layer: int, tok) -> torch.Tensor:
    """(N, H, d) inputs of the layer's output projection on the items' text (the edit site)."""
    sites = find_head_sites(model)
    grabbed = []
    handle = sites.modules[layer].register_forward_pre_hook(lambda m, a: grabbed.append(a[0].detach()))
    try:
        with torch.no_grad():
            for it in ITEMS:
                ids = tok(f"Q: {it.question}\nA: {it.mc2_targets[0][0]}")["input_ids"]
                model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return torch.cat([g[0] for g in grabbed]).unflatten(-1, (sites.n_heads, sites.head_dim)).double()


def shift_policy(model) -> Policy:
    """Mean-shift style: heads 0 and 2 of layer 0 shifted everywhere in scope."""
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    gen = torch.Generator().manual_seed(1)
    mask = torch.zeros(H, dtype=torch.bool)
    mask[[0, 2]] = True
    edit = LayerEdit(layer=0, probe_weight=torch.zeros(H, d), probe_bias=torch.zeros(H), threshold=None,
                     head_mask=mask, b=torch.randn(H, d, generator=gen))  # fmt: skip
    return Policy(method="shift", rule="shift", layers=[edit], model=model_identity(model), scope="answer")


def gated_policy(model, tok) -> Policy:
    """RADIANT-like: layer 1, probe logits ~N(0, 1) on the model's activations, flag at >= 2 of 4 votes."""
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    gen = torch.Generator().manual_seed(2)
    acts = _o_proj_inputs(model, 1, tok)
    u = torch.randn(H, d, generator=gen, dtype=D)
    proj = torch.einsum("nhd,hd->nh", acts, u)
    W, w0 = u / proj.std(0)[:, None], -proj.mean(0) / proj.std(0)
    edit = LayerEdit(layer=1, probe_weight=W.float(), probe_bias=w0.float(), threshold=2,
                     head_mask=torch.ones(H, dtype=torch.bool), b=torch.randn(H, d, generator=gen),
                     A=torch.eye(d) + 0.5 * torch.randn(H, d, d, generator=gen))  # fmt: skip
    return Policy(method="radiant-like", rule="replace", layers=[edit], model=model_identity(model),
                  scope="answer")


def assert_close(a: MCResult, b: MCResult, atol: float) -> None:
    for x, y in zip(a.mc2_scores + a.mc1_scores, b.mc2_scores + b.mc1_scores, strict=True):
        torch.testing.assert_close(torch.tensor(x, dtype=D), torch.tensor(y, dtype=D), rtol=0, atol=atol)
    for key in ("mc1_per_question", "mc2_per_question", "mc3_per_question"):
        x, y = torch.tensor(getattr(a, key), dtype=D), torch.tensor(getattr(b, key), dtype=D)
        torch.testing.assert_close(x, y, rtol=0, atol=atol)
    assert a.mc1_per_question == b.mc1_per_question and a.mc3_per_question == b.mc3_per_question


def max_score_diff(a: MCResult, b: MCResult) -> float:
    return max(abs(x - y) for sa, sb in zip(a.mc2_scores, b.mc2_scores, strict=True)
               for x, y in zip(sa, sb, strict=True))  # fmt: skip


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return bpe_tokenizer()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_many_equals_each_alone_and_naive(tok, kind) -> None:
    model = tiny_lm(kind, len(tok), tok.pad_token_id)
    policies = {"none": None, "shift": shift_policy(model), "gated": gated_policy(model, tok)}
    calls = []
    counter = model.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
    try:
        many = score_mc_many(model, tok, ITEMS, policies, batch_size=3, question_batch=2, progress=False)
    finally:
        counter.remove()
    assert list(many) == ["none", "shift", "gated"]
    # One pass: the shared prefix once, the contexts of each group of two questions once (packed; the
    # last group has one question, run alone), then each policy's answer forwards.
    answer_forwards = [r.info["packed_forwards"] + r.info["padded_forwards"] for r in many.values()]
    assert len(set(answer_forwards)) == 1 and answer_forwards[0] >= len(ITEMS)
    assert len(calls) == 1 + 3 + 3 * answer_forwards[0]
    for name, policy in policies.items():
        alone = score_mc(model, tok, ITEMS, policy=policy, batch_size=3, question_batch=1, progress=False)
        assert_close(many[name], alone, atol=1e-4)
        assert_close(many[name], score_mc_naive(model, tok, ITEMS, policy=policy), atol=1e-4)
        assert many[name].info["shared_prefix_fallbacks"] == 0
        assert many[name].info["shared_prefix_tokens"] > 20
        assert ("policy" in many[name].info) == (policy is not None)
    # Each policy's own edits reached its answers (and only its own).
    assert max_score_diff(many["shift"], many["none"]) > 1e-2
    assert max_score_diff(many["gated"], many["none"]) > 1e-2
    assert max_score_diff(many["gated"], many["shift"]) > 1e-2
    assert all(m._forward_pre_hooks == {} for m in find_head_sites(model).modules)  # all detached


def test_gated_policy_flags_some_positions_only(tok) -> None:
    """The gated test policy really gates: some answer positions flagged, others not."""
    model = tiny_lm("llama", len(tok), tok.pad_token_id)
    with gated_policy(model, tok).attach(model, scope="all") as handle, torch.no_grad():
        for it in ITEMS:
            model(input_ids=torch.tensor([tok(f"Q: {it.question}\nA: {it.mc2_targets[-1][0]}")["input_ids"]]))
        rate = handle.stats()["flag_rate"]
    assert 0.1 < rate < 0.9, rate


@pytest.mark.parametrize("question_batch", [1, 3, 16])
def test_question_batches_exact_in_float64(tok, question_batch) -> None:
    """Packed question contexts (any group size) give the naive scores to 1e-9 in float64."""
    model = tiny_lm("llama", len(tok), tok.pad_token_id).double()
    policies = {"gated": gated_policy(model, tok), "none": None}
    many = score_mc_many(model, tok, ITEMS, policies, batch_size=2, question_batch=question_batch,
                         progress=False)  # fmt: skip
    for name, policy in policies.items():
        assert_close(many[name], score_mc_naive(model, tok, ITEMS, policy=policy), atol=1e-9)


def test_padded_answers_and_no_shared_prefix(tok) -> None:
    """pack=False (right-padded answer batches, contexts one by one) and share_prefix=False agree too."""
    model = tiny_lm("llama", len(tok), tok.pad_token_id).double()
    policies = {"shift": shift_policy(model), "gated": gated_policy(model, tok)}
    padded = score_mc_many(model, tok, ITEMS, policies, batch_size=4, pack=False, progress=False)
    alone = score_mc_many(model, tok, ITEMS, policies, share_prefix=False, question_batch=4, progress=False)
    for name, policy in policies.items():
        assert padded[name].info["packed_forwards"] == 0 and padded[name].info["padded_forwards"] > 0
        assert alone[name].info["shared_prefix_tokens"] == 0
        naive = score_mc_naive(model, tok, ITEMS, policy=policy)
        assert_close(padded[name], naive, atol=1e-9)
        assert_close(alone[name], naive, atol=1e-9)


def test_arguments(tok) -> None:
    model = tiny_lm("llama", len(tok), tok.pad_token_id)
    assert score_mc_many(model, tok, ITEMS, {}, progress=False) == {}
    with pytest.raises(ValueError, match="question_batch"):
        score_mc_many(model, tok, ITEMS, {"none": None}, question_batch=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        score_mc_many(model, tok, ITEMS, {"none": None}, batch_size=0, progress=False)
