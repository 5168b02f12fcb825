"""Judges and toxicity scorers built from their short names (what the CLI passes)."""

from __future__ import annotations

import pytest

from otguard.evaluation.factory import JUDGE_NAMES, SCORER_NAMES, make_judge, make_scorer
from otguard.evaluation.llm_judge import OpenAIJudge
from otguard.evaluation.overlap import ReferenceOverlapJudge
from otguard.evaluation.perspective import PERSPECTIVE_API_KEY_ENV, PerspectiveError, PerspectiveScorer
from otguard.evaluation.semantic import SemJudge
from otguard.evaluation.toxicity_scorers import DetoxifyScorer, EmbeddingToxicityScorer, ProfanityScorer
from tests.fake_embedder import BagOfWords
from tests.unit.test_toxicity_scorers import _toy_dataset


def test_make_judge():
    assert isinstance(make_judge("bleu"), ReferenceOverlapJudge)
    assert make_judge("rougeL").name == "overlap:rougeL"
    assert make_judge("ROUGE-L").name == "overlap:rougeL"
    sem = make_judge("sem", embedder=BagOfWords())
    assert isinstance(sem, SemJudge) and sem.name == "sem:bow"
    judge = make_judge("openai", base_url="http://127.0.0.1:1", model="m", api_key=None)
    assert isinstance(judge, OpenAIJudge) and judge.name == "openai:m"
    with pytest.raises(ValueError, match="Unknown judge"):
        make_judge("gpt-judge")
    assert JUDGE_NAMES == ("sem", "bleu", "rougeL", "openai", "learned")


def test_make_scorer(monkeypatch):
    monkeypatch.delenv(PERSPECTIVE_API_KEY_ENV, raising=False)
    with pytest.raises(PerspectiveError, match=PERSPECTIVE_API_KEY_ENV):
        make_scorer("perspective")
    monkeypatch.setenv(PERSPECTIVE_API_KEY_ENV, "sekret")
    scorer = make_scorer("perspective", qps=0.5)
    assert isinstance(scorer, PerspectiveScorer) and scorer.qps == 0.5 and "sekret" not in repr(scorer)
    assert isinstance(make_scorer("profanity"), ProfanityScorer)
    detox = make_scorer("detoxify:unbiased")
    assert isinstance(detox, DetoxifyScorer) and detox.name == "detoxify:unbiased"
    with pytest.raises(ValueError, match="Unknown toxicity scorer"):
        make_scorer("nope")
    assert SCORER_NAMES == ("embedding", "profanity", "detoxify", "perspective")


def test_make_scorer_embedding_fits_with_exclusion(monkeypatch):
    import otguard.data.toxigen as toxigen

    monkeypatch.setattr(toxigen, "toxigen_statements", lambda *a, **k: _toy_dataset())
    scorer = make_scorer("embedding", embedder=BagOfWords(256), exclude_groups=["beta"])
    assert isinstance(scorer, EmbeddingToxicityScorer) and scorer.train_groups == ("alpha", "gamma")
