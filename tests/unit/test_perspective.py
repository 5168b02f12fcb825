"""The Perspective API scorer against a local scripted server: request format, rate limit, retries
through the shared policy, key handling (nothing leaves the machine)."""

from __future__ import annotations

import random
import socket
from typing import Any

import numpy as np
import pytest

from otguard.evaluation.perspective import (
    PERSPECTIVE_API_KEY_ENV,
    PERSPECTIVE_ATTRIBUTES,
    PerspectiveError,
    PerspectiveScorer,
)
from tests.scripted_server import Reply, ScriptedServer, clear_proxies

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
    all_attrs = dict.fromkeys(PERSPECTIVE_ATTRIBUTES, 0.25)
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
    assert set(req["json"]["requestedAttributes"]) == set(PERSPECTIVE_ATTRIBUTES)
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


def test_perspective_needs_key_and_validates(monkeypatch):
    monkeypatch.delenv(PERSPECTIVE_API_KEY_ENV, raising=False)
    with pytest.raises(PerspectiveError, match=PERSPECTIVE_API_KEY_ENV):
        PerspectiveScorer.from_env()
    monkeypatch.setenv(PERSPECTIVE_API_KEY_ENV, KEY)
    scorer = PerspectiveScorer.from_env(qps=0.5)
    assert scorer.qps == 0.5 and KEY not in repr(scorer)
    with pytest.raises(ValueError, match="TOXICITY"):
        PerspectiveScorer(KEY, attributes=("INSULT",))
    with pytest.raises(ValueError, match="qps > 0"):
        PerspectiveScorer(KEY, qps=0)
    with pytest.raises(ValueError, match="max_retries >= 0"):
        PerspectiveScorer(KEY, max_retries=-1)


def test_perspective_malformed_replies(server):
    server.script = [(200, {}, [1]), (200, {}, {"no": "scores"})]
    with pytest.raises(PerspectiveError, match="JSON list, not an object"):
        _scorer(server.url, FakeTime()).score(["hello"])
    with pytest.raises(PerspectiveError, match="no attributeScores"):
        _scorer(server.url, FakeTime()).score(["hello"])
