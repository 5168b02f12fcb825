"""Request parsing of ``otguard serve``: each bad field is a 400 naming it, defaults are OpenAI's."""

from __future__ import annotations

import pytest

from otguard.serve.engine import Result
from otguard.serve.engine import _held_back as held_back
from otguard.serve.schemas import APIError, Sampling, parse_request, parse_stop, split_model_name

BASE = {"model": "m", "prompt": "hello"}


def bad(body, *, chat: bool = False) -> APIError:
    with pytest.raises(APIError) as info:
        parse_request(body, chat=chat, default_max_tokens=16)
    return info.value


def test_defaults_are_the_openai_ones() -> None:
    req = parse_request(BASE, chat=False, default_max_tokens=16)
    assert req.sampling == Sampling(max_tokens=16, temperature=1.0, top_p=1.0, stop=(), seed=None)
    assert (req.model, req.prompt, req.messages, req.stream, req.mode, req.chat) == (
        "m",
        "hello",
        None,
        False,
        None,
        False,
    )
    chat = parse_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, chat=True)
    assert chat.sampling.max_tokens is None  # the rest of the context, up to the server's cap
    assert chat.messages == [{"role": "user", "content": "hi"}]


def test_fields_are_read() -> None:
    body = {
        **BASE,
        "max_tokens": 7,
        "temperature": 0,
        "top_p": 0.5,
        "stop": ["a", "b", "a"],
        "seed": -1,
        "stream": True,
        "stream_options": {"include_usage": True},
        "otguard": {"mode": "monitor"},
        "n": 1,
        "presence_penalty": 0,
        "user": "someone",
    }
    req = parse_request(body, chat=False)
    assert req.sampling == Sampling(max_tokens=7, temperature=0.0, top_p=0.5, stop=("a", "b"), seed=2**64 - 1)
    assert req.sampling.greedy
    assert (req.stream, req.include_usage, req.mode) == (True, True, "monitor")
    assert parse_request({**BASE, "prompt": [5, 6]}, chat=False).prompt == [5, 6]
    assert parse_request({**BASE, "prompt": ["one"]}, chat=False).prompt == "one"
    parts = {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ],
    }
    assert parse_request(parts, chat=True).messages == [{"role": "user", "content": "ab"}]
    chat = parse_request({**parts, "max_completion_tokens": 3}, chat=True)
    assert chat.sampling.max_tokens == 3


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**BASE, "max_tokens": 0}, "max_tokens"),
        ({**BASE, "max_tokens": -3}, "max_tokens"),
        ({**BASE, "max_tokens": 2.5}, "max_tokens"),
        ({**BASE, "max_tokens": True}, "max_tokens"),
        ({**BASE, "temperature": 2.5}, "temperature"),
        ({**BASE, "temperature": -0.1}, "temperature"),
        ({**BASE, "temperature": "hot"}, "temperature"),
        ({**BASE, "top_p": 0}, "top_p"),
        ({**BASE, "top_p": 1.5}, "top_p"),
        ({**BASE, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**BASE, "stop": [""]}, "stop"),
        ({**BASE, "stop": 3}, "stop"),
        ({**BASE, "seed": "x"}, "seed"),
        ({**BASE, "n": 2}, "n"),
        ({**BASE, "logprobs": 3}, "logprobs"),
        ({**BASE, "stream": "yes"}, "stream"),
        ({**BASE, "otguard": {"mode": "fix"}}, "otguard.mode"),
        ({**BASE, "otguard": {"strength": 2}}, "otguard"),
        ({**BASE, "otguard": "monitor"}, "otguard"),
        ({"prompt": "x"}, "model"),
        ({"model": "m"}, "prompt"),
        ({**BASE, "prompt": ""}, "prompt"),
        ({**BASE, "prompt": ["a", "b"]}, "prompt"),
        ({**BASE, "prompt": [1, "a"]}, "prompt"),
    ],
)
def test_bad_fields_are_400_naming_the_field(body, param) -> None:
    err = bad(body)
    assert (err.status, err.param, err.type) == (400, param, "invalid_request_error")
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "messages",
    [
        None,
        [],
        "hi",
        [{"content": "x"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    ],
)
def test_bad_messages(messages) -> None:
    err = bad({"model": "m", "messages": messages}, chat=True)
    assert (err.status, err.param) == (400, "messages")


def test_body_must_be_an_object() -> None:
    assert bad([1, 2]).status == 400


def test_model_names_select_policies() -> None:
    policies = {"slim", "iti"}
    assert split_model_name("base", "base", policies) is None
    assert split_model_name("base+slim", "base", policies) == "slim"
    for name in ("base+", "base+radiant", "other", "slim", "base+slim+iti"):
        with pytest.raises(APIError) as info:
            split_model_name(name, "base", policies)
        assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found", "model")
        assert "base, base+iti, base+slim" in info.value.message


def test_stop_strings() -> None:
    assert parse_stop(None) == ()
    assert parse_stop("\n") == ("\n",)


@pytest.mark.parametrize(
    ("text", "stops", "want"),
    [
        ("hello wor", ["world"], 3),
        ("hello", ["world"], 0),
        ("abc", ["c!", "bc?"], 2),
        ("x", ["x"], 0),
        ("aaa", ["aab"], 2),
        ("", ["ab"], 0),
    ],
)
def test_held_back_is_the_longest_suffix_that_starts_a_stop_string(text, stops, want) -> None:
    assert held_back(text, stops) == want


def test_flag_summary_and_spans() -> None:
    text = "aa bb cc dd ee"
    result = Result(
        text=text,
        finish_reason="length",
        prompt_tokens=3,
        completion_tokens=5,
        flags=[False, True, True, False, True],
        token_ends=[2, 5, 8, 11, 14],
        batch_size=1,
        queued_s=0.0,
    )
    assert result.summary("slim", "monitor") == {
        "policy": "slim",
        "mode": "monitor",
        "flag_rate": 3 / 5,
        "flagged": True,
        "flagged_tokens": 3,
        "checked_tokens": 5,
        "spans": [
            {"start_token": 1, "end_token": 3, "start_char": 2, "end_char": 8, "text": " bb cc"},
            {"start_token": 4, "end_token": 5, "start_char": 11, "end_char": 14, "text": " ee"},
        ],
    }
    clean = Result(
        text="a",
        finish_reason="stop",
        prompt_tokens=1,
        completion_tokens=1,
        flags=[False],
        token_ends=[1],
        batch_size=1,
        queued_s=0.0,
    )
    assert clean.summary("slim", "repair")["flagged"] is False
    assert clean.summary("slim", "repair")["spans"] == []
    assert clean.summary(None, "off") == {"policy": None, "mode": "off"}
