"""Folds in parallel worker processes: one fold per CPU core where intra-op threads scale poorly.

A small model's forwards split poorly across threads (SmolLM2 on 2 cores: 2 threads are 1.5-1.7x one
thread), while two processes of one thread each run side by side without slowing each other; the
folds of a comparison are independent until ``results.json`` is assembled, so they can run as such
processes. Workers are *forked* after everything shared is ready (the model, the task's judges and
data, the activations): nothing is loaded twice and a model built in memory works too. Each worker
runs its folds with one torch thread (GNU OpenMP is not fork-safe: a forked child that opens a thread
team the parent used hangs, so workers never use more than one) and saves every finished
(fold, method) result through the run's :class:`~otguard.harness.resume.PartialStore`, exactly as the
sequential loop does; the parent waits, shows their progress from the saved files, adds their stage
timings to its own and assembles ``results.json`` from the saved results. A failed worker fails the run
with its error; what it and the others saved is resumed by a rerun.

``workers="auto"`` picks parallel folds only where they pay: on CPU, on Linux (fork), when the torch
thread count is at most the number of folds still to run (then one fold per thread keeps every core
busy); otherwise one process runs the folds with all its threads.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from otguard.errors import ConfigError, OtguardError

logger = logging.getLogger(__name__)

__all__ = ["WorkerError", "can_fork", "check_workers", "resolve_workers", "run_folds"]

_POLL_S = 1.0


class WorkerError(OtguardError):
    """A fold worker failed; its message names the fold and the error."""


def can_fork() -> bool:
    """Whether worker processes can be forked here (Linux; macOS forks are unsafe with its frameworks)."""
    return sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()


def check_workers(workers: int | str) -> int | str:
    """``workers`` as given (``"auto"`` or an integer >= 1); anything else is refused in one line."""
    if isinstance(workers, str):
        if workers.strip().lower() == "auto":
            return "auto"
        try:
            workers = int(workers)
        except ValueError:
            raise ConfigError(f"workers must be 'auto' or an integer >= 1; got {workers!r}.") from None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be 'auto' or an integer >= 1; got {workers!r}.")
    return workers


def resolve_workers(workers: int | str, n_folds: int, device: torch.device | str) -> int:
    """The number of worker processes for ``n_folds`` folds still to run (1: the sequential loop).

    An explicit number above 1 that cannot be honoured (a GPU model, no fork) is refused; ``"auto"``
    falls back to 1 there (see the module docstring).
    """
    wanted = check_workers(workers)
    on_cpu = torch.device(device).type == "cpu"
    if not isinstance(wanted, int):  # "auto"
        threads = torch.get_num_threads()
        if n_folds < 2 or not on_cpu or not can_fork() or threads < 2 or threads > n_folds:
            return 1
        return threads
    if wanted > 1 and n_folds > 1:
        if not on_cpu:
            raise ConfigError(
                f"workers={wanted} runs folds in forked CPU processes; the model is on {device}. "
                "Use --workers 1 (one process drives the accelerator)."
            )
        if not can_fork():
            raise ConfigError(f"workers={wanted} needs fork (Linux); use --workers 1 on {sys.platform}.")
    return max(1, min(wanted, n_folds))


@contextlib.contextmanager
def _quiet_tokenizers() -> Iterator[None]:
    """Forked children of a process whose fast tokenizers used their thread pool disable it and warn;
    saying so explicitly keeps the warning out of the log."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _child(
    folds: Sequence[int],
    run_fold: Callable[[int], dict[str, float]],
    conn: Any,
) -> None:
    torch.set_num_threads(1)
    seconds: dict[str, float] = {}
    fold = -1
    try:
        for fold in folds:
            for key, value in run_fold(fold).items():
                seconds[key] = seconds.get(key, 0.0) + value
        conn.send(("ok", seconds))
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal; the parent reports it
        os._exit(130)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        logger.error("fold %d failed in its worker:\n%s", fold, traceback.format_exc())
        conn.send(("error", {"fold": fold, "error": detail}))
        conn.close()
        os._exit(1)
    conn.close()


def run_folds(
    folds: Sequence[int],
    workers: int,
    run_fold: Callable[[int], dict[str, float]],
    *,
    done_count: Callable[[], int] | None = None,
    total: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Run ``run_fold(fold)`` for every fold in ``workers`` forked processes (fold ``k`` of ``folds`` in
    worker ``k % workers``); returns their stage seconds, summed.

    ``run_fold`` must save its results itself (the parent sees only what is saved) and return its stage
    seconds. ``done_count``/``total`` drive a progress bar of saved results while the parent waits.
    Raises :class:`WorkerError` after every worker has stopped if any failed.
    """
    from tqdm.auto import tqdm

    ctx = mp.get_context("fork")
    procs: list[tuple[Any, Any, list[int]]] = []
    with _quiet_tokenizers():
        for w in range(workers):
            mine = list(folds[w::workers])
            if not mine:
                continue
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(mine, run_fold, send), name=f"otguard-fold-worker-{w}")
            proc.start()
            send.close()
            procs.append((proc, recv, mine))
    logger.info(
        "Running folds %s in %d worker processes (one torch thread each)",
        ", ".join(str(f) for f in folds), len(procs),
    )  # fmt: skip
    seconds: dict[str, float] = {}
    errors: list[str] = []
    bar = tqdm(total=total, desc="compare (workers)", unit="result", disable=not progress or not total)
    try:
        pending = list(procs)
        while pending:
            time.sleep(_POLL_S)
            if done_count is not None:
                bar.n = done_count()
                bar.refresh()
            still = []
            for proc, recv, mine in pending:
                if recv.poll():
                    _read(recv, mine, seconds, errors)
                    proc.join()
                elif not proc.is_alive():
                    proc.join()
                    if recv.poll():
                        _read(recv, mine, seconds, errors)
                    else:
                        errors.append(f"fold(s) {mine}: the worker died (exit code {proc.exitcode})")
                else:
                    still.append((proc, recv, mine))
            pending = still
    except BaseException:
        for proc, _, _ in procs:
            if proc.is_alive():
                proc.terminate()
        for proc, _, _ in procs:
            proc.join()
        raise
    finally:
        if done_count is not None:
            bar.n = done_count()
        bar.close()
    if errors:
        raise WorkerError(
            "A fold worker failed: " + "; ".join(errors) + ". The results the workers saved are kept: "
            "fix the cause and rerun the same command to resume (or pass --workers 1 to run the folds "
            "in this process)."
        )
    return seconds


def _read(recv: Any, folds: list[int], seconds: dict[str, float], errors: list[str]) -> None:
    try:
        status, payload = recv.recv()
    except EOFError:
        errors.append(f"fold(s) {folds}: the worker stopped without a report")
        return
    if status == "ok":
        for key, value in payload.items():
            seconds[key] = seconds.get(key, 0.0) + float(value)
    else:
        errors.append(f"fold {payload['fold']}: {payload['error']}")
