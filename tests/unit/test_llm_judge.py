"""The OpenAI-compatible judge against a scripted HTTP server on 127.0.0.1 (ephemeral port) started by
the test; nothing leaves the machine."""

from __future__ import annotations

import math
import random
import socket
from typing import Any

import numpy as np
import pytest

from otguard.data import QAItem
from otguard.errors import OtguardError
from otguard.evaluation.llm_judge import OpenAIJudge
from otguard.evaluation.verdicts import JudgeError
from tests.scripted_server import Reply, ScriptedServer, clear_proxies


@pytest.fixture
def no_proxy(monkeypatch):
    clear_proxies(monkeypatch)


@pytest.fixture
def server(no_proxy):
    srv = ScriptedServer()
    yield srv
    srv.close()


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def yes_prob(prompt: str) -> float:
    """The fake judge's P(yes): high for answers mentioning Canberra, low otherwise."""
    return 0.9 if "Canberra" in prompt else 0.2


def completions_reply(body: dict[str, Any]) -> Reply:
    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
    choices = []
    for i, p in enumerate(prompts):
        py = yes_prob(p)
        top = {" yes": math.log(py), " no": math.log(1 - py)}
        choices.append(
            {"index": i, "text": " yes" if py >= 0.5 else " no", "logprobs": {"top_logprobs": [top]}}
        )
    choices.reverse()  # the client must order choices by "index"
    return 200, {}, {"object": "text_completion", "model": body["model"], "choices": choices}


