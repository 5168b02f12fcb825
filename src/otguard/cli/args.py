"""The CLI's argument types and shared option groups (checked by argparse, before anything loads)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


# ---------------------------------------------------------------- argument types (checked by argparse)
def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (``--limit 0`` is an error, not "no limit")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def count_or_auto(text: str) -> int | str:
    """An argparse type: ``auto`` (the configuration scales the number with ``--limit``) or an integer."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def float_in(
    low: float, high: float, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite float in the interval ``low..high`` (open ends as flagged)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text}")
        return value

    return parse


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def positive_floats(text: str) -> list[float]:
    """``"5,10,20"`` -> ``[5.0, 10.0, 20.0]``; every value finite and > 0, at least one."""
    values = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {item!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"every value must be a finite number > 0, got {item}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("needs at least one value, e.g. 5,10,20,40")
    return values


INF = math.inf


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="Hub id, local folder, .gguf file, or the packaged alias smollm2-135m (default)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        help="model dtype: float32, bfloat16, float16, or auto (bfloat16 where the CPU/GPU computes it "
        "natively, else float32); default float32, auto for compare",
    )
    p.add_argument(
        "--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging and full tracebacks")


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        default="truthfulqa",
        help="truthfulqa, toxigen, or a JSONL/CSV/TSV file with text,label[,group] columns",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with local copies of the data (else $OTGUARD_DATA_DIR, else the HF Hub)",
    )
    p.add_argument("--text-column", default=None, help="data file: column of the texts (default text)")
    p.add_argument("--label-column", default=None, help="data file: column of the 0/1 labels (default label)")
    p.add_argument("--group-column", default=None, help="data file: column of the groups (default group)")
    p.add_argument(
        "--limit", type=int_at_least(1), default=None, help="use only the first N groups (questions)"
    )
    p.add_argument("--batch-size", type=int_at_least(1), default=16, help="collection batch size (rows)")
    p.add_argument(
        "--max-batch-tokens",
        type=int_at_least(1),
        default=None,
        help="cap on the padded tokens of one collection batch (default 8192): long texts get small batches",
    )
    p.add_argument(
        "--max-length",
        type=int_at_least(1),
        default=None,
        help="cut every text to its first N tokens (with a warning); without it, texts longer than the "
        "model's context are refused",
    )
    p.add_argument(
        "--act-dtype",
        default="float16",
        choices=["float16", "float32", "bfloat16"],
        help="activation storage dtype (default float16)",
    )
    p.add_argument("--cache-dir", default=None, help="otguard cache folder (default ~/.cache/otguard)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the activation cache")


def add_force(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--force",
        action="store_true",
        help=f"write into a non-empty --out folder that is not an otguard {what} folder (its files are kept)",
    )
