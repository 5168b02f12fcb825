"""Prometheus metrics of ``otguard serve`` (``GET /metrics``), in a registry of their own per app.

A registry per app (not prometheus_client's global one) so that several apps in one process (tests)
do not collide, and the page shows only the server's own series.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The server's counters, histograms and gauges; ``policy`` is ``"none"`` for the bare model."""

    def __init__(self, engine: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "otguard_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "otguard_prompt_tokens", "Prompt tokens processed", ["policy"], registry=r
        )
        self.completion_tokens = Counter(
            "otguard_completion_tokens", "Tokens generated", ["policy"], registry=r
        )
        self.latency = Histogram(
            "otguard_request_latency_seconds",
            "Time from receiving a generation request to its last token",
            ["endpoint", "policy"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "otguard_time_to_first_token_seconds",
            "Time from receiving a streaming request to its first text",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "otguard_queue_seconds",
            "Time a request waited for its batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "otguard_batch_size",
            "Requests run together in one batch",
            ["policy", "mode"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.joined = Counter(
            "otguard_joined_requests",
            "Requests that joined a running batch at a step boundary",
            ["policy", "mode"],
            registry=r,
        )
        self.checked = Counter(
            "otguard_checked_tokens",
            "Generated tokens checked by a policy's detector",
            ["policy", "mode"],
            registry=r,
        )
        self.flagged = Counter(
            "otguard_flagged_tokens", "Generated tokens the detector flagged", ["policy", "mode"], registry=r
        )
        self.flag_rate = Gauge(
            "otguard_flag_rate",
            "Share of checked tokens flagged since the server started",
            ["policy"],
            registry=r,
        )
        self._flag_totals: dict[str, list[int]] = {}
        if engine is not None:
            queued = Gauge("otguard_queued_requests", "Requests waiting for a batch", registry=r)
            queued.set_function(lambda: engine.queued)
            running = Gauge("otguard_running_requests", "Requests in the running batch", registry=r)
            running.set_function(lambda: engine.running)

    def record_generation(
        self, endpoint: str, policy: str | None, mode: str, result: Any, seconds: float
    ) -> None:
        """Count one finished generation (tokens, latency, queue time and the detector's flags)."""
        name = policy or "none"
        self.prompt_tokens.labels(name).inc(result.prompt_tokens)
        self.completion_tokens.labels(name).inc(result.completion_tokens)
        self.latency.labels(endpoint, name).observe(seconds)
        self.queue_time.observe(result.queued_s)
        if policy is not None and result.flags is not None:
            n, k = len(result.flags), sum(result.flags)
            self.checked.labels(name, mode).inc(n)
            self.flagged.labels(name, mode).inc(k)
            totals = self._flag_totals.setdefault(name, [0, 0])
            totals[0] += n
            totals[1] += k
            self.flag_rate.labels(name).set(totals[1] / totals[0] if totals[0] else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
