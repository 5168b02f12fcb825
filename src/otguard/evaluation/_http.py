"""What the two HTTP clients (the OpenAI-compatible judge, the Perspective scorer) share.

Only the pieces that are truly the same: the "try again" signal, ``Retry-After`` parsing, and
reading a server's error text without leaking the key. Each client keeps its own retry policy.
"""

from __future__ import annotations

import email.utils
import http.client
import math
import time
import urllib.error
from collections.abc import Callable

MAX_RETRY_AFTER = 600.0  # never sleep longer than this on a server's Retry-After


class RetryableError(Exception):
    """A failure worth retrying (HTTP 429/5xx, a network error), with the server's Retry-After."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


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
