"""Request parsing for the OpenAI-compatible endpoints: JSON bodies in, checked settings out.

Every problem a client can cause becomes an :class:`APIError` carrying the HTTP status and the
OpenAI error shape (``{"error": {"message", "type", "param", "code"}}``), so stock clients raise
their usual exceptions (``BadRequestError``, ``NotFoundError``) and the server never falls over on
a bad body. Parsing is pure (no model, no tokenizer), which keeps it unit-testable on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MODES = ("repair", "monitor")
MAX_STOP_STRINGS = 4  # as the OpenAI API
# Fields a client may send that otguard accepts only at their neutral value.
_NEUTRAL: dict[str, Any] = {
    "n": 1,
    "best_of": 1,
    "echo": False,
    "logprobs": None,
    "top_logprobs": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "suffix": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "response_format": None,
}


class APIError(Exception):
    """An error answered to the client as JSON in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    """Per-request decoding settings (``temperature == 0`` means greedy)."""

    max_tokens: int | None  # None: as many as the context and the server's cap allow
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ParsedRequest:
    """A checked ``/v1/completions`` or ``/v1/chat/completions`` body."""

    model: str
    chat: bool
    prompt: str | list[int] | None  # completions: text or token ids
    messages: list[dict[str, Any]] | None  # chat: role/content dicts with text content
    sampling: Sampling
    stream: bool
    include_usage: bool  # stream_options.include_usage
    mode: str | None  # "repair" | "monitor" | None (the default for the chosen model)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(
    body: dict[str, Any], name: str, default: float, low: float, high: float, *, low_open: bool = False
) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"{name} must be a number; got {value!r}.", name)
    value = float(value)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise _bad(f"{name} must be in {bracket}{low:g}, {high:g}]; got {value:g}.", name)
    return value


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer; got {value!r}.", name)
    return value


def parse_stop(value: Any) -> tuple[str, ...]:
    """``stop``: a string, a list of up to 4 non-empty strings, or null."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad(f"stop must be a string or a list of strings; got {value!r}.", "stop")
    if len(value) > MAX_STOP_STRINGS:
        raise _bad(f"stop takes at most {MAX_STOP_STRINGS} strings; got {len(value)}.", "stop")
    if any(s == "" for s in value):
        raise _bad("stop strings must not be empty.", "stop")
    return tuple(dict.fromkeys(value))


def parse_sampling(body: dict[str, Any], *, chat: bool, default_max_tokens: int | None) -> Sampling:
    """The decoding fields shared by both endpoints (OpenAI defaults: temperature 1, top_p 1)."""
    name = "max_tokens"
    max_tokens = body.get("max_tokens")
    if max_tokens is None and chat:
        name, max_tokens = "max_completion_tokens", body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    else:
        max_tokens = _integer(max_tokens, name)
        if max_tokens <= 0:
            raise _bad(f"{name} must be at least 1; got {max_tokens}.", name)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(seed, "seed")
        if not -(2**63) <= seed < 2**64:
            raise _bad(f"seed must fit in 64 bits; got {seed}.", "seed")
        seed %= 2**64
    return Sampling(max_tokens, temperature, top_p, parse_stop(body.get("stop")), seed)


def _check_unsupported(body: dict[str, Any]) -> None:
    for key, neutral in _NEUTRAL.items():
        value = body.get(key)
        if value is None or value == neutral or (isinstance(value, list | dict) and not value):
            continue
        if key == "logprobs" and value is False:
            continue
        raise _bad(f"{key}={value!r} is not supported by otguard serve; leave it out.", key)


def _parse_options(body: dict[str, Any]) -> str | None:
    options = body.get("otguard")
    if options is None:
        return None
    if not isinstance(options, dict):
        raise _bad(f'otguard must be an object such as {{"mode": "monitor"}}; got {options!r}.', "otguard")
    unknown = sorted(set(options) - {"mode"})
    if unknown:
        raise _bad(f"Unknown otguard option(s) {', '.join(unknown)}; the one option is mode.", "otguard")
    mode = options.get("mode")
    if mode is not None and mode not in MODES:
        raise _bad(f"otguard.mode must be one of {', '.join(MODES)}; got {mode!r}.", "otguard.mode")
    return mode


def _parse_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _bad("messages must be a non-empty list of {role, content} objects.", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string role.", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text parts can be served by a text model
            texts = []
            for part in content:
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise _bad(f"messages[{i}].content: only text parts are supported.", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of text parts.", "messages")
        out.append({"role": message["role"], "content": content})
    return out


def _parse_prompt(value: Any) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]  # a batch of one prompt
    if isinstance(value, str):
        if not value:
            raise _bad("prompt must not be empty.", "prompt")
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        return list(value)
    if isinstance(value, list) and len(value) > 1:
        raise _bad(
            "Send one prompt per request (a list of prompts is not supported); concurrent requests "
            "are batched by the server.",
            "prompt",
        )
    raise _bad("prompt must be a non-empty string or a list of token ids.", "prompt")


def parse_request(body: Any, *, chat: bool, default_max_tokens: int | None = None) -> ParsedRequest:
    """Check a request body; raises :class:`APIError` (400) with the offending field named."""
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required (a name from GET /v1/models).", "model")
    _check_unsupported(body)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"stream must be true or false; got {stream!r}.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object.", "stream_options")
    include_usage = bool(options.get("include_usage", False))
    if chat:
        messages, prompt = _parse_messages(body.get("messages")), None
    else:
        if "prompt" not in body:
            raise _bad("prompt is required.", "prompt")
        messages, prompt = None, _parse_prompt(body["prompt"])
    sampling = parse_sampling(body, chat=chat, default_max_tokens=default_max_tokens)
    return ParsedRequest(
        model=model,
        chat=chat,
        prompt=prompt,
        messages=messages,
        sampling=sampling,
        stream=stream,
        include_usage=include_usage,
        mode=_parse_options(body),
    )


def split_model_name(name: str, served: str, policies: set[str] | frozenset[str]) -> str | None:
    """The policy name that ``name`` selects (None: the bare served model); 404 for any other name."""
    if name == served:
        return None
    prefix = served + "+"
    if name.startswith(prefix) and name[len(prefix) :] in policies:
        return name[len(prefix) :]
    known = [served] + [prefix + p for p in sorted(policies)]
    raise APIError(
        404,
        f"The model {name!r} does not exist; served here: {', '.join(known)}.",
        param="model",
        code="model_not_found",
    )
