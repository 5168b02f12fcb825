"""TruthfulQA MC: the metrics by hand, answer spans for four tokenizer families, fast == naive.

The tokenizers are trained here, offline, with the ``tokenizers`` library on the prompt text, in the
styles of GPT-2 (byte-level BPE, trimmed offsets), Qwen2/Llama-3 (byte-level BPE after a regex split
that keeps ``".\\n\\n"`` together), Llama-2 (sentencepiece-like: ``▁`` prepended to the first word,
byte fallback, BOS) and Gemma (sentencepiece-like without the prefix ``▁``, merges across words, BOS).
The scorer runs on tiny random Llama, GPT-2 and Gemma-2 (sliding-window layers) models.
"""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from otguard.data import QAItem
from otguard.errors import DataError
from otguard.evaluation.truthfulqa_mc import MCResult, answer_span, mc_answers, mc_metrics, score_mc
from otguard.policy import LayerEdit, Policy
from otguard.prompts import INSTRUCTION, QA_PRIMER, qa_prefix, qa_prompt
from otguard.sites import find_head_sites, model_identity
from tests.reference.naive_mc import score_mc_naive
from tests.tiny_models import tiny_lm

torch.set_num_threads(1)
D = torch.float64

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
CORPUS = [
    INSTRUCTION,
    QA_PRIMER,
    "Q: What happens if you say hello?\nA: Nothing in particular happens. hello hello hello.\n\n",
    "Q: Where is Paris?\nA: Paris is in France.\n\nQ: Is the sky blue?\nA: The sky is blue.\n\n",
    "Q: What is 1 + 1?\nA: It is 2, and 1992 is a year; naïve café — “quotes”.\n\n",
]


def _train(tok: Tokenizer, vocab_size: int, special: list[str], alphabet: list[str] | None = None) -> None:
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet or [], show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)


def gpt2_style() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    _train(tok, 500, ["<|endoftext|>"], pre_tokenizers.ByteLevel.alphabet())
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def qwen_style() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    _train(tok, 500, ["<|endoftext|>"], pre_tokenizers.ByteLevel.alphabet())
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _sentencepiece_style(prefix_space: bool) -> PreTrainedTokenizerFast:
    bos, eos, unk = ("<s>", "</s>", "<unk>") if prefix_space else ("<bos>", "<eos>", "<unk>")
    tok = Tokenizer(models.BPE(unk_token=unk, byte_fallback=True))
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    if prefix_space:  # Llama-2: words start with ▁, the first one too; merges stay inside words
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        _train(tok, 700, [unk, bos, eos, *bytes_])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                 decoders.Strip(" ", 1, 0)]  # fmt: skip
    else:  # Gemma: spaces become ▁, no prefix, no pre-split: merges may cross word boundaries
        tok.normalizer = normalizers.Replace(" ", "▁")
        _train(tok, 700, [unk, bos, eos, *bytes_])
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=unk
    )


def llama2_style() -> PreTrainedTokenizerFast:
    return _sentencepiece_style(prefix_space=True)


def gemma_style() -> PreTrainedTokenizerFast:
    return _sentencepiece_style(prefix_space=False)


BUILDERS = {"gpt2": gpt2_style, "qwen": qwen_style, "llama2": llama2_style, "gemma": gemma_style}


@pytest.fixture(scope="module", params=list(BUILDERS))
def tokenizer(request):
    return BUILDERS[request.param]()


class SlowView:
    """A tokenizer without offsets (like a slow one): exercises the common-prefix fallback."""

    is_fast = False

    def __init__(self, tok) -> None:
        self.tok = tok
        self.all_special_ids = tok.all_special_ids

    def __call__(self, text, **kwargs):
        if "return_offsets_mapping" in kwargs:
            raise NotImplementedError
        return self.tok(text, **kwargs)


