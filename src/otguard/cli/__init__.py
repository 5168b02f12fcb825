"""Command line: ``otguard collect | fit | generate | evaluate | compare | rescore | report | serve``.

Thin wrappers over the Python API, one module per group of commands (:mod:`~otguard.cli.pipeline`,
:mod:`~otguard.cli.generate`, :mod:`~otguard.cli.compare`, and :mod:`otguard.serve.cli`), with the
argument types in :mod:`~otguard.cli.args` and the shared loading in :mod:`~otguard.cli.runtime`.

Errors derived from :class:`OtguardError` are shown as one line (exit code 2); ``--verbose``
shows the traceback. Every argument is checked before a model is loaded: a typo costs seconds,
not a model load and a collection.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from otguard.cli import compare, generate, pipeline, runtime
from otguard.cli.args import add_common
from otguard.errors import OtguardError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="otguard", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pipeline.add_parsers(sub)
    compare.add_parsers(sub)
    from otguard.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub, add_common)
    generate.add_parsers(sub)
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from otguard.serve.cli import run

    return run(args, runtime.check_model_args, runtime.load)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "collect": pipeline.cmd_collect,
    "fit": pipeline.cmd_fit,
    "generate": generate.cmd_generate,
    "evaluate": generate.cmd_evaluate,
    "compare": compare.cmd_compare,
    "report": compare.cmd_report,
    "rescore": compare.cmd_rescore,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runtime.setup(args)
    try:
        return COMMANDS[args.command](args)
    except OtguardError as exc:
        if args.verbose:
            raise
        print(f"otguard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("otguard: interrupted", file=sys.stderr)
        return 130
