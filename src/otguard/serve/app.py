"""The ASGI app of ``otguard serve``: OpenAI-shaped endpoints over an :class:`~otguard.serve.engine.Engine`.

Endpoints: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions``,
``POST /v1/chat/completions`` (JSON, or server-sent events with ``"stream": true``), ``GET /health``
and ``GET /metrics`` (Prometheus text format).

The ``model`` field picks the policy: the served name alone is the plain model, ``"<served>+<name>"``
the policy registered under ``name``. An optional ``"otguard": {"mode": "monitor" | "repair"}``
object chooses between detecting only (the text is the plain model's) and detecting and editing (the
default with a policy). Every response carries an ``"otguard"`` object with the detector's summary
(``flag_rate``, ``flagged``, the flagged ``spans``); a stream carries it in its last chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from otguard.serve.engine import OFF, Delta, Engine, Failed, Job, Result
from otguard.serve.metrics import CONTENT_TYPE, Metrics
from otguard.serve.schemas import APIError, ParsedRequest, parse_request, split_model_name

logger = logging.getLogger(__name__)

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def create_app(
    engine: Engine, served_name: str, *, default_completion_tokens: int = 16, manage_engine: bool = True
) -> Starlette:
    """The app. ``manage_engine``: start the engine's worker with the app and stop it (draining) after.

    ``default_completion_tokens`` is ``max_tokens`` for a completion request that does not say (16,
    as the OpenAI API); a chat request without it may use the rest of the context, up to the
    engine's cap.
    """
    if "+" in served_name:
        raise ValueError(f"The served model name {served_name!r} must not contain '+'.")
    policies = frozenset(engine.policies)
    metrics = Metrics(engine)
    created = int(time.time())

    def on_batch(size: int, policy: str | None, mode: str) -> None:
        metrics.batch_size.labels(policy or "none", mode).observe(size)

    def on_join(size: int, policy: str | None, mode: str) -> None:
        metrics.joined.labels(policy or "none", mode).inc(size)

    engine.on_batch, engine.on_join = on_batch, on_join

    def model_names() -> list[str]:
        return [served_name] + [f"{served_name}+{name}" for name in sorted(policies)]

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "otguard"}

    async def list_models(request: Request) -> Response:
        metrics.requests.labels("/v1/models", "200").inc()
        return JSONResponse({"object": "list", "data": [model_card(n) for n in model_names()]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        if name not in model_names():
            err = APIError(404, f"The model {name!r} does not exist.", param="model", code="model_not_found")
            metrics.requests.labels("/v1/models", "404").inc()
            return _error_response(err)
        metrics.requests.labels("/v1/models", "200").inc()
        return JSONResponse(model_card(name))

    async def health(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "model": served_name,
                "policies": sorted(policies),
                "queued": engine.queued,
                "running": engine.running,
            }
        )

    async def metrics_page(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def generate(request: Request, endpoint: str) -> Response:
        t0 = time.perf_counter()
        try:
            job, parsed, queue = await _prepare(request, endpoint)
        except APIError as err:
            metrics.requests.labels(endpoint, str(err.status)).inc()
            return _error_response(err)
        rid = ("chatcmpl-" if parsed.chat else "cmpl-") + uuid.uuid4().hex
        base = {"id": rid, "created": int(time.time()), "model": parsed.model}
        if parsed.stream:
            metrics.requests.labels(endpoint, "200").inc()
            return StreamingResponse(
                _stream(job, parsed, queue, base, endpoint, t0),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            while True:
                event = await queue.get()
                if isinstance(event, Result | Failed):
                    break
        finally:
            job.cancelled = True  # a no-op when finished; frees the row if the client went away
        if isinstance(event, Failed):
            metrics.requests.labels(endpoint, "500").inc()
            return _error_response(APIError(500, f"Generation failed: {event.message}", type="server_error"))
        metrics.record_generation(endpoint, job.policy, job.mode, event, time.perf_counter() - t0)
        metrics.requests.labels(endpoint, "200").inc()
        return JSONResponse(_full_response(parsed, base, event, job))

    async def _prepare(request: Request, endpoint: str) -> tuple[Job, ParsedRequest, asyncio.Queue[Any]]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"The request body is not valid JSON ({exc}).") from exc
        parsed = parse_request(
            body,
            chat=endpoint == CHAT,
            default_max_tokens=None if endpoint == CHAT else default_completion_tokens,
        )
        policy = split_model_name(parsed.model, served_name, policies)
        if policy is None and parsed.mode is not None:
            raise APIError(
                400,
                f"otguard.mode needs a policy; use a model such as "
                f"{served_name}+<policy> (see GET /v1/models).",
                param="otguard.mode",
            )
        mode = OFF if policy is None else (parsed.mode or "repair")
        ids = engine.encode_prompt(parsed.prompt, parsed.messages)
        sampling = engine.resolve_sampling(parsed.sampling, len(ids))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(event: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        job = Job(ids, policy, mode, sampling, emit, stream=parsed.stream)
        engine.submit(job)
        return job, parsed, queue

    async def _stream(
        job: Job,
        parsed: ParsedRequest,
        queue: asyncio.Queue[Any],
        base: dict[str, Any],
        endpoint: str,
        t0: float,
    ) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if parsed.chat else "text_completion"
        first = True
        try:
            if parsed.chat:  # the role comes first, as OpenAI streams it
                yield _sse(
                    {
                        **base,
                        "object": obj,
                        "choices": [
                            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        ],
                    }
                )
            while True:
                event = await queue.get()
                if isinstance(event, Delta):
                    if first:
                        metrics.first_token.labels(endpoint).observe(time.perf_counter() - t0)
                        first = False
                    yield _sse(
                        {**base, "object": obj, "choices": [_choice(parsed, event.text, None, delta=True)]}
                    )
                elif isinstance(event, Failed):
                    yield _sse(
                        APIError(500, f"Generation failed: {event.message}", type="server_error").body()
                    )
                    break
                else:
                    metrics.record_generation(endpoint, job.policy, job.mode, event, time.perf_counter() - t0)
                    last = _choice(parsed, "", event.finish_reason, delta=True)
                    yield _sse(
                        {
                            **base,
                            "object": obj,
                            "choices": [last],
                            "otguard": event.summary(job.policy, job.mode),
                        }
                    )
                    if parsed.include_usage:
                        yield _sse({**base, "object": obj, "choices": [], "usage": _usage(event)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True  # the client went away: the worker drops the row at its next step

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    async def on_error(request: Request, exc: Exception) -> Response:
        logger.exception("Unhandled error on %s", request.url.path)
        return _error_response(APIError(500, f"Internal error: {type(exc).__name__}", type="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                logger.info(
                    "Stopping: finishing %d queued and %d running request(s)", engine.queued, engine.running
                )
                await asyncio.to_thread(engine.stop)
                logger.info("Stopped: every request answered")

    async def completions(request: Request) -> Response:
        return await generate(request, COMPLETIONS)

    async def chat(request: Request) -> Response:
        return await generate(request, CHAT)

    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route(COMPLETIONS, completions, methods=["POST"]),
        Route(CHAT, chat, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: on_http_error, Exception: on_error},
    )
    app.state.engine, app.state.metrics = engine, metrics
    return app


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(result: Result) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _choice(parsed: ParsedRequest, text: str, finish: str | None, *, delta: bool) -> dict[str, Any]:
    if not parsed.chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    key = "delta" if delta else "message"
    content: dict[str, Any] = {"content": text} if delta else {"role": "assistant", "content": text}
    return {"index": 0, key: content, "logprobs": None, "finish_reason": finish}


def _full_response(parsed: ParsedRequest, base: dict[str, Any], result: Result, job: Job) -> dict[str, Any]:
    return {
        **base,
        "object": "chat.completion" if parsed.chat else "text_completion",
        "choices": [_choice(parsed, result.text, result.finish_reason, delta=False)],
        "usage": _usage(result),
        "otguard": result.summary(job.policy, job.mode),
    }