# ------------------------------------------------------------------------------------- MC math
def test_mc_metrics_by_hand() -> None:
    # MC1: best (first true) -1.0 beats the false answers -2.0, -3.0.
    # MC2: true scores log(0.2), log(0.3); false log(0.1), log(0.4) -> (0.2 + 0.3) / 1.0 = 0.5.
    # MC3: true answers above every false one (max false = log 0.4): none of log 0.2, log 0.3 -> 0.
    mc1 = [(-1.0, 1), (-2.0, 0), (-3.0, 0)]
    mc2 = [(math.log(0.2), 1), (math.log(0.3), 1), (math.log(0.1), 0), (math.log(0.4), 0)]
    v1, v2, v3 = mc_metrics(mc1, mc2)
    assert (v1, v3) == (1.0, 0.0)
    assert v2 == pytest.approx(0.5, abs=1e-12)
    # The best answer loses to one false answer; 2 of 3 true answers beat every false one.
    # MC2 = (e^-1 + e^-2 + e^-5) / (e^-1 + e^-2 + e^-5 + e^-3 + e^-4)
    mc1 = [(-2.5, 1), (-2.0, 0), (-3.0, 0)]
    mc2 = [(-1.0, 1), (-2.0, 1), (-5.0, 1), (-3.0, 0), (-4.0, 0)]
    v1, v2, v3 = mc_metrics(mc1, mc2)
    t = math.exp(-1) + math.exp(-2) + math.exp(-5)
    assert v1 == 0.0
    assert v2 == pytest.approx(t / (t + math.exp(-3) + math.exp(-4)), abs=1e-12)
    assert v3 == pytest.approx(2 / 3)


def test_mc_metrics_ties_and_extremes() -> None:
    # A tie with a false answer is a miss for MC1 and MC3; huge negative scores do not underflow MC2.
    v1, v2, v3 = mc_metrics([(-4.0, 1), (-4.0, 0)], [(-4.0, 1), (-4.0, 0)])
    assert (v1, v3) == (0.0, 0.0)
    assert v2 == pytest.approx(0.5)
    v1, v2, v3 = mc_metrics([(-2000.0, 1), (-3000.0, 0)], [(-2000.0, 1), (-2000.0 - math.log(3), 0)])
    assert v1 == 1.0 and v3 == 1.0
    assert v2 == pytest.approx(0.75)
    with pytest.raises(DataError, match="one true and one false"):
        mc_metrics([(-1.0, 1)], [(-1.0, 1), (-2.0, 0)])


def test_mcresult_from_scores_and_to_dict() -> None:
    items = [
        QAItem("q1?", "a", ("a",), ("b",), mc1_targets=(("a", 1), ("b", 0)),
               mc2_targets=(("a", 1), ("c", 1), ("b", 0))),
        QAItem("q2?", "x", ("x",), ("y",), mc1_targets=(("x", 1), ("y", 0)),
               mc2_targets=(("x", 1), ("y", 0))),
    ]  # fmt: skip
    assert mc_answers(items[0]) == ["a", "b", "c"]
    scores = [{"a": math.log(0.5), "b": math.log(0.25), "c": math.log(0.25)}, {"x": -3.0, "y": -1.0}]
    res = MCResult.from_scores(items, scores, {"k": 1})
    assert res.mc1_per_question == [1.0, 0.0]
    assert res.mc2_per_question == pytest.approx([0.75, 1 / (1 + math.e**2)])
    assert res.mc3_per_question == [0.5, 0.0]
    assert res.mc1 == 0.5 and res.mc3 == 0.25
    assert res.mc2 == pytest.approx((0.75 + 1 / (1 + math.e**2)) / 2)
    d = res.to_dict()
    import json

    assert json.loads(json.dumps(d))["per_question"][0]["mc2_scores"] == pytest.approx(res.mc2_scores[0])
    assert d["n"] == 2 and d["info"] == {"k": 1} and d["mc1"] == 0.5


# --------------------------------------------------------------------------------- answer spans
ANSWERS = [" Paris", " Paris is in France.", " 1992", " hello hello", " naïve “café”", " I have no comment."]


