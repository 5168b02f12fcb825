"""The fold loop on a made-up task (tiny model, word-level tokenizer, no shared data): a new task is one
class plus one registry line; a fault mid-run keeps the finished (fold, method) results, and the rerun
finishes with exactly the numbers of an uninterrupted run; another configuration is refused."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from otguard.data import TextDataset
from otguard.errors import ConfigError, OtguardError
from otguard.harness import registry
from otguard.harness.config import CompareConfig
from otguard.harness.run import CompareRun
from otguard.harness.task import SIDE_EFFECT_METRICS, Evaluation, Task
from otguard.hook import attached
from otguard.results import MetricSpec, RunResults
from tests.tiny_models import tiny_lm

GOOD, BAD = "calm kind fair gentle", "cruel wrong rude harsh"
N_GROUPS = 12


def _dataset() -> TextDataset:
    texts, labels, groups = [], [], []
    for g in range(N_GROUPS):
        for k, (words, label) in enumerate([(GOOD, 0), (BAD, 1), (GOOD, 0), (BAD, 1)]):
            texts.append(f"topic{g} is {' '.join(words.split()[k % 2 :])}")
            labels.append(label)
            groups.append(g)
    return TextDataset(
        "demo", tuple(texts), np.array(labels), np.array(groups), tuple(f"g{g}" for g in range(N_GROUPS))
    )


def _tokenizer() -> PreTrainedTokenizerFast:
    words = sorted({w for t in _dataset().texts for w in t.split()} | {"the", "a", "text"})
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")


class DemoTask(Task):
    """A made-up task: the mean last-position logit of the held-out texts, with the policy attached."""

    name: ClassVar[str] = "demo"
    metrics: ClassVar[dict[str, MetricSpec]] = {
        "logit": MetricSpec("Logit", True, "demo", ""),
        **SIDE_EFFECT_METRICS,
    }
    csv_name: ClassVar[str] = "rows.csv"
    csv_fields: ClassVar[tuple[str, ...]] = ("fold", "method", "text", "logit")
    calls: ClassVar[list[tuple[int, str]]] = []
    inits: ClassVar[int] = 0
    preflights: ClassVar[int] = 0
    fail_at: ClassVar[int | None] = None

    def __init__(self, config: CompareConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        type(self).inits += 1
        self.dataset = _dataset()
        self.judge_name = "demo-judge"
        self.test: list[str] = []

    def preflight(self) -> None:
        type(self).preflights += 1

    def start_fold(self, fold: int, split: Any) -> None:
        self.fold = fold
        self.test = [self.dataset.texts[i] for i in split.test]
        self.fold_meta = {"test_rows": len(self.test)}

    def stage3(self, policy: Any) -> Any:
        return policy

    def evaluate(self, method: str, policy: Any) -> Evaluation:
        calls = type(self).calls
        calls.append((self.fold, method))
        if type(self).fail_at == len(calls):
            raise OtguardError("the judge server went away")
        enc = self.tokenizer(self.test, padding=True, return_tensors="pt")
        with attached(policy, self.model, scope="all"), torch.no_grad():
            logits = self.model(**enc).logits[:, -1].float().mean(-1)
        rows = [
            {"fold": self.fold, "method": method, "text": t, "logit": float(v)}
            for t, v in zip(self.test, logits, strict=True)
        ]
        return Evaluation({"logit": float(logits.mean())}, rows)

    @classmethod
    def how_to_read(cls, results: RunResults) -> list[tuple[str, str]]:
        return [("Demo:", "a made-up task of the tests.")]


@pytest.fixture
def demo(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.TASKS, "demo", f"{__name__}:DemoTask")  # the one registry line
    monkeypatch.setenv("OTGUARD_CACHE", str(tmp_path / "cache"))
    DemoTask.calls, DemoTask.inits, DemoTask.preflights, DemoTask.fail_at = [], 0, 0, None
    docs = tmp_path / "docs.txt"
    docs.write_text("the calm text\n\na cruel text is rude\n\nthe topic1 text\n\na kind text")
    tok = _tokenizer()
    model = tiny_lm("llama", len(tok), tok.pad_token_id)
    config = CompareConfig(dataset="demo", methods=("none", "mean-shift", "radiant"), folds=2, batch_size=8,
                           drift_source=str(docs), drift_docs=4, drift_tokens=8,
                           method_params={"mean-shift": {"epochs": 5}, "radiant": {"epochs": 5}})  # fmt: skip
    return config, model, tok


def _numbers(res: RunResults) -> dict[str, Any]:
    return {m: {k: s.to_dict() for k, s in r.metrics.items()} | {"policies": [f.policy for f in r.folds]}
            for m, r in res.methods.items()}  # fmt: skip


def test_a_new_task_is_one_class_and_one_registry_line(demo, tmp_path) -> None:
    config, model, tok = demo
    res = CompareRun(config, tmp_path / "out", progress=False).run(model, tok)
    out = tmp_path / "out"
    saved = RunResults.from_json(out / "results.json")
    assert saved.to_dict() == res.to_dict() and saved.task == "demo"
    assert list(saved.metrics) == ["logit", "ce", "kl", "flag_rate", "edited_heads"]
    assert saved.methods["none"].metrics["kl"].folds == [0.0, 0.0]
    assert saved.config["judge"] == "demo-judge" and saved.config["methods"] == list(config.methods)
    assert [f.meta["test_rows"] for f in saved.methods["radiant"].folds] == [24, 24]
    assert DemoTask.calls == [(f, m) for f in range(2) for m in config.methods] and DemoTask.preflights == 1
    rows = (out / "rows.csv").read_text().splitlines()
    assert rows[0] == "fold,method,text,logit" and len(rows) == 1 + 2 * 24 * 3
    assert "**Demo:** a made-up task of the tests." in (out / "report.md").read_text()
    assert sorted(p.name for p in (out / "partial").iterdir()) == sorted(
        ["run.json"] + [f"fold{f}-{m}.json" for f in range(2) for m in config.methods]
    )


def test_a_fault_keeps_finished_results_and_the_rerun_equals_an_uninterrupted_run(demo, tmp_path) -> None:
    config, model, tok = demo
    whole = CompareRun(config, tmp_path / "whole", progress=False).run(model, tok)
    DemoTask.calls, DemoTask.fail_at = [], 4  # fold 1's first evaluation fails (a judge outage)
    with pytest.raises(OtguardError, match="went away"):
        CompareRun(config, tmp_path / "cut", progress=False).run(model, tok)
    saved = sorted(p.name for p in (tmp_path / "cut" / "partial").glob("fold*.json"))
    assert saved == ["fold0-mean-shift.json", "fold0-none.json", "fold0-radiant.json"]
    assert not (tmp_path / "cut" / "results.json").exists()
    DemoTask.calls, DemoTask.fail_at = [], None
    again = CompareRun(config, tmp_path / "cut", progress=False).run(model, tok)
    assert DemoTask.calls == [(1, m) for m in config.methods]  # only the missing results are computed
    assert again.config["resumed_results"] == 3
    assert _numbers(again) == _numbers(whole)
    assert (tmp_path / "cut" / "rows.csv").read_text() == (tmp_path / "whole" / "rows.csv").read_text()


def test_a_finished_run_is_reassembled_without_model_work(demo, tmp_path, monkeypatch) -> None:
    config, model, tok = demo
    first = CompareRun(config, tmp_path / "out", progress=False).run(model, tok)
    DemoTask.calls, DemoTask.preflights = [], 0

    def no_collect(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("nothing to compute")

    monkeypatch.setattr("otguard.activations.collect", no_collect)
    again = CompareRun(config, tmp_path / "out", progress=False).run(model, tok)
    assert DemoTask.calls == [] and DemoTask.preflights == 0
    assert _numbers(again) == _numbers(first)


def test_another_configuration_is_refused_before_any_work_unless_forced(demo, tmp_path) -> None:
    config, model, tok = demo
    CompareRun(config, tmp_path / "out", progress=False).run(model, tok)
    inits = DemoTask.inits
    other = CompareConfig(**{**config.__dict__, "folds": 3})
    with pytest.raises(ConfigError, match=r"folds: 2 saved, 3 now.*pass force=True to discard them"):
        CompareRun(other, tmp_path / "out", progress=False)
    assert DemoTask.inits == inits  # refused before the task loaded anything
    res = CompareRun(other, tmp_path / "out", progress=False, force=True).run(model, tok)
    assert len(res.methods["none"].folds) == 3
    assert json.loads((tmp_path / "out" / "partial" / "run.json").read_text())["config"]["folds"] == 3


def test_a_foreign_folder_is_refused_before_the_task_loads(demo, tmp_path) -> None:
    config, _, _ = demo
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OtguardError, match="is not empty"):
        CompareRun(config, out, progress=False)
    assert DemoTask.inits == 0 and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_compare_folder_from_before_the_marker_is_accepted(demo, tmp_path) -> None:
    config, _, _ = demo
    out = tmp_path / "old"
    out.mkdir()
    for name in ("results.json", "answers.csv", "report.md", "tradeoff.png"):
        (out / name).write_text("from an earlier otguard")
    run = CompareRun(config, out, progress=False)
    assert run.out == out.resolve() and DemoTask.inits == 1


class SweepDemoTask(DemoTask):
    """DemoTask with sweeps: validation scores from the validation rows, frontier figures from the test
    rows; ``poison`` replaces the test rows by other texts (the choice must not move)."""

    supports_sweep: ClassVar[bool] = True
    poison: ClassVar[bool] = False
    validated: ClassVar[list[list[str]]] = []

    def start_fold(self, fold: int, split: Any) -> None:
        super().start_fold(fold, split)
        self.val = [self.dataset.texts[i] for i in split.val]
        if type(self).poison:
            self.test = [" ".join(reversed(t.split())) for t in self.test]

    def _mean_logit(self, texts: list[str], policy: Any) -> float:
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        with attached(policy, self.model, scope="all"), torch.no_grad():
            return float(self.model(**enc).logits[:, -1].float().mean())

    def validate(self, points: dict[str, Any], metrics: dict[str, str]) -> dict[str, dict[str, float]]:
        type(self).validated.append(list(self.val))
        return {k: {"mc2": self._mean_logit(self.val, p)} for k, p in points.items()}

    def frontier(self, points: dict[str, Any]) -> dict[str, dict[str, float]]:
        return {k: {"mc2": self._mean_logit(self.test, p)} for k, p in points.items()}


@pytest.fixture
def sweep_demo(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.TASKS, "demo", f"{__name__}:SweepDemoTask")
    monkeypatch.setenv("OTGUARD_CACHE", str(tmp_path / "cache"))
    SweepDemoTask.calls, SweepDemoTask.fail_at, SweepDemoTask.validated = [], None, []
    SweepDemoTask.poison = False
    docs = tmp_path / "docs.txt"
    texts = [f"the text {w} topic{i} is a text" for i in range(6) for w in ("calm", "rude")]
    docs.write_text("\n\n".join(texts))
    tok = _tokenizer()
    model = tiny_lm("llama", len(tok), tok.pad_token_id)
    grid = [{"strength": s} for s in (0.25, 1.0, 4.0)]
    config = CompareConfig(dataset="demo", methods=("none", "mean-shift"), folds=2, batch_size=8,
                           drift_source=str(docs), drift_docs=4, drift_tokens=8, sweep_docs=6,
                           grids={"mean-shift": grid}, kl_budget=None,
                           method_params={"mean-shift": {"epochs": 5}})  # fmt: skip
    return config, model, tok


def _choices(res: RunResults) -> list[Any]:
    return [f.meta.get("grid_point") for f in res.methods["mean-shift"].folds]


def test_the_sweep_choice_never_reads_the_test_split(sweep_demo, tmp_path) -> None:
    config, model, tok = sweep_demo
    clean = CompareRun(config, tmp_path / "clean", progress=False).run(model, tok)
    validated_clean = list(SweepDemoTask.validated)
    SweepDemoTask.poison, SweepDemoTask.validated = True, []
    poisoned = CompareRun(config, tmp_path / "poisoned", progress=False).run(model, tok)
    sweep_c, sweep_p = clean.methods["mean-shift"].sweep, poisoned.methods["mean-shift"].sweep
    assert sweep_c is not None and sweep_p is not None
    assert [p.params for p in sweep_c] == [{"strength": s, "epochs": 5} for s in (0.25, 1.0, 4.0)]
    # The same validation rows, scores and choices; different test figures.
    assert SweepDemoTask.validated == validated_clean and len(validated_clean) == 2
    assert [p.validation for p in sweep_c] == [p.validation for p in sweep_p]
    assert _choices(clean) == _choices(poisoned) and None not in _choices(clean)
    assert [p.test["mc2"] for p in sweep_c] != [p.test["mc2"] for p in sweep_p]
    # The choice is the best validation score (no budget), fold by fold.
    for fold in range(2):
        rows = [next(f for f in p.folds if f.fold == fold) for p in sweep_c]
        best = max(range(3), key=lambda i: rows[i].validation["mc2"])
        assert [r.selected for r in rows] == [i == best for i in range(3)]
    assert clean.selection is not None and clean.selection.kl_budget is None
    # the unsteered model measured on the frontier's own rows, as the plot's reference
    ref = clean.selection.extra["reference"]
    assert ref["kl"] == 0.0 and ref["mc2"] == pytest.approx(
        np.mean([f.meta["frontier_reference"]["mc2"] for f in clean.methods["mean-shift"].folds]), abs=1e-12
    )
    # Validation KL was measured on documents the test KL does not use.
    assert all(p.validation["kl"] is not None for p in sweep_c)
