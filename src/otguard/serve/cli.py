"""``otguard serve``: the command-line side (arguments, loading, uvicorn).

Everything that can be checked before the model loads is checked first (policy names and folders,
the port, the served name), so a typo costs no model load. uvicorn runs the app with its graceful
shutdown: on Ctrl-C or SIGTERM it stops accepting connections, lets the requests in flight finish
(streams included), then the app's lifespan drains the engine; uvicorn then re-raises the signal,
so the process ends as terminated by SIGTERM (status 143 in a shell), or with 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import re
from typing import Any

from otguard.errors import UsageError

logger = logging.getLogger("otguard")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _policy_spec(text: str) -> tuple[str, str]:
    """``NAME=PATH`` (an argparse type)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. slim=runs/slim); got {text!r}")
    if not _NAME_RE.match(name):
        raise argparse.ArgumentTypeError(
            f"policy name {name!r}: use letters, digits, '.', '_' or '-' (it becomes part of the model name)"
        )
    return name, path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a port number; got {text!r}") from exc
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in 0..65535; got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from exc
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0; got {text}")
    return value


def add_parser(sub: Any, add_common: Any) -> argparse.ArgumentParser:
    """Register the ``serve`` subcommand; ``add_common`` adds --model/--device/--dtype/--threads/-v."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a policy per request")
    add_common(p)
    p.add_argument(
        "--policy",
        action="append",
        type=_policy_spec,
        default=[],
        metavar="NAME=PATH",
        help="serve a policy folder as the model '<served>+NAME' (repeat for several)",
    )
    p.add_argument(
        "--served-model-name", default=None, help="model name clients send (default: the --model value)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--max-batch-size", type=_positive_int, default=16, help="requests per batch (default 16)")
    p.add_argument(
        "--batch-window-ms",
        type=_non_negative_float,
        default=10.0,
        help="how long the first waiting request waits for others to join its batch (default 10)",
    )
    p.add_argument(
        "--no-join",
        action="store_true",
        help="static batches: waiting requests never join a running batch (it finishes first)",
    )
    p.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=512,
        help="the most tokens one request may generate (default 512)",
    )
    p.add_argument(
        "--max-queue",
        type=_positive_int,
        default=256,
        help="waiting requests beyond which new ones get HTTP 429 (default 256)",
    )
    p.add_argument(
        "--no-check-weights",
        action="store_true",
        help="serve policies fitted on a model with the same architecture but other weights",
    )
    p.add_argument(
        "--graceful-timeout",
        type=_non_negative_float,
        default=60.0,
        help="seconds to wait for requests in flight on Ctrl-C / SIGTERM (default 60)",
    )
    return p


def run(args: argparse.Namespace, check_model_args: Any, load: Any) -> int:
    """Load the model and policies, then serve until Ctrl-C / SIGTERM."""
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UsageError(
            f'otguard serve needs the serve extra ({exc.name} is missing): pip install "otguard[serve]"'
        ) from exc

    from otguard.policy import Policy
    from otguard.serve.app import create_app
    from otguard.serve.engine import Engine
    from otguard.sites import model_identity

    names = [name for name, _ in args.policy]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"--policy names must be unique; {', '.join(duplicates)} given more than once.")
    served = args.served_model_name or args.model
    if "+" in served:
        raise UsageError(
            f"The served model name {served!r} contains '+', which separates it from a policy "
            "name; pass --served-model-name without '+'."
        )
    check_weights = not args.no_check_weights
    policies = {name: Policy.load(path) for name, path in args.policy}  # files checked before the model
    check_model_args(args)
    model, tok = load(args)
    identity = model_identity(model)
    for name, policy in policies.items():
        policy.model.check_compatible(identity, check_weights=check_weights)
        logger.info("policy %s: %s", name, policy.summary())
    engine = Engine(
        model,
        tok,
        policies,
        max_batch_size=args.max_batch_size,
        batch_window_s=args.batch_window_ms / 1000,
        max_queue=args.max_queue,
        max_tokens_cap=args.max_tokens,
        join=not args.no_join,
    )
    app = create_app(engine, served)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info",
        timeout_graceful_shutdown=args.graceful_timeout,
        log_config=None,
    )
    server = uvicorn.Server(config)
    logger.info(
        "Serving %s (models: %s) on http://%s:%d",
        served,
        ", ".join([served] + [f"{served}+{n}" for n in sorted(policies)]),
        args.host,
        args.port,
    )
    server.run()
    return 0
