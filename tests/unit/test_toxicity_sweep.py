"""Sweeps of the toxicity task: validation prompts of the validation groups only (a poison test on the
test groups' prompts), one frontier row per grid point with the unsteered reference, paired seeding, the
selection metric per task, and the report's toxicity frontier."""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from otguard.data import group_kfold
from otguard.errors import ConfigError
from otguard.evaluation import toxicity_gen
from otguard.evaluation.toxicity_gen import continuation_perplexity
from otguard.evaluation.toxicity_metrics import mean_perplexity
from otguard.harness.config import CompareConfig
from otguard.harness.run import CompareRun
from otguard.harness.sweep import budget_flags, select_point, selection_record, task_selection_metrics
from otguard.harness.toxicity import ToxicityTask
from otguard.harness.toxicity_sweep import NONTOXIC, SWEEP_SAMPLES
from tests.tiny_models import tiny_lm, word_tokenizer

GROUPS = ("alpha", "beta", "delta", "gamma", "omega")  # sorted: group id = rank
GRID = [{"strength": s} for s in (0.25, 1.0, 4.0)]


class HashScorer:
    """A fake offline scorer: a fixed pseudo-random score per text."""

    name = "hash-scorer"
    measure = "hash score"

    def score(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([zlib.crc32(t.encode()) % 1000 / 1000 for t in texts])


def _write_toxigen(root: Path) -> Path:
    """Five groups of ToxiGen-style prompt files over the word tokenizer's vocabulary (hate: w0-w44,
    neutral: w45-w89); each line a "- s1\\n- s2\\n-" prompt of three statements."""
    folder = root / "toxigen" / "prompts"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for g, group in enumerate(GROUPS):
        for kind, base in (("hate", 0), ("neutral", 45)):
            statements = [" ".join(f"w{base + int(w)}" for w in rng.integers(0, 45, 4)) for _ in range(8)]
            lines = []
            for i in range(12):
                picked = [statements[(i + k * (g + 1)) % 8] for k in range(3)]
                lines.append("\\n".join(f"- {s}" for s in picked) + "\\n-")
            (folder / f"{kind}_{group}_1k.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def toy(monkeypatch, tmp_path):
    return make_toy(monkeypatch, tmp_path)


def make_toy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[CompareConfig, Any, Any]:
    """A toxigen run over five toy groups with the fake scorer: (config, tiny model, tokenizer)."""
    monkeypatch.setenv("OTGUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("otguard.evaluation.factory.make_scorer", lambda *a, **k: HashScorer())
    data = _write_toxigen(tmp_path / "data")
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(" ".join(f"w{(7 * i + j) % 90}" for j in range(12)) for i in range(8)))
    tok = word_tokenizer(padding_side="left")
    model = tiny_lm("llama", len(tok), tok.pad_token_id)
    config = CompareConfig(
        dataset="toxigen", data_dir=str(data), methods=("none", "mean-shift"), folds=2, batch_size=8,
        prompts_per_group=3, samples=3, continuation_tokens=3, drift_source=str(docs), drift_docs=4,
        drift_tokens=8, sweep_docs=4, sweep_questions=6, frontier_questions=4, kl_budget=None, bootstrap=0,
        grids={"mean-shift": GRID}, method_params={"mean-shift": {"epochs": 3}},
    )  # fmt: skip
    return config, model, tok


def _poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace every test prompt (the fold's test groups' hate and neutral prompts) by other text."""
    real = toxicity_gen.toxigen_prompt_set

    def poisoned(*args: Any, **kwargs: Any) -> list[toxicity_gen.Prompt]:
        return [
            toxicity_gen.Prompt("w89 w88 w87 " + p.text[::-1], p.group, p.kind) for p in real(*args, **kwargs)
        ]

    monkeypatch.setattr(toxicity_gen, "toxigen_prompt_set", poisoned)


# ------------------------------------------------------------------------------------------ the task


def test_validation_prompts_are_a_seeded_sample_of_the_validation_groups_only(toy) -> None:
    config, model, tok = toy
    task = ToxicityTask(config, progress=False)
    for fold in (0, 1):
        split = group_kfold(task.dataset, n_folds=2, fold=fold, val_ratio=config.val_ratio, seed=42)
        task.start_fold(fold, split)
        val = {GROUPS[g] for g in np.unique(task.dataset.groups[split.val])}
        test = {GROUPS[g] for g in np.unique(task.dataset.groups[split.test])}
        assert val and not val & test and task.sweep_groups == sorted(val)
        assert len(task.sweep_prompts) == 6 and {p.group for p in task.sweep_prompts} <= val
        texts = {p.text for p in task.sweep_prompts}
        assert not texts & {p.text for p in task.prompts + task.neutral}
        # the frontier: a seeded sample of the fold's own test prompts, a quarter as many neutral ones
        assert len(task.frontier_prompts) == 4 and set(task.frontier_prompts) <= set(task.prompts)
        assert len(task.frontier_neutral) == 1 and set(task.frontier_neutral) <= set(task.neutral)
        assert task.fold_meta["sweep_groups"] == sorted(val) and task.fold_meta["sweep_samples"] == 2
        again = ToxicityTask(config, progress=False)
        again.start_fold(fold, split)
        assert again.sweep_prompts == task.sweep_prompts and again.frontier_prompts == task.frontier_prompts
    other = ToxicityTask(CompareConfig(**{**config.__dict__, "seed": 3}), progress=False)
    other.start_fold(1, split)
    assert other.sweep_prompts != task.sweep_prompts


def test_every_grid_point_sees_the_same_prompts_and_seed(toy, monkeypatch) -> None:
    """validate and frontier: one sampling call per distinct policy, all with the same prompts, seed,
    batch size and sample count; the figures are 1 - the mean score of exactly those samples."""
    config, model, tok = toy
    task = ToxicityTask(config, progress=False)
    task.bind(model, tok)
    task.start_fold(0, group_kfold(task.dataset, n_folds=2, fold=0, val_ratio=config.val_ratio, seed=42))
    calls: list[dict[str, Any]] = []
    real = toxicity_gen.sample_continuations

    def spy(model: Any, tokenizer: Any, prompts: Sequence[str], **kwargs: Any) -> Any:
        calls.append({"prompts": list(prompts), **{k: v for k, v in kwargs.items() if k != "policy"}})
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(toxicity_gen, "sample_continuations", spy)
    shared = object()  # a stand-in policy object: keys holding the same object share one pass
    monkeypatch.setattr(task, "_sweep_sample", _unsteered(task, task._sweep_sample))
    points = {"m#0": None, "m#1": shared, "m#2": shared, "none#reference": None}
    got = task.validate(points, {k: NONTOXIC for k in points})
    assert len(calls) == 2 and calls[0] == calls[1]
    assert calls[0]["prompts"] == [p.text for p in task.sweep_prompts]
    assert calls[0]["n"] == SWEEP_SAMPLES and calls[0]["seed"] == config.seed + 500
    direct = real(model, tok, [p.text for p in task.sweep_prompts], n=2, max_new_tokens=3, top_p=0.9,
                  seed=config.seed + 500, batch_size=4)  # fmt: skip
    want = 1.0 - HashScorer().score([t for ts in direct.texts for t in ts]).mean()
    assert got["m#0"][NONTOXIC] == pytest.approx(want, abs=1e-12)
    # the perplexity of the same continuations under the fluency model (here the model itself)
    ppl = mean_perplexity(continuation_perplexity(model, direct.prompt_ids, direct.token_ids, batch_size=4))
    assert got["m#0"]["ppl"] == pytest.approx(ppl[0], rel=1e-6)
    same = {NONTOXIC: got["m#0"][NONTOXIC], "ppl": got["m#0"]["ppl"], "ppl_ratio": 1.0}
    assert got == {k: same for k in points}  # all unsteered here
    calls.clear()
    front = task.frontier(points)
    assert len(calls) == 4 and calls[0] == calls[2] and calls[1] == calls[3]  # hate, neutral per policy
    assert calls[0]["prompts"] == [p.text for p in task.frontier_prompts]
    assert calls[1]["prompts"] == [p.text for p in task.frontier_neutral]
    assert set(front) == set(points) and set(front["m#0"]) == {"tox_mean", "neutral_tox_mean", "ppl"}
    with pytest.raises(ValueError, match="nontoxic, not mc2"):
        task.validate(points, {k: "mc2" for k in points})


def _unsteered(task: ToxicityTask, sample: Any) -> Any:
    """``_sweep_sample`` with the stand-in policy object replaced by None (no hook to attach)."""
    return lambda prompts, policy, seed: sample(prompts, None, seed)


# -------------------------------------------------------------------------------- the whole run


def test_the_choice_never_reads_the_test_prompts_and_the_frontier_has_every_point(toy, tmp_path, monkeypatch):
    config, model, tok = toy
    clean = CompareRun(config, tmp_path / "clean", progress=False).run(model, tok)
    _poison(monkeypatch)
    poisoned = CompareRun(config, tmp_path / "poisoned", progress=False).run(model, tok)
    sweep, bad = clean.methods["mean-shift"].sweep, poisoned.methods["mean-shift"].sweep
    assert sweep is not None and bad is not None and len(sweep) == len(GRID) == len(bad)
    points = [{**p, "epochs": 3} for p in GRID]  # the fixed parameter joins every point
    assert [p.params for p in sweep] == points
    for a, b in zip(sweep, bad, strict=True):
        # the ppl figures too: the validation continuations are of validation prompts only
        assert a.validation == b.validation and a.selected_folds == b.selected_folds
        assert set(a.validation) == {NONTOXIC, "kl", "ppl", "ppl_ratio"}
        assert {"tox_mean", "neutral_tox_mean", "kl", "ppl"} <= set(a.test)
    chosen = [f.meta["grid_point"] for f in clean.methods["mean-shift"].folds]
    assert chosen == [f.meta["grid_point"] for f in poisoned.methods["mean-shift"].folds]
    # the poison did reach the test side: the frontier's and the rows' test figures moved
    assert [p.test["tox_mean"] for p in sweep] != [p.test["tox_mean"] for p in bad]
    assert [p.test["ppl"] for p in sweep] != [p.test["ppl"] for p in bad]
    refs = [f.meta["validation_reference"] for f in clean.methods["mean-shift"].folds]
    assert refs == [f.meta["validation_reference"] for f in poisoned.methods["mean-shift"].folds]
    assert clean.summary("none", "tox_mean") != poisoned.summary("none", "tox_mean")
    # each fold's choice is select_point on that fold's own validation rows
    saved = json.loads((tmp_path / "clean" / "results.json").read_text())
    unbudgeted: list[bool] = []
    for fold, record in enumerate(saved["methods"]["mean-shift"]["folds"]):
        rows = record["sweep"]  # a fold record's facts sit next to its fold number
        assert config.ppl_budget == 1.5  # the toxicity task's default ("auto")
        val = [r["validation"] for r in rows]
        want, within = select_point(val, NONTOXIC, None, {"ppl_ratio": 1.5})
        assert [r["selected"] for r in rows] == [i == want for i in range(len(GRID))], fold
        assert [r["within_budget"] for r in rows] == budget_flags(val, None, {"ppl_ratio": 1.5})
        assert rows[want]["within_budget"] is within
        unbudgeted.append(select_point(val, NONTOXIC, None)[0] != want)
        ref = record["validation_reference"]["ppl"]
        assert [r["ppl_ratio"] for r in val] == pytest.approx([r["ppl"] / ref for r in val], rel=1e-12)
        assert record["grid_point"] == points[want]
        assert set(record["sweep_groups"]) < set(record["detector_groups"])  # validation groups, never test
        assert not set(record["sweep_groups"]) & set(record["eval_groups"])
        assert record["frontier_reference"]["kl"] == 0.0 and "tox_mean" in record["frontier_reference"]
    assert any(unbudgeted)  # the budget changed a choice here (the best nontoxic point was too perplexing)
    sel = saved["selection"]
    assert sel["ppl_budget"] == 1.5 and "(under the fluency model) <= 1.5x the unsteered" in sel["rule"]
    assert sel["metric"] == NONTOXIC and "validation groups" in sel["validation_questions"]
    assert "nontoxic" in sel["rule"] and sel["reference"]["tox_mean"] is not None
    report = (tmp_path / "clean" / "report.md").read_text()
    assert "Hyper-parameter sweeps" in report and "Pareto points: test Mean toxicity vs. test KL" in report
    assert "Validation Non-toxicity (1 − mean toxicity)" in report and "4 test prompts." in report
    assert "Down and to the left is better." in report and (tmp_path / "clean" / "frontier.png").is_file()


# ------------------------------------------------------------------------------------ configuration


def test_select_by_defaults_per_task_and_grids_are_accepted_for_toxigen(toy) -> None:
    config, _, _ = toy
    assert config.select_by == NONTOXIC and CompareConfig().select_by == "mc2"
    assert task_selection_metrics("toxigen") == (NONTOXIC,)
    assert task_selection_metrics("truthfulqa") == ("mc2", "true", "true_x_info")
    with pytest.raises(ConfigError, match="select_by must be one of nontoxic; got 'mc2'"):
        CompareConfig(**{**config.__dict__, "select_by": "mc2"})
    with pytest.raises(ConfigError, match="select_by must be one of mc2, true, true_x_info; got 'nontoxic'"):
        CompareConfig(select_by=NONTOXIC)
    with pytest.raises(ConfigError, match="TruthfulQA-only"):
        CompareConfig(**{**config.__dict__, "max_false_flag_rate": 0.3})
    record = selection_record(config)
    assert record["metric"] == NONTOXIC and record["samples_per_prompt"] == 2
    assert "4 test hate prompts" in record["frontier"] and "questions" not in record["validation_questions"]
    assert "True×Info" in selection_record(CompareConfig())["rule"]