def chat_reply(body: dict[str, Any]) -> Reply:
    py = yes_prob(body["messages"][-1]["content"])
    top = [{"token": "Yes", "logprob": math.log(py)}, {"token": "No", "logprob": math.log(1 - py)}]
    top.sort(key=lambda t: -t["logprob"])
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": top[0]["token"]},
        "logprobs": {
            "content": [{"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]
        },
    }
    return 200, {}, {"object": "chat.completion", "choices": [choice]}


CAPITAL = QAItem(
    "Which city is the capital of Australia?",
    "Canberra",
    ("Canberra",),
    ("Sydney",),
)
ANSWERS = ["Canberra.", "Sydney.", "It is Canberra."]


def make(server: ScriptedServer, **kwargs: Any) -> OpenAIJudge:
    kwargs.setdefault("sleep", Sleeps())
    kwargs.setdefault("rng", random.Random(0))
    return OpenAIJudge(server.url + "/v1", "truth-judge", "sk-test-SECRET", **kwargs)


def test_openai_completions_success(server):
    server.default = completions_reply
    judge = make(server, info_model="info-judge", batch_size=2)
    res = judge.judge([CAPITAL] * 3, ANSWERS)
    assert res.judge == "openai:truth-judge"
    np.testing.assert_allclose(res.truth_score, [0.9, 0.2, 0.9])
    assert res.truthful.tolist() == [True, False, True]
    assert res.informative.tolist() == [True, False, True]
    # 3 prompts in batches of 2 -> 2 requests for truth, 2 for info.
    assert len(server.requests) == 4
    first = server.requests[0]
    assert first["path"] == "/v1/completions"
    assert first["headers"]["Authorization"] == "Bearer sk-test-SECRET"
    assert first["json"] == {
        "model": "truth-judge",
        "prompt": [
            "Q: Which city is the capital of Australia?\nA: Canberra.\nTrue:",
            "Q: Which city is the capital of Australia?\nA: Sydney.\nTrue:",
        ],
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": 2,
    }
    info = server.requests[2]["json"]
    assert info["model"] == "info-judge"
    assert info["prompt"][0].endswith("\nA: Canberra.\nHelpful:")
    s = res.summary()
    assert s["true_x_info_product"] == pytest.approx(4 / 9)
    assert s["true_x_info_joint"] == pytest.approx(2 / 3)


def test_openai_completions_without_key_concurrency_and_no_info(server):
    server.default = completions_reply
    judge = OpenAIJudge(server.url, "truth-judge", None, judge_info=False, batch_size=1, concurrency=3)
    res = judge.judge([CAPITAL] * 3, ANSWERS)
    assert res.truthful.tolist() == [True, False, True]  # order kept despite concurrency
    assert res.informative is None
    assert len(server.requests) == 3
    assert all(r["path"] == "/v1/completions" for r in server.requests)
    assert all("Authorization" not in r["headers"] for r in server.requests)
    assert judge.judge([], []).summary()["n"] == 0
    assert len(server.requests) == 3  # no request for no answers


def test_openai_completions_text_fallback_and_missing_yes(server):
    def reply(body):
        return (
            200,
            {},
            {
                "choices": [
                    {"index": 0, "text": " yes"},  # no log-probs -> read the text
                    {
                        "index": 1,
                        "text": " no",
                        "logprobs": {"top_logprobs": [{" no": -0.1, " maybe": -2.0}]},
                    },
                ]
            },
        )

    server.script.append(reply)
    judge = make(server, judge_info=False)
    res = judge.judge([CAPITAL, CAPITAL], ["Canberra", "Sydney"])
    np.testing.assert_allclose(res.truth_score, [1.0, 0.0])


def test_openai_chat_success(server):
    server.default = chat_reply
    judge = make(server, endpoint="chat")
    res = judge.judge([CAPITAL] * 3, ANSWERS)
    np.testing.assert_allclose(res.truth_score, [0.9, 0.2, 0.9])
    assert res.informative.tolist() == [True, False, True]
    assert len(server.requests) == 6  # one per answer and question kind
    body = server.requests[0]["json"]
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert body["logprobs"] is True and body["top_logprobs"] == 2 and body["max_tokens"] == 1
    assert body["temperature"] == 0
    assert body["messages"][0]["role"] == "system"
    assert body["messages"][-1] == {
        "role": "user",
        "content": "Q: Which city is the capital of Australia?\nA: Canberra.\nTrue:",
    }
    assert server.requests[3]["json"]["messages"][-1]["content"].endswith("\nHelpful:")


def test_openai_chat_text_fallback(server):
    for text in ["Yes.", "no", "Perhaps"]:
        server.script.append((200, {}, {"choices": [{"index": 0, "message": {"content": text}}]}))
    judge = make(server, endpoint="chat", judge_info=False)
    with pytest.warns(RuntimeWarning, match="1 of 3 truth replies"):
        res = judge.judge([CAPITAL] * 3, ANSWERS)
    assert res.truth_score[:2].tolist() == [1.0, 0.0] and math.isnan(res.truth_score[2])
    assert res.truthful.tolist() == [True, False, False]


def test_openai_retries_429_honouring_retry_after(server):
    server.script.append((429, {"Retry-After": "7"}, {"error": {"message": "rate limited"}}))
    server.default = completions_reply
    sleeps = Sleeps()
    judge = make(server, judge_info=False, sleep=sleeps, backoff=0.01)
    res = judge.judge([CAPITAL], ["Canberra"])
    assert res.truthful.tolist() == [True]
    assert len(server.requests) == 2
    assert sleeps == [7.0]


def test_openai_retries_503_with_exponential_backoff(server):
    server.script += [(503, {}, {"error": "busy"}), (503, {}, b"not json")]
    server.default = completions_reply
    sleeps = Sleeps()
    judge = make(server, judge_info=False, sleep=sleeps, backoff=0.5, max_backoff=30)
    res = judge.judge([CAPITAL], ["Sydney"])
    assert res.truthful.tolist() == [False]
    assert len(server.requests) == 3
    assert len(sleeps) == 2
    assert 0.5 <= sleeps[0] <= 0.625 and 1.0 <= sleeps[1] <= 1.25  # backoff * 2**k * (1 + jitter/4)
    assert sleeps[0] < sleeps[1]


def test_openai_auth_failure_is_not_retried(server):
    server.script.append((401, {}, {"error": {"message": "Incorrect API key provided: sk-test-SECRET"}}))
    sleeps = Sleeps()
    judge = make(server, sleep=sleeps)
    with pytest.raises(JudgeError, match="authentication failed") as info:
        judge.judge([CAPITAL], ["Canberra"])
    assert "OTGUARD_JUDGE_API_KEY" in str(info.value) and "OPENAI_API_KEY" in str(info.value)
    assert "SECRET" not in str(info.value)
    assert isinstance(info.value, OtguardError) and isinstance(info.value, RuntimeError)
    assert len(server.requests) == 1
    assert sleeps == []


def test_openai_other_client_error_shows_server_message(server):
    server.script.append((404, {}, {"error": {"message": "model 'truth-judge' does not exist"}}))
    sleeps = Sleeps()
    with pytest.raises(JudgeError, match="HTTP 404.*does not exist"):
        make(server, sleep=sleeps).judge([CAPITAL], ["Canberra"])
    assert len(server.requests) == 1 and sleeps == []


def test_openai_malformed_reply(server):
    server.script.append((200, {}, {"choices": []}))
    with pytest.raises(JudgeError, match="expected 1 choices, got 0"):
        make(server).judge([CAPITAL], ["Canberra"])
    server.script.append((200, {}, b"<html>oops</html>"))
    with pytest.raises(JudgeError, match="not JSON"):
        make(server).judge([CAPITAL], ["Canberra"])
    server.script.append((200, {}, [1, 2]))
    with pytest.raises(JudgeError, match=r"answered .*/v1/completions with a JSON list, not an object"):
        make(server).judge([CAPITAL], ["Canberra"])


def test_openai_network_failure_after_retries(no_proxy, caplog):
    with socket.socket() as sock:  # find a loopback port with nothing listening on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    sleeps = Sleeps()
    judge = OpenAIJudge(
        base, "m", "sk-test-SECRET", max_retries=4, backoff=1.0, max_backoff=3.0, sleep=sleeps, timeout=2
    )
    with caplog.at_level("WARNING", logger="otguard.evaluation"), pytest.raises(JudgeError) as info:
        judge.judge([CAPITAL], ["Canberra"])
    msg = str(info.value)
    assert base in msg and "after 5 attempts" in msg
    assert len(sleeps) == 4
    assert sleeps[:2] == sorted(sleeps[:2]) and sleeps[0] >= 1.0 and sleeps[1] >= 2.0
    assert sleeps[2:] == [3.0, 3.0]  # capped at max_backoff
    assert "SECRET" not in caplog.text and "SECRET" not in repr(judge)
    assert len(caplog.records) == 4


def test_openai_from_env(monkeypatch):
    for var in ("OTGUARD_JUDGE_BASE_URL", "OTGUARD_JUDGE_MODEL", "OTGUARD_JUDGE_INFO_MODEL",
                "OTGUARD_JUDGE_ENDPOINT", "OTGUARD_JUDGE_API_KEY", "OPENAI_API_KEY"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(JudgeError, match="OTGUARD_JUDGE_MODEL"):
        OpenAIJudge.from_env()
    monkeypatch.setenv("OTGUARD_JUDGE_MODEL", "truth")
    monkeypatch.setenv("OTGUARD_JUDGE_INFO_MODEL", "info")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    judge = OpenAIJudge.from_env()
    assert judge.base_url == "https://api.openai.com/v1"
    assert (judge.model, judge.info_model, judge.endpoint) == ("truth", "info", "completions")
    assert judge._url("completions") == "https://api.openai.com/v1/completions"
    assert "sk-openai" not in repr(judge) and "api_key=<set>" in repr(judge)
    monkeypatch.setenv("OTGUARD_JUDGE_BASE_URL", "http://127.0.0.1:8000/")
    monkeypatch.setenv("OTGUARD_JUDGE_ENDPOINT", "chat")
    judge = OpenAIJudge.from_env(model="flag-model")  # flags win over the environment
    assert judge.model == "flag-model" and judge.endpoint == "chat"
    assert judge._url("chat/completions") == "http://127.0.0.1:8000/v1/chat/completions"
    with pytest.raises(JudgeError, match="http"):
        OpenAIJudge("127.0.0.1:8000", "m", None)
    with pytest.raises(ValueError, match="endpoint"):
        OpenAIJudge("http://127.0.0.1", "m", None, endpoint="responses")  # type: ignore[arg-type]
