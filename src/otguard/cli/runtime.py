"""What the commands share at run time: logging, the model and data loading, collection.

Commands call these through the module (``runtime.load(args)``), so tests can replace the model
loading in one place.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from otguard.errors import UsageError

logger = logging.getLogger("otguard")


def setup(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def check_model_args(args: argparse.Namespace) -> None:
    """--model, --device, --dtype and --cache-dir, checked without loading anything heavy."""
    from otguard.models import _resolve_dtype, check_device, resolve_model_source

    check_device(args.device)
    _resolve_dtype(args.dtype, args.device)
    resolve_model_source(args.model)
    cache = getattr(args, "cache_dir", None)
    if cache is not None:
        path = Path(cache).expanduser()
        if path.exists() and not path.is_dir():
            raise UsageError(f"--cache-dir {path} is a file, not a folder.")


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    from otguard.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(
        args.model, device=args.device, dtype=args.dtype, cache=getattr(args, "cache_dir", None)
    )
    logger.info("Loaded %s in %.1f s", model.config._name_or_path, time.perf_counter() - t0)
    return model, tok


def load_data(args: argparse.Namespace) -> Any:
    """The --dataset (limited to --limit groups); read before the model so data errors come first."""
    from otguard.data import load_dataset, resolve_data_dir

    if args.data_dir is not None:
        resolve_data_dir(args.data_dir)  # a mistyped --data-dir is an error even where it is not needed
    columns = {
        key: value
        for key, value in (
            ("text_column", args.text_column),
            ("label_column", args.label_column),
            ("group_column", args.group_column),
        )
        if value is not None
    }
    dataset = load_dataset(args.dataset, data_dir=args.data_dir, **columns)
    if args.limit:
        dataset = dataset.limit_groups(args.limit)
    logger.info(
        "Dataset %s: %d texts, %d groups, %d undesirable",
        dataset.name,
        len(dataset),
        len(dataset.group_names),
        int(dataset.labels.sum()),
    )
    return dataset


def collect(args: argparse.Namespace, model: Any, tok: Any, dataset: Any) -> Any:
    from otguard.activations import MAX_BATCH_TOKENS, collect

    cache: Any = False if args.no_cache else (args.cache_dir or True)
    return collect(
        model,
        tok,
        dataset,
        positions=getattr(args, "positions", "last"),
        batch_size=args.batch_size,
        dtype=args.act_dtype,
        max_length=args.max_length,
        max_batch_tokens=args.max_batch_tokens or MAX_BATCH_TOKENS,
        cache=cache,
    )
