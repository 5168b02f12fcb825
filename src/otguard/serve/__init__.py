"""``otguard serve``: an OpenAI-compatible HTTP server with a policy per request and a monitor mode.

Needs the ``serve`` extra (``pip install "otguard[serve]"``: Starlette, uvicorn, prometheus_client).
:func:`create_app` builds the ASGI app over an :class:`Engine` (the batching worker that owns the
model); ``otguard serve --model M --policy NAME=PATH`` runs it under uvicorn. The names are imported
lazily, so that ``otguard --help`` works without the extra.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Engine", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from otguard.serve.app import create_app

        return create_app
    if name == "Engine":
        from otguard.serve.engine import Engine

        return Engine
    raise AttributeError(f"module 'otguard.serve' has no attribute {name!r}")
