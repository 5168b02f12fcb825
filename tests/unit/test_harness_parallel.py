"""Folds in forked worker processes (otguard.harness.parallel) on the made-up task of test_harness_run:
the same numbers and files as the sequential loop, a failed worker fails the run with its fold and error
while the other folds' results stay saved and resume, and the rules that pick the number of workers."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch

from otguard.cli.args import count_or_auto
from otguard.errors import ConfigError, OtguardError
from otguard.harness import parallel, registry
from otguard.harness.parallel import WorkerError, check_workers, resolve_workers
from otguard.harness.run import CompareRun
from tests.unit.test_harness_run import DemoTask, _numbers, demo  # noqa: F401 - the fixture

pytestmark = pytest.mark.skipif(not parallel.can_fork(), reason="fold workers need fork (Linux)")


class FailingFoldTask(DemoTask):
    """DemoTask whose evaluations of one fold fail (class attributes are copied into each worker)."""

    fail_fold: int | None = 1

    def evaluate(self, method: str, policy: Any) -> Any:
        if self.fold == type(self).fail_fold:
            raise OtguardError("the judge server went away")
        return super().evaluate(method, policy)


def test_two_workers_give_the_numbers_and_files_of_the_sequential_loop(demo, tmp_path) -> None:  # noqa: F811
    config, model, tok = demo
    one = CompareRun(config, tmp_path / "one", progress=False, workers=1).run(model, tok)
    DemoTask.calls = []
    two = CompareRun(config, tmp_path / "two", progress=False, workers=2).run(model, tok)
    assert DemoTask.calls == []  # every evaluation ran in a worker, none in this process
    assert (one.config["workers"], two.config["workers"]) == (1, 2)
    assert _numbers(two) == _numbers(one)
    assert (tmp_path / "two" / "rows.csv").read_text() == (tmp_path / "one" / "rows.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "two" / "partial").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "partial").iterdir()
    )
    # the workers' stage timings reach results.json
    assert set(one.timings) == set(two.timings) and two.timings["fit"] > 0


def test_a_failed_worker_fails_the_run_and_the_other_folds_resume(demo, tmp_path, monkeypatch) -> None:  # noqa: F811
    config, model, tok = demo
    whole = CompareRun(config, tmp_path / "whole", progress=False, workers=1).run(model, tok)
    monkeypatch.setitem(registry.TASKS, "demo", f"{__name__}:FailingFoldTask")
    with pytest.raises(WorkerError, match=r"fold 1: .*went away.*rerun the same command to resume"):
        CompareRun(config, tmp_path / "cut", progress=False, workers=2).run(model, tok)
    saved = sorted(p.name for p in (tmp_path / "cut" / "partial").glob("fold*.json"))
    assert saved == ["fold0-mean-shift.json", "fold0-none.json", "fold0-radiant.json"]
    assert not (tmp_path / "cut" / "results.json").exists()
    FailingFoldTask.fail_fold, DemoTask.calls = None, []
    try:
        again = CompareRun(config, tmp_path / "cut", progress=False, workers=2).run(model, tok)
    finally:
        FailingFoldTask.fail_fold = 1
    # one fold left: it runs in this process, and only its methods are computed
    assert DemoTask.calls == [(1, m) for m in config.methods] and again.config["workers"] == 1
    assert again.config["resumed_results"] == 3
    assert _numbers(again) == _numbers(whole)


def test_auto_runs_one_fold_per_thread_only_on_cpu_when_the_folds_cover_the_threads(monkeypatch) -> None:
    for threads, folds, want in [(2, 2, 2), (2, 5, 2), (4, 4, 4), (16, 2, 1), (1, 5, 1), (2, 1, 1)]:
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        assert resolve_workers("auto", folds, "cpu") == want, (threads, folds)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert resolve_workers("auto", 2, "meta") == 1  # not a CPU model
    monkeypatch.setattr(parallel, "can_fork", lambda: False)
    assert resolve_workers("auto", 2, "cpu") == 1


def test_an_explicit_number_is_capped_by_the_folds_and_refused_where_it_cannot_run(monkeypatch) -> None:
    assert resolve_workers(8, 3, "cpu") == 3 and resolve_workers(1, 3, "cpu") == 1
    assert resolve_workers(4, 1, "cuda") == 1  # one fold: nothing to run in parallel
    with pytest.raises(ConfigError, match="--workers 1"):
        resolve_workers(2, 2, "cuda")
    monkeypatch.setattr(parallel, "can_fork", lambda: False)
    with pytest.raises(ConfigError, match="needs fork"):
        resolve_workers(2, 2, "cpu")


@pytest.mark.parametrize("bad", [0, -1, "two", 1.5, True])
def test_a_bad_worker_count_is_refused_in_one_line_before_any_work(bad, demo, tmp_path) -> None:  # noqa: F811
    config, _, _ = demo
    with pytest.raises(ConfigError, match="workers must be 'auto' or an integer >= 1"):
        CompareRun(config, tmp_path / "out", progress=False, workers=bad)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_cli_takes_auto_or_a_number() -> None:
    assert check_workers("auto") == "auto" and check_workers("3") == 3
    assert count_or_auto("auto") == "auto" and count_or_auto("2") == 2
    with pytest.raises(argparse.ArgumentTypeError):
        count_or_auto("many")
