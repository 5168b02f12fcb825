"""`otguard compare` end to end on a tiny random model with the real tokenizer and data.

Also: the held-out questions of a fold never reach fitting, layer choice or Stage 3; the `none` MC
figures are a plain `score_mc` call; an LLM judge is checked before the model loads, and a judge that
fails late leaves the finished (fold, method) results on disk for the rerun.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from otguard import cli
from otguard.cli import runtime
from otguard.data import group_kfold, truthfulqa_items, truthfulqa_mc2
from otguard.errors import OtguardError
from otguard.harness import CompareConfig, rescore_toxicity, run_compare
from otguard.harness.toxicity import toxicity_metrics
from otguard.results import RunResults
from tests.scripted_server import Reply, ScriptedServer, clear_proxies
from tests.tiny_models import tiny_llama

pytestmark = pytest.mark.slow

GATED = ("radiant", "slim")


@pytest.fixture
def tiny_model(smollm2, tmp_path, monkeypatch):
    _, tok = smollm2
    monkeypatch.setenv("OTGUARD_CACHE", str(tmp_path / "cache"))
    # Near-uniform next-token distributions (small init): perplexity ~ the 49k vocabulary.
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=None)
    model = tiny_llama(name="tiny-random-llama", initializer_range=0.02, max_position_embeddings=1024, **ids)
    return model, tok


@pytest.fixture
def docs(tmp_path) -> Path:
    path = tmp_path / "docs.txt"
    path.write_text("The cat sat on the mat.\n\nRain fell on the quiet town all night long.\n\nA third text.")
    return path


def _quick(data_dir: Path, docs: Path, **changes: Any) -> CompareConfig:
    methods = changes.pop("methods", ("none", "iti", "mean-shift", "radiant", "slim"))
    base = dict(data_dir=str(data_dir), methods=methods, folds=2, limit=10, batch_size=8, judge="sem",
                sweep=False, max_new_tokens=6, transfer_questions=3, drift_source=str(docs), drift_docs=2,
                drift_tokens=16, stage3_questions=2, kappa_grid=(5.0, 20.0),
                method_params={m: {"epochs": 20} for m in methods if m != "none"})  # fmt: skip
    return CompareConfig(**{**base, **changes})


def _csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text(encoding="utf-8").splitlines(keepends=True)))


def _csv_set(path: Path) -> Path:
    """A transfer set of three questions in the TruthfulQA CSV layout."""
    head = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
    rows = "".join(f"Adversarial,Misc,What is {k} plus {k}?,{2 * k},{2 * k}; {2 * k}.0,{2 * k + 1},\n"
                   for k in range(1, 4))  # fmt: skip
    path.write_text(head + rows, encoding="utf-8")
    return path


def test_compare_writes_results_answers_and_report(tiny_model, data_dir, docs, tmp_path) -> None:
    model, tok = tiny_model
    sums = _csv_set(tmp_path / "sums.csv")
    config = _quick(data_dir, docs, transfer=("nqopen", str(sums)))
    results = run_compare(model, tok, config, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    for name in ("results.json", "answers.csv", "report.md", "report.html"):
        assert (out / name).is_file(), name
    saved = RunResults.from_json(out / "results.json")
    assert saved.to_dict() == results.to_dict() and saved.task == "truthfulqa"
    assert saved.config["methods"] == list(config.methods) and saved.method_ids == list(config.methods)
    for method in config.methods:
        for metric in ("mc1", "mc2", "true", "info", "true_x_info_product", "true_x_info_joint", "ce", "kl",
                       "nq_true"):  # fmt: skip
            assert len(saved.summary(method, metric).folds) == 2, (method, metric)
        assert len(saved.methods[method].folds) == 2
    assert saved.summary("none", "kl").mean == 0.0
    assert saved.summary("none", "flag_rate") is None and saved.summary("radiant", "flag_rate") is not None
    assert saved.methods["slim"].folds[0].policy["kappa"] in (5.0, 20.0)
    assert saved.methods["radiant"].folds[0].detector.per_layer["fpr"]
    rows = (out / "answers.csv").read_text().splitlines()
    assert rows[0] == "fold,method,question,answer,true" and len(rows) == 1 + 5 * 10
    assert saved.metrics["mc1"].group == "mc"
    assert "<html" in (out / "report.html").read_text().lower()
    # issue 11: repair/harm and paired intervals against none, the gate, named judges, sample std
    assert saved.std_ddof == 1
    assert saved.metrics["true"].label == "True (SEM, MiniLM)" and "sem" not in saved.metrics  # not twice
    assert saved.metrics["info"].label == "Info (non-refusal)"
    assert saved.judges["true"]["validated"] is False and "bleu_true" in saved.judges
    for method in config.methods[1:]:
        for metric in ("repair_rate", "harm_rate", "mc1_repair_rate", "mc1_harm_rate"):
            assert len(saved.summary(method, metric).folds) == 2, (method, metric)
        for metric in ("mc1", "true", "true_x_info_product", "repair_rate", "nq_true", "sums_true"):
            delta = saved.summary(method, metric).delta_vs_none
            assert delta is not None and delta.resamples == 2000 and None not in delta.ci95, (method, metric)
        mc1, none_mc1 = saved.summary(method, "mc1"), saved.summary("none", "mc1")
        assert mc1.delta_vs_none.mean == pytest.approx(mc1.mean - none_mc1.mean, abs=1e-12)
    assert saved.summary("none", "repair_rate") is None and saved.summary("none", "mc1").delta_vs_none is None
    for method in config.methods:
        product = saved.summary(method, "true_x_info_product")
        want = saved.summary(method, "true").mean * saved.summary(method, "info").mean
        assert product.mean == pytest.approx(want, abs=1e-12)  # the product of the fold means
    for gated in GATED:
        for metric in ("false_flag_rate", "catch_rate", "gate_auroc", "guarantee_share"):
            assert len(saved.summary(gated, metric).folds) == 2, (gated, metric)
        gate = saved.methods[gated].folds[0].meta["gate"]
        assert gate["n_true_positions"] > 0 and gate["n_false_positions"] > 0 and "bank" in gate
    from otguard.methods import get_method

    gamma = get_method("slim").get_params()["gamma"]
    assert saved.summary("slim", "guarantee_nominal").mean == pytest.approx(1 - gamma, abs=1e-12)
    assert saved.summary("iti", "false_flag_rate") is None  # ungated: no gate to measure
    assert saved.metrics["sums_true"].label == "sums True (SEM, MiniLM)" and "sums_sem" not in saved.metrics
    assert saved.methods["none"].folds[0].meta["transfer_questions"] == {"nqopen": 2, str(sums): 2}
    part = json.loads((out / "partial" / "fold0-slim.json").read_text())
    assert set(part["items"]) == {"test", "nq_", "sums_"} and len(part["items"]["test"]["ids"]) == 5
    assert "stage3_seconds" in part["record"]
    report = (out / "report.md").read_text()
    assert "Difference to none, with its 95 % paired bootstrap interval" in report
    assert "sample standard deviation (ddof = 1)" in report and "The gate: point of use" in report
    assert (out / "repair.png").is_file()


def test_none_is_the_reference_even_when_not_requested(tiny_model, data_dir, tmp_path) -> None:
    model, tok = tiny_model
    config = CompareConfig(data_dir=str(data_dir), methods=("radiant",), folds=2, limit=6, max_new_tokens=4,
                           transfer_questions=0, drift_source=None, judge="sem",
                           method_params={"radiant": {"epochs": 20}})  # fmt: skip
    saved = run_compare(model, tok, config, tmp_path / "out", progress=False)
    assert saved.method_ids == ["radiant"] and list(saved.methods) == ["radiant"]
    assert saved.summary("radiant", "repair_rate") is not None
    assert saved.summary("radiant", "mc1").delta_vs_none is not None
    saved_files = sorted(p.name for p in (tmp_path / "out" / "partial").glob("fold*.json"))
    assert saved_files == ["fold0-none.json", "fold0-radiant.json", "fold1-none.json", "fold1-radiant.json"]
    assert {r["method"] for r in _csv(tmp_path / "out" / "answers.csv")} == {"radiant"}


def test_fold_test_questions_never_reach_fitting_layer_choice_or_stage3(
    tiny_model, data_dir, docs, tmp_path, monkeypatch
) -> None:
    import otguard.methods as methods_module
    import otguard.methods.stage3 as stage3_module

    model, tok = tiny_model
    seen: list[tuple[str, list[int]]] = []  # ("fit"|"stage3", group ids), in call order
    real_get, real_select = methods_module.get_method, stage3_module.select_kappa

    def spy_get(name: str, **params: Any) -> Any:
        method = real_get(name, **params)
        real_fit = method.fit_grid

        def fit_grid(acts: Any, train_idx: Any, val_idx: Any, grid: Any) -> Any:
            rows = np.concatenate([np.asarray(train_idx), np.asarray(val_idx)])
            seen.append(("fit", sorted(set(np.asarray(acts.groups)[rows].tolist()))))
            return real_fit(acts, train_idx, val_idx, grid)

        method.fit_grid = fit_grid  # type: ignore[method-assign]
        return method

    def spy_select(policy: Any, model: Any, tokenizer: Any, items: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(("stage3", [questions.index(it.question) for it in items]))
        return real_select(policy, model, tokenizer, items, *args, **kwargs)

    questions = [it.question for it in truthfulqa_items(data_dir)[:10]]
    monkeypatch.setattr(methods_module, "get_method", spy_get)
    monkeypatch.setattr(stage3_module, "select_kappa", spy_select)
    config = _quick(data_dir, docs, methods=("none", "radiant", "slim"), transfer_questions=0)
    run_compare(model, tok, config, tmp_path / "out", progress=False)
    tested = {k: {questions.index(r["question"]) for r in _csv(tmp_path / "out" / "answers.csv")
                  if r["fold"] == str(k) and r["method"] == "none"} for k in range(2)}  # fmt: skip
    assert tested[0] and tested[1] and not tested[0] & tested[1] and tested[0] | tested[1] == set(range(10))
    fits = [groups for kind, groups in seen if kind == "fit"]
    assert len(fits) == 2 * 3 and any(kind == "stage3" for kind, _ in seen)
    n_fits = 0
    for kind, groups in seen:  # the three methods of fold 0 are fitted (and tuned) before those of fold 1
        n_fits += kind == "fit"
        fold = (n_fits - 1) // 3
        assert groups, kind
        assert not set(groups) & tested[fold], (kind, fold, groups)
        if kind == "fit":
            assert set(groups) == set(range(10)) - tested[fold]  # all of the rest: train and validation


def test_sweeps_choose_on_validation_questions_and_record_every_grid_point(
    tiny_model, data_dir, tmp_path, monkeypatch
) -> None:
    from otguard.harness import truthfulqa_sweep
    from otguard.harness.sweep import select_point

    model, tok = tiny_model
    docs = tmp_path / "many.txt"
    docs.write_text("\n\n".join(f"Document {i} is about the weather in town {i}." for i in range(8)))
    validated: dict[int, list[str]] = {}
    real_validate = truthfulqa_sweep.TruthfulQASweeps.validate

    def spy(self: Any, points: Any, metrics: Any) -> Any:
        assert len(self.sweep_items) == min(3, len(self.val_all))
        validated[self.fold] = [it.question for it in self.sweep_items]
        return real_validate(self, points, metrics)

    monkeypatch.setattr(truthfulqa_sweep.TruthfulQASweeps, "validate", spy)
    grids = {"mean-shift": [{"strength": 0.5}, {"strength": 4.0}], "slim": [{"kappa": 5.0}, {"kappa": 40.0}]}
    config = _quick(data_dir, docs, methods=("none", "mean-shift", "slim"), transfer_questions=0, sweep=True,
                    grids=grids, kl_budget=0.5, sweep_docs=4, drift_docs=4, frontier_questions=2,
                    sweep_questions=3)  # fmt: skip
    saved = run_compare(model, tok, config, tmp_path / "out", progress=False)
    tested = {k: {r["question"] for r in _csv(tmp_path / "out" / "answers.csv")
                  if r["fold"] == str(k) and r["method"] == "none"} for k in range(2)}  # fmt: skip
    assert set(validated) == {0, 1}
    for fold in (0, 1):
        assert validated[fold] and not set(validated[fold]) & tested[fold]  # never a test question
    assert saved.selection is not None and saved.selection.kl_budget == 0.5
    reference = saved.selection.extra["reference"]  # none on the frontier's questions
    assert reference["kl"] == 0.0 and reference["mc2"] is not None and reference["true"] is not None
    for method in ("mean-shift", "slim"):
        sweep = saved.methods[method].sweep
        assert sweep is not None and len(sweep) == 2
        for fold in (0, 1):
            rows = [next(f for f in p.folds if f.fold == fold) for p in sweep]
            for r in rows:
                assert set(r.validation) >= {"mc2", "kl"} and set(r.test) >= {"mc2", "kl", "true"}
            want, _ = select_point([r.validation for r in rows], "mc2", 0.5)
            assert [r.selected for r in rows] == [i == want for i in range(2)], (method, fold)
            chosen = saved.methods[method].folds[fold].meta["grid_point"]
            assert chosen == sweep[want].params
            assert rows[want].test["kl"] >= 0.0 and rows[want].test["mc2"] is not None
    assert "Hyper-parameter sweeps" in (tmp_path / "out" / "report.md").read_text()


def test_none_mc_figures_equal_a_direct_score_mc_call(tiny_model, data_dir, tmp_path) -> None:
    from otguard.evaluation.truthfulqa_mc import score_mc

    model, tok = tiny_model
    config = CompareConfig(data_dir=str(data_dir), methods=("none",), folds=2, limit=10, max_new_tokens=4,
                           transfer_questions=0, drift_source=None, judge="sem")  # fmt: skip
    saved = run_compare(model, tok, config, tmp_path / "out", progress=False)
    dataset = truthfulqa_mc2(data_dir).limit_groups(10)
    items = truthfulqa_items(data_dir)[:10]
    for fold in range(2):
        split = group_kfold(dataset, n_folds=2, fold=fold, val_ratio=0.2, seed=42)
        test = [items[g] for g in np.unique(dataset.groups[split.test])]
        direct = score_mc(model, tok, test, batch_size=64, progress=False)
        for metric in ("mc1", "mc2", "mc3"):
            assert saved.summary("none", metric).folds[fold] == getattr(direct, metric), (fold, metric)


def test_toxicity_compare_writes_results_continuations_and_report(
    tiny_model, data_dir, docs, tmp_path
) -> None:
    model, tok = tiny_model
    methods = ("none", "mean-shift", "radiant", "slim")
    config = CompareConfig(
        dataset="toxigen", data_dir=str(data_dir), methods=methods, folds=2, batch_size=8,
        prompts_per_group=1, samples=2, continuation_tokens=4, drift_source=str(docs), drift_docs=2,
        drift_tokens=16, method_params={m: {"epochs": 20} for m in methods[1:]}, sweep_questions=4,
        frontier_questions=4,  # the default grids' sweep on a few prompts (its own test checks the rule)
    )  # fmt: skip
    results = run_compare(model, tok, config, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    for name in ("results.json", "continuations.csv", "report.md", "report.html"):
        assert (out / name).is_file(), name
    saved = RunResults.from_json(out / "results.json")
    assert saved.to_dict() == results.to_dict() and saved.task == "toxicity"
    assert saved.config["judge"].startswith("embedding")  # the report names the scorer
    rows = _csv(out / "continuations.csv")
    for method in methods:
        for metric in ("tox_max", "tox_prob", "tox_mean", "neutral_tox_mean", "ppl", "dist1", "dist2",
                       "dist3", "ce", "kl"):  # fmt: skip
            assert len(saved.summary(method, metric).folds) == 2, (method, metric)
        # The toxicity figures are the metrics of the scores written to continuations.csv.
        for fold in range(2):
            per_kind: dict[str, dict[str, list[float]]] = {"hate": {}, "neutral": {}}
            for r in rows:
                if r["method"] == method and r["fold"] == str(fold):
                    per_kind[r["kind"]].setdefault(r["prompt"], []).append(float(r["toxicity"]))
            want = toxicity_metrics(list(per_kind["hate"].values()), list(per_kind["neutral"].values()))
            for key, value in want.items():
                assert saved.summary(method, key).folds[fold] == pytest.approx(value, abs=1e-12), (
                    method,
                    key,
                )
        # A random model over a 49k vocabulary has perplexity ~49k: every value is >= 10^4, left out of
        # the mean as the protocol says, so the mean is missing (null), never a made-up number.
        assert saved.summary(method, "ppl").mean is None
    for gated in GATED:
        assert (
            saved.summary(gated, "flag_toxic") is not None
            and saved.summary(gated, "flag_neutral") is not None
        )
        assert saved.methods[gated].folds[0].detector.per_layer["fpr"]
    assert saved.summary("none", "flag_toxic") is None and saved.summary("none", "kl").mean == 0.0
    evaluated = []
    for rec in saved.methods["radiant"].folds:  # detector groups never include evaluated ones
        assert rec.meta["eval_groups"] and not set(rec.meta["eval_groups"]) & set(rec.meta["detector_groups"])
        evaluated += rec.meta["eval_groups"]
    assert sorted(evaluated) == sorted(set(evaluated)) and len(evaluated) == 16  # folds partition groups
    header = (out / "continuations.csv").read_text().splitlines()[0]
    assert header == "fold,method,kind,group,prompt,sample,continuation,toxicity"
    # 16 ToxiGen groups, one hate prompt each, 2 samples, 4 methods
    assert sum(1 for r in rows if r["kind"] == "hate") == 16 * 2 * len(methods)
    assert saved.metrics["tox_max"].group == "toxicity"
    report = (out / "report.md").read_text()
    assert "Toxicity of sampled continuations" in report and "Toxicity vs. fluency" in report

    # Rescoring the saved continuations with the same scorer reproduces the toxicity metrics.
    again = rescore_toxicity(out, "embedding", tmp_path / "rescored")
    for method in methods:
        for metric in ("tox_max", "tox_prob", "tox_mean", "neutral_tox_mean"):
            a, b = saved.summary(method, metric).folds, again.summary(method, metric).folds
            assert b == pytest.approx(a, abs=1e-6), (method, metric)
        assert again.summary(method, "ppl") == saved.summary(method, "ppl")
    assert (tmp_path / "rescored" / "report.html").is_file()
    assert again.config["rescored_from"] == str(out.resolve())
    # the same scorer, validated again on the same held-out statements: the same record
    assert again.judges["toxicity"] == saved.judges["toxicity"] and again.judges["toxicity"]["validated"]


# ------------------------------------------------------------------------------------- the LLM judge


def _judge_reply(body: dict[str, Any]) -> Reply:
    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
    top = {" yes": math.log(0.7), " no": math.log(0.3)}
    choices = [{"index": i, "text": " yes", "logprobs": {"top_logprobs": [top]}} for i in range(len(prompts))]
    return 200, {}, {"object": "text_completion", "model": body["model"], "choices": choices}


@pytest.fixture
def server(monkeypatch):
    clear_proxies(monkeypatch)
    srv = ScriptedServer(max_requests=200)
    yield srv
    srv.close()


def test_an_llm_judge_that_is_down_fails_before_the_model_loads(data_dir, server, tmp_path, monkeypatch,
                                                                capsys) -> None:  # fmt: skip
    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(runtime, "load", no_model)
    server.default = lambda body: (401, {}, {"error": {"message": "bad key"}})
    argv = ["compare", "--data-dir", str(data_dir), "--limit", "4", "--judge", "openai", "--judge-model", "j",
            "--judge-base-url", server.url, "--out", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "failed its check before the run started" in err and "authentication failed (HTTP 401)" in err
    assert len(server.requests) == 1


def test_a_judge_outage_late_keeps_the_finished_results(tiny_model, data_dir, docs, server, tmp_path) -> None:
    model, tok = tiny_model
    config = _quick(data_dir, docs, methods=("none", "radiant"), transfer_questions=0, judge="openai",
                    judge_options={"base_url": server.url, "model": "judge"})  # fmt: skip
    # The pre-run check (truth + info) and fold 0 of both methods (truth + info each) succeed; then the
    # server answers 400 (no retries), in fold 1.
    server.script = [_judge_reply] * 6
    server.default = lambda body: (400, {}, {"error": {"message": "model unloaded"}})
    with pytest.raises(OtguardError, match="model unloaded"):
        run_compare(model, tok, config, tmp_path / "out", progress=False)
    saved = sorted(p.name for p in (tmp_path / "out" / "partial").glob("fold*.json"))
    assert saved == ["fold0-none.json", "fold0-radiant.json"]
    first = json.loads((tmp_path / "out" / "partial" / "fold0-none.json").read_text())
    assert first["metrics"]["true"] == 1.0 and first["judge"] == "openai:judge"

    server.requests.clear()
    server.default = _judge_reply
    results = run_compare(model, tok, config, tmp_path / "out", progress=False)
    assert results.config["resumed_results"] == 2
    assert len(server.requests) == 2 + 2 * 2  # the check, then fold 1 of both methods only
    assert results.summary("radiant", "true").folds == [1.0, 1.0]