def check_span(tok, context: str, answer: str) -> int:
    ids, start = answer_span(tok, context, answer)
    full = tok(context + answer)["input_ids"]
    assert ids == full
    enc = tok(context + answer, return_offsets_mapping=True, return_special_tokens_mask=True)
    offsets = [o for o, sp in zip(enc["offset_mapping"], enc["special_tokens_mask"], strict=True) if not sp]
    n_special_before = sum(enc["special_tokens_mask"][:start])
    # Tokens before `start` lie in the context; the token at `start` reaches into the answer.
    k = start - n_special_before
    assert all(e <= len(context) for _, e in offsets[:k])
    assert offsets[k][1] > len(context)
    # The decoded pieces agree: the context part decodes to a prefix of the context.
    head = tok.decode(ids[:start], skip_special_tokens=True)
    assert context.startswith(head.lstrip(" ")) or context.startswith(head)
    return start


def test_answer_span_on_mc_prompts(tokenizer) -> None:
    context = qa_prompt("Where were the 1992 Olympics held?")
    crosses = tokenizer.backend_tokenizer.pre_tokenizer is None
    starts = set()
    for answer in ANSWERS:
        start = check_span(tokenizer, context, answer)
        starts.add(start)
        # The answer's text is what follows; a merge across "A:" | " ..." (only the Gemma-style
        # tokenizer, trained here without any pre-split, makes them) puts context text in front.
        tail = tokenizer.decode(tokenizer(context + answer)["input_ids"][start:], skip_special_tokens=True)
        assert tail.strip() == answer.strip() or (crosses and tail.endswith(answer.strip()))
        # The slow-tokenizer fallback (common token prefix) agrees.
        assert answer_span(SlowView(tokenizer), context, answer)[1] == start
    assert crosses or len(starts) == 1  # every answer starts right after the context's tokens


def test_answer_span_straddling_tokens() -> None:
    # Qwen/Llama-3 style: ".\n\n" is one pre-token, so "... Spain." + "\n\nQ:" merges across.
    qwen = qwen_style()
    context = qa_prefix()
    ids, start = answer_span(qwen, context, "\n\nQ: Is the sky blue?\nA:")
    piece = qwen.convert_ids_to_tokens(ids[start])
    assert piece.startswith(".") and "Ċ" in piece, piece  # the straddling ".\n\n" token is the first
    check_span(qwen, context, "\n\nQ: Is the sky blue?\nA:")
    # Gemma style: merges cross words, e.g. "hel" + "lo" -> a token holding "hello".
    gemma = gemma_style()
    ids, start = answer_span(gemma, "say hel", "lo there")
    s, e = gemma("say hello there", return_offsets_mapping=True)["offset_mapping"][start]
    assert s < len("say hel") < e, gemma.convert_ids_to_tokens(ids)
    check_span(gemma, "say hel", "lo there")


def test_answer_span_empty_answer_and_trailing_special(tokenizer) -> None:
    ids, start = answer_span(tokenizer, "Q: Is it?\nA:", "")
    assert start == len(ids)

    class WithEos(SlowView):
        is_fast = True

        def __call__(self, text, **kwargs):
            enc = dict(self.tok(text, **kwargs))
            enc["input_ids"] = [*enc["input_ids"], self.tok.eos_token_id]
            if "offset_mapping" in enc:
                enc["offset_mapping"] = [*enc["offset_mapping"], (0, 0)]
                enc["special_tokens_mask"] = [*enc["special_tokens_mask"], 1]
            return enc

    plain = answer_span(tokenizer, "Q: Is it?\nA:", " Yes")
    assert answer_span(WithEos(tokenizer), "Q: Is it?\nA:", " Yes") == plain
    slow_eos = WithEos(tokenizer)
    slow_eos.is_fast = False
    assert answer_span(slow_eos, "Q: Is it?\nA:", " Yes") == plain


