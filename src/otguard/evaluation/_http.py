"""JSON POST requests with retries, shared by the two HTTP clients (LLM judge, Perspective scorer).

One retry policy (:class:`RetryPolicy`: exponential back-off with jitter, capped, or the server's
``Retry-After`` if longer) and one request helper (:func:`post_json_with_retries`). The clients only
turn the three ways a request can end badly into their own otguard errors with their own hints:

* :class:`HttpRejected` — a 4xx other than 429: not retried (bad key, bad request, unknown model);
* :class:`MalformedReply` — the server answered 2xx with something that is not a JSON object;
* :class:`RetriesExhausted` — HTTP 429/5xx, network errors or timeouts on every attempt.

Keys never reach a log line or a message: every server text and network error passes through the
client's ``redact``.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_RETRY_AFTER",
    "HttpFailure",
    "HttpRejected",
    "MalformedReply",
    "RetriesExhausted",
    "RetryPolicy",
    "RetryableError",
    "parse_retry_after",
    "post_json",
    "post_json_with_retries",
    "read_error_detail",
]

logger = logging.getLogger(__name__)

MAX_RETRY_AFTER = 600.0  # never sleep longer than this on a server's Retry-After
JITTER = 0.25  # each back-off is multiplied by a random factor in [1, 1 + JITTER)


class RetryableError(Exception):
    """A failure worth retrying (HTTP 429/5xx, a network error), with the server's Retry-After."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class HttpFailure(Exception):
    """A request that ended badly for good; the client turns it into its own otguard error."""


class HttpRejected(HttpFailure):
    """The server refused the request with a status that retrying will not change (4xx but 429)."""

    def __init__(self, status: int, detail: str, reason: str) -> None:
        super().__init__(f"HTTP {status}: {detail or reason}")
        self.status = status
        self.detail = detail
        self.reason = reason


class MalformedReply(HttpFailure):
    """A successful status with a body that is not a JSON object; ``str()`` says what was sent."""


class RetriesExhausted(HttpFailure):
    """Every attempt failed with a retryable error; ``last`` is the last one's reason."""

    def __init__(self, attempts: int, last: str) -> None:
        super().__init__(f"{attempts} attempts, last error: {last}")
        self.attempts = attempts
        self.last = last


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before trying a failed request again.

    The k-th retry (k = 0, 1, ...) waits ``min(max_backoff, backoff * 2**k * (1 + JITTER * u))``
    seconds with ``u`` uniform in [0, 1) (jitter spreads clients that failed together), or the
    server's ``Retry-After`` if that is longer (itself capped at :data:`MAX_RETRY_AFTER`).
    """

    max_retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(
                "need max_retries >= 0, backoff >= 0 and max_backoff >= 0; got "
                f"{self.max_retries}, {self.backoff} and {self.max_backoff}."
            )

    @property
    def attempts(self) -> int:
        """The first attempt plus the retries."""
        return self.max_retries + 1

    def delay(self, retry: int, u: float, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based), given the jitter draw ``u``."""
        wait = min(self.max_backoff, self.backoff * 2**retry * (1 + JITTER * u))
        return wait if retry_after is None else max(wait, retry_after)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP date), clamped to [0, MAX_RETRY_AFTER]."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def read_error_detail(exc: urllib.error.HTTPError, redact: Callable[[str], str]) -> str:
    """The first 2,000 bytes of an error reply, decoded and passed through ``redact``; closes ``exc``."""
    try:
        return redact(exc.read(2000).decode("utf-8", "replace").strip())
    except (OSError, http.client.HTTPException):
        return ""
    finally:
        exc.close()


def _no_redaction(text: str) -> str:
    return text


def post_json(
    url: str,
    payload: Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    redact: Callable[[str], str] = _no_redaction,
) -> dict[str, Any]:
    """One POST of ``payload`` as JSON; the reply's JSON object.

    Raises :class:`RetryableError` (429, 5xx, network errors, timeouts), :class:`HttpRejected`
    (other 4xx) or :class:`MalformedReply`.
    """
    body = json.dumps(payload).encode("utf-8")
    all_headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=body, headers=all_headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        detail = read_error_detail(exc, redact)
        if exc.code == 429 or exc.code >= 500:
            retry_after = parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            raise RetryableError(f"HTTP {exc.code}", retry_after) from None
        raise HttpRejected(exc.code, detail, redact(str(exc.reason))) from None
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, bad status lines
        reason = redact(str(getattr(exc, "reason", None) or exc))
        raise RetryableError(f"{type(exc).__name__}: {reason}") from None
    try:
        reply = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedReply(f"a reply that is not JSON ({exc})") from None
    if not isinstance(reply, dict):
        raise MalformedReply(f"a JSON {type(reply).__name__}, not an object")
    return reply


def post_json_with_retries(
    url: str,
    payload: Mapping[str, Any],
    *,
    policy: RetryPolicy,
    label: str,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    redact: Callable[[str], str] = _no_redaction,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    before_attempt: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """:func:`post_json`, retried on :class:`RetryableError` as ``policy`` says.

    ``label`` names the request in the warning logged before each retry (it must not hold a key);
    ``before_attempt`` runs before every attempt (a rate limiter). ``sleep`` and ``rng`` are
    injectable for tests. Raises :class:`RetriesExhausted` once ``policy.attempts`` attempts failed;
    :class:`HttpRejected` and :class:`MalformedReply` pass through at once.
    """
    rng = rng or random.Random()
    last = "no attempt"
    for attempt in range(policy.attempts):
        if before_attempt is not None:
            before_attempt()
        try:
            return post_json(url, payload, headers=headers, timeout=timeout, redact=redact)
        except RetryableError as exc:
            last = exc.reason
            if attempt == policy.max_retries:
                break
            delay = policy.delay(attempt, rng.random(), exc.retry_after)
            retry = f"{attempt + 1}/{policy.max_retries}"
            logger.warning("%s failed (%s); retry %s in %.1f s", label, exc.reason, retry, delay)
            sleep(delay)
    raise RetriesExhausted(policy.attempts, last)
