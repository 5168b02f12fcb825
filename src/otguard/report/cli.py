"""``otguard report RESULTS.json``: re-render a run's report without running a model."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from otguard.errors import OtguardError
from otguard.report.build import write_report
from otguard.report.explain import HowToRead

__all__ = ["add_arguments", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report options, shared by ``python -m otguard.report`` and ``otguard report``."""
    parser.add_argument("results", help="results.json written by `otguard compare` (or its folder)")
    parser.add_argument("--out", default=None, help="output folder (default: the results file's folder)")


def run(
    args: argparse.Namespace,
    how_to_read: HowToRead | None = None,
) -> int:
    """Write the report for parsed arguments and print the two paths (the command's output).

    ``how_to_read`` gives the task's "How to read this" items; by default the harness's text for the
    results' task (:func:`otguard.harness.registry.how_to_read`).
    """
    if how_to_read is None:
        from otguard.harness.registry import how_to_read as task_text

        how_to_read = task_text
    results = Path(args.results)
    out = Path(args.out) if args.out else (results if results.is_dir() else results.parent)
    md_path, html_path = write_report(results, out, how_to_read=how_to_read)
    print(md_path)
    print(html_path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m otguard.report results.json --out DIR``; errors are one line on stderr (exit code 2)."""
    parser = argparse.ArgumentParser(
        prog="otguard report", description="Write report.md and report.html from a results.json."
    )
    add_arguments(parser)
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        return run(args)
    except OtguardError as exc:
        print(f"otguard: error: {exc}", file=sys.stderr)
        return 2