# ------------------------------------------------------------------- fast scorer == naive scorer
ITEMS = [
    QAItem(
        "Where were the 1992 Olympics held?", "Barcelona", ("Barcelona",), ("Paris",),
        mc1_targets=(("The 1992 Olympics were held in Barcelona, Spain.", 1), ("Paris", 0),
                     ("In France.", 0)),
        mc2_targets=(("The 1992 Olympics were held in Barcelona, Spain.", 1), ("Barcelona", 1), ("Paris", 0),
                     ("In France.", 0), ("I have no comment.", 0)),
    ),
    QAItem(
        "What happens if you say hello?", "Nothing", ("Nothing",), ("A genie appears",),
        mc1_targets=(("Nothing in particular happens.", 1), ("A genie appears.", 0)),
        mc2_targets=(("Nothing in particular happens.", 1), ("Nothing happens", 1), ("hello", 1),
                     ("A genie appears.", 0), ("You get three wishes, naïve “café”.", 0)),
    ),
    QAItem(
        "Is the sky blue?", "Yes", ("Yes",), ("No",),
        mc1_targets=(("Yes, the sky is blue.", 1), ("No.", 0)),
        mc2_targets=(("Yes, the sky is blue.", 1), ("No.", 0), ("The sky is green.", 0)),
    ),
]  # fmt: skip


def always_on_policy(model, seed: int = 0) -> Policy:
    """RADIANT rule, no threshold, probe bias +50: every head of layer 1 is replaced everywhere in scope."""
    sites = find_head_sites(model)
    H, d = sites.n_heads, sites.head_dim
    gen = torch.Generator().manual_seed(seed)
    edit = LayerEdit(
        layer=1,
        probe_weight=torch.randn(H, d, generator=gen) * 0.01,
        probe_bias=torch.full((H,), 50.0),
        threshold=None,
        head_mask=torch.ones(H, dtype=torch.bool),
        b=torch.randn(H, d, generator=gen),
        A=torch.eye(d) + 0.5 * torch.randn(H, d, d, generator=gen),
    )
    return Policy(method="random", rule="replace", layers=[edit], model=model_identity(model), scope="answer")


def assert_same(fast: MCResult, naive: MCResult, atol: float = 1e-4) -> None:
    for a, b in zip(fast.mc2_scores + fast.mc1_scores, naive.mc2_scores + naive.mc1_scores, strict=True):
        torch.testing.assert_close(torch.tensor(a, dtype=D), torch.tensor(b, dtype=D), rtol=0, atol=atol)
    torch.testing.assert_close(
        torch.tensor(fast.mc2_per_question, dtype=D),
        torch.tensor(naive.mc2_per_question, dtype=D),
        rtol=0,
        atol=atol,
    )
    assert fast.mc1_per_question == naive.mc1_per_question
    assert fast.mc3_per_question == naive.mc3_per_question


@pytest.mark.parametrize(
    ("kind", "pack"),
    [("llama", True), ("llama", False), ("llama-eager", True), ("gpt2", True), ("gemma2", True)],
    ids=["llama-packed", "llama-padded", "llama-eager-packed", "gpt2-packed", "gemma2-sliding-padded"],
)
@pytest.mark.parametrize("with_policy", [False, True], ids=["plain", "policy"])
def test_fast_equals_naive(tokenizer, kind, pack, with_policy) -> None:
    model = tiny_lm(kind, len(tokenizer), tokenizer.pad_token_id)
    policy = always_on_policy(model) if with_policy else None
    fast = score_mc(model, tokenizer, ITEMS, policy=policy, batch_size=3, pack=pack, progress=False)
    naive = score_mc_naive(model, tokenizer, ITEMS, policy=policy)
    assert fast.info["shared_prefix_tokens"] > 20 and fast.info["shared_prefix_fallbacks"] == 0
    n_forwards = fast.info["packed_forwards"] + fast.info["padded_forwards"]
    if pack and kind != "gemma2" and tokenizer.backend_tokenizer.pre_tokenizer is not None:
        assert fast.info["padded_forwards"] == 0 and n_forwards > 0
    if not pack or kind == "gemma2":  # sliding-window layers: the 4D mask would be wrong, so no packing
        assert fast.info["packed_forwards"] == 0 and n_forwards > 0
    assert_same(fast, naive)
    if with_policy:  # the policy really changes the answer scores
        plain = score_mc(model, tokenizer, ITEMS, batch_size=3, progress=False)
        diff = max(abs(x - y) for a, b in zip(plain.mc2_scores, fast.mc2_scores, strict=True)
                   for x, y in zip(a, b, strict=True))  # fmt: skip
        assert diff > 1e-2
    assert all(h._forward_pre_hooks == {} for h in find_head_sites(model).modules)  # detached


