"""The shared retry policy and JSON POST helper of the two HTTP clients, against a local scripted server."""

from __future__ import annotations

import logging
import random
import time
from email.utils import formatdate

import pytest

from otguard.evaluation._http import (
    MAX_RETRY_AFTER,
    HttpRejected,
    MalformedReply,
    RetriesExhausted,
    RetryPolicy,
    parse_retry_after,
    post_json,
    post_json_with_retries,
)
from tests.scripted_server import ScriptedServer, clear_proxies


@pytest.fixture
def server(monkeypatch):
    clear_proxies(monkeypatch)
    srv = ScriptedServer(max_requests=20)
    yield srv
    srv.close()


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_retry_policy_delays():
    policy = RetryPolicy(max_retries=3, backoff=0.5, max_backoff=3.0)
    assert policy.attempts == 4
    assert policy.delay(0, 0.0) == 0.5
    assert policy.delay(1, 0.5) == pytest.approx(0.5 * 2 * 1.125)
    assert policy.delay(2, 0.999) == pytest.approx(0.5 * 4 * 1.24975)
    assert policy.delay(3, 0.0) == 3.0  # 0.5 * 8 = 4, capped at max_backoff
    assert policy.delay(0, 0.0, retry_after=7.0) == 7.0  # a longer Retry-After wins
    assert policy.delay(3, 0.0, retry_after=1.0) == 3.0
    with pytest.raises(ValueError, match="max_retries >= 0"):
        RetryPolicy(max_retries=-1)


def test_retry_after_header_parsing():
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("99999") == MAX_RETRY_AFTER
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    in_a_minute = parse_retry_after(formatdate(time.time() + 60, usegmt=True))
    assert 55 <= in_a_minute <= 61


def test_post_json_sends_json_and_headers(server):
    server.script = [(200, {}, {"ok": True})]
    assert post_json(server.url + "/x", {"a": [1, 2]}, headers={"Authorization": "Bearer k"}) == {"ok": True}
    req = server.requests[0]
    assert req["path"] == "/x" and req["json"] == {"a": [1, 2]}
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["headers"]["Authorization"] == "Bearer k"


def test_retries_then_success_with_before_attempt_and_log(server, caplog):
    server.script = [(503, {}, {}), (429, {"Retry-After": "4"}, {}), (200, {}, {"v": 1})]
    sleeps, calls = Sleeps(), []
    with caplog.at_level(logging.WARNING, logger="otguard.evaluation._http"):
        reply = post_json_with_retries(
            server.url, {}, policy=RetryPolicy(5, 1.0, 30.0), label="test request", sleep=sleeps,
            rng=random.Random(0), before_attempt=lambda: calls.append(1),
        )  # fmt: skip
    assert reply == {"v": 1} and len(server.requests) == 3 and len(calls) == 3
    u = random.Random(0)
    assert sleeps == [pytest.approx(1.0 * (1 + 0.25 * u.random())), 4.0]  # back-off, then Retry-After
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"test request failed (HTTP 503); retry 1/5 in {sleeps[0]:.1f} s"
    assert messages[1] == "test request failed (HTTP 429); retry 2/5 in 4.0 s"


def test_rejected_and_malformed_are_not_retried(server):
    server.script = [(404, {}, {"error": "no such model SECRET"})]
    sleeps = Sleeps()
    with pytest.raises(HttpRejected) as info:
        post_json_with_retries(server.url, {}, policy=RetryPolicy(), label="r", sleep=sleeps,
                               redact=lambda t: t.replace("SECRET", "***"))  # fmt: skip
    assert info.value.status == 404 and "***" in info.value.detail and "SECRET" not in info.value.detail
    server.script = [(200, {}, b"not json")]
    with pytest.raises(MalformedReply, match="not JSON"):
        post_json_with_retries(server.url, {}, policy=RetryPolicy(), label="r", sleep=sleeps)
    assert len(server.requests) == 2 and sleeps == []


def test_exhausted_retries_report_attempts_and_last_error(server):
    server.script = [(500, {}, {}), (502, {}, {}), (503, {}, {})]
    sleeps = Sleeps()
    with pytest.raises(RetriesExhausted) as info:
        post_json_with_retries(server.url, {}, policy=RetryPolicy(2, 0.1, 1.0), label="r", sleep=sleeps)
    assert info.value.attempts == 3 and info.value.last == "HTTP 503"
    assert len(server.requests) == 3 and len(sleeps) == 2  # no sleep after the last attempt
