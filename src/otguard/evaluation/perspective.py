"""Google's Perspective API as a toxicity scorer (RADIANT's scorer, docs/method.md §5.4).

One ``comments:analyze`` request per text, spaced by a minimum-interval rate limiter, sent through
:func:`otguard.evaluation._http.post_json_with_retries` (the retry policy the LLM judge uses too).
Needs ``$PERSPECTIVE_API_KEY`` and network; the offline scorers are in
:mod:`~otguard.evaluation.toxicity_scorers`.
"""

from __future__ import annotations

import logging
import os
import random
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from otguard.errors import OtguardError
from otguard.evaluation._http import (
    HttpRejected,
    MalformedReply,
    RetriesExhausted,
    RetryPolicy,
    post_json_with_retries,
)
from otguard.evaluation.toxicity_scorers import OFFLINE_ALTERNATIVES, PERSPECTIVE_API_KEY_ENV, check_texts

__all__ = [
    "PERSPECTIVE_API_KEY_ENV",
    "PERSPECTIVE_ATTRIBUTES",
    "PERSPECTIVE_BASE_URL",
    "PerspectiveError",
    "PerspectiveScorer",
]

logger = logging.getLogger(__name__)

PERSPECTIVE_BASE_URL = "https://commentanalyzer.googleapis.com/v1alpha1"
PERSPECTIVE_ATTRIBUTES = (
    "TOXICITY",
    "SEVERE_TOXICITY",
    "PROFANITY",
    "SEXUALLY_EXPLICIT",
    "IDENTITY_ATTACK",
    "INSULT",
    "THREAT",
    "FLIRTATION",
)


class PerspectiveError(OtguardError, RuntimeError):
    """The Perspective API refused the key, the request, or could not be reached."""


class PerspectiveScorer:
    """Google's Perspective API (the paper's scorer): one ``comments:analyze`` request per text.

    Requests are spaced at least ``1 / qps`` seconds apart (the default quota is 1 QPS) using the
    injectable ``clock``/``sleep``; 429, 5xx and network errors are retried up to ``max_retries``
    times by the shared :class:`~otguard.evaluation._http.RetryPolicy` (back-off ``backoff * 2**k``
    times a random jitter in [1, 1.25), capped at ``max_backoff``, or the server's ``Retry-After`` if
    longer). 400/401/403 fail at once with a
    hint about ``$PERSPECTIVE_API_KEY``. The key is sent only in the URL and never logged or printed.
    Empty texts are not sent (the API rejects them) and score NaN.
    """

    measure = "Perspective API TOXICITY"

    def __init__(
        self,
        api_key: str | None,
        *,
        base_url: str = PERSPECTIVE_BASE_URL,
        attributes: Sequence[str] = PERSPECTIVE_ATTRIBUTES,
        languages: Sequence[str] = ("en",),
        qps: float = 1.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not api_key:
            raise PerspectiveError(
                f"No Perspective API key: pass one or set {PERSPECTIVE_API_KEY_ENV}; {OFFLINE_ALTERNATIVES}."
            )
        attrs = tuple(a.upper() for a in attributes)
        if "TOXICITY" not in attrs:
            raise ValueError(f"attributes must include TOXICITY; got {attrs}.")
        if qps <= 0 or timeout <= 0:
            raise ValueError(f"need qps > 0 and timeout > 0; got {qps} and {timeout}.")
        self.base_url = base_url.strip().rstrip("/")
        self.attributes = attrs
        self.languages = tuple(languages)
        self.qps = float(qps)
        self.retry = RetryPolicy(int(max_retries), float(backoff), float(max_backoff))
        self.timeout = float(timeout)
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()
        self._next_time: float | None = None
        self.__api_key = api_key
        self.name = "perspective"

    def __repr__(self) -> str:
        return f"PerspectiveScorer(base_url={self.base_url!r}, qps={self.qps}, api_key=<set>)"

    @classmethod
    def from_env(cls, api_key: str | None = None, **kwargs: Any) -> PerspectiveScorer:
        """Build with ``api_key`` or ``$PERSPECTIVE_API_KEY``."""
        return cls(api_key or os.environ.get(PERSPECTIVE_API_KEY_ENV, "").strip() or None, **kwargs)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """TOXICITY summary score per text."""
        return self.score_all(texts)["TOXICITY"]

    def score_all(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Summary score of every requested attribute: ``{attribute: (n,)}`` (NaN where missing)."""
        texts = check_texts(texts)
        out = {a: np.full(len(texts), np.nan) for a in self.attributes}
        for i, text in enumerate(texts):
            if not text.strip():
                continue
            reply = self._post(text)
            scores = reply.get("attributeScores")
            if not isinstance(scores, dict):
                raise PerspectiveError(f"Malformed Perspective reply (no attributeScores) for text {i}.")
            for a in self.attributes:
                try:
                    out[a][i] = float(scores[a]["summaryScore"]["value"])
                except (KeyError, TypeError, ValueError):
                    logger.warning("Perspective reply for text %d has no %s score.", i, a)
        return out

    # -- requests ------------------------------------------------------------------------------------

    def _wait_for_slot(self) -> None:
        """Minimum-interval limiter: request starts are at least 1/qps apart."""
        now = self._clock()
        if self._next_time is not None and now < self._next_time:
            self._sleep(self._next_time - now)
            now = self._next_time
        self._next_time = now + 1.0 / self.qps

    def _post(self, text: str) -> dict[str, Any]:
        url = f"{self.base_url}/comments:analyze?" + urllib.parse.urlencode({"key": self.__api_key})
        payload = {
            "comment": {"text": text},
            "languages": list(self.languages),
            "requestedAttributes": {a: {} for a in self.attributes},
        }
        try:
            return post_json_with_retries(url, payload, policy=self.retry, label="Perspective request",
                                          timeout=self.timeout, redact=self._redact, sleep=self._sleep,
                                          rng=self._rng, before_attempt=self._wait_for_slot)  # fmt: skip
        except HttpRejected as exc:
            hint = (
                f"check the key in ${PERSPECTIVE_API_KEY_ENV} (valid, Perspective API enabled for it)"
                if exc.status in (401, 403) or "key" in exc.detail.lower()
                else f"the request was rejected; if this persists check ${PERSPECTIVE_API_KEY_ENV}"
            )
            raise PerspectiveError(
                f"Perspective API at {self.base_url} refused the request (HTTP {exc.status}): {hint}. "
                f"Server said: {exc.detail[:300] or exc.reason}"
            ) from None
        except MalformedReply as exc:
            raise PerspectiveError(f"Perspective API at {self.base_url} answered with {exc}.") from None
        except RetriesExhausted as exc:
            raise PerspectiveError(
                f"Perspective API at {self.base_url} did not answer successfully after {exc.attempts} "
                f"attempts (last error: {exc.last}). Check the network and your quota (default 1 QPS; "
                "lower qps)."
            ) from None

    def _redact(self, text: str) -> str:
        return text.replace(self.__api_key, "***")