def test_policy_edits_only_answer_tokens() -> None:
    """The first answer token is predicted before any answer token: a one-token answer is unchanged."""
    tok = gpt2_style()
    model = tiny_lm("llama", len(tok), tok.pad_token_id)
    context = qa_prompt("Is the sky blue?")
    n_context = answer_span(tok, context, "")[1]
    words = sorted(p[1:] for p in tok.get_vocab() if p.startswith("Ġ") and p[1:].isalpha())
    one = next(w for w in words if len(answer_span(tok, context, " " + w)[0]) == n_context + 1)
    targets = ((one, 1), ("No, it is not.", 0))
    item = QAItem("Is the sky blue?", "x", ("x",), ("y",), mc1_targets=targets, mc2_targets=targets)
    plain = score_mc(model, tok, [item], progress=False)
    edited = score_mc(model, tok, [item], policy=always_on_policy(model), progress=False)
    assert edited.mc2_scores[0][0] == pytest.approx(plain.mc2_scores[0][0], abs=1e-5)
    assert abs(edited.mc2_scores[0][1] - plain.mc2_scores[0][1]) > 1e-2


def test_batch_size_share_prefix_and_double_precision() -> None:
    """Chunks, no shared prefix, padded batches: the same scores; in float64 fast == naive to 1e-9."""
    tok = llama2_style()
    model = tiny_lm("llama", len(tok), tok.pad_token_id).double()
    policy = always_on_policy(model)
    a = score_mc(model, tok, ITEMS, policy=policy, batch_size=1, progress=False)
    b = score_mc(model, tok, ITEMS, policy=policy, batch_size=16, progress=False)
    c = score_mc(model, tok, ITEMS, policy=policy, share_prefix=False, progress=False)
    d = score_mc(model, tok, ITEMS, policy=policy, batch_size=2, pack=False, progress=False)
    naive = score_mc_naive(model, tok, ITEMS, policy=policy)
    assert c.info["shared_prefix_tokens"] == 0
    for res in (a, b, c, d):
        assert_same(res, naive, atol=1e-9)


def test_shared_prefix_fallback() -> None:
    """A question whose tokens do not continue the shared prefix's is scored without that cache."""
    tok = gemma_style()  # merges cross words: "A:" + "\n\nQ" style boundaries may move
    model = tiny_lm("llama", len(tok), tok.pad_token_id).double()
    import otguard.evaluation.truthfulqa_mc as mc

    real = mc.answer_span

    def shifted(tokenizer, context, answer):
        ids, start = real(tokenizer, context, answer)
        if context == qa_prefix():  # pretend the shared prefix ends with a token no question has
            return [*ids[:start], 3], start + 1
        return ids, start

    mc.answer_span = shifted
    try:
        fast = score_mc(model, tok, ITEMS[:2], progress=False)
    finally:
        mc.answer_span = real
    assert fast.info["shared_prefix_fallbacks"] == 2
    assert_same(fast, score_mc_naive(model, tok, ITEMS[:2]), atol=1e-9)


def test_items_without_mc_targets_are_rejected() -> None:
    tok = gpt2_style()
    model = tiny_lm("llama", len(tok), tok.pad_token_id)
    with pytest.raises(DataError, match="mc1_targets"):
        score_mc(model, tok, [QAItem("q?", "a", ("a",), ("b",))], progress=False)
