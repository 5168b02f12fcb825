"""A scripted HTTP server on 127.0.0.1 for the HTTP clients' tests (LLM judge, Perspective).

Each POST is recorded (path, headers, JSON body) and answered by the next step of ``script`` (a
reply or a function of the body), then by ``default``; once both run out, or past ``max_requests``,
it answers 418 so that a client stuck in a retry loop fails its test instead of hanging it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

Reply = tuple[int, dict[str, str], Any]  # status, headers, JSON body (or bytes)


class ScriptedServer:
    """HTTP server on an ephemeral port answering POSTs from a script; records every request."""

    def __init__(self, *, max_requests: int = 50, path: str = "") -> None:
        self.max_requests = max_requests
        self.requests: list[dict[str, Any]] = []
        self.script: list[Reply | Callable[[dict[str, Any]], Reply]] = []
        self.default: Callable[[dict[str, Any]], Reply] | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                req = {"path": self.path, "headers": dict(self.headers), "json": body}
                server.requests.append(req)
                if len(server.requests) > server.max_requests:
                    reply: Reply = (418, {}, {"error": "request limit of the test server reached"})
                elif server.script:
                    step = server.script.pop(0)
                    reply = step(body) if callable(step) else step
                elif server.default is not None:
                    reply = server.default(body)
                else:
                    reply = (418, {}, {"error": "script exhausted"})
                status, headers, payload = reply
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # silence the default stderr log
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.daemon = True
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def clear_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests to 127.0.0.1 must not go through a proxy configured in the environment."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
