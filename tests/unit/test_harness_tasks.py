"""The task registry, the tasks' catalogues and report text, the shared toxicity metrics, rescoring."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from otguard.errors import ConfigError, DataError, OutputDirError
from otguard.harness import registry
from otguard.harness.rescore import rescore_toxicity
from otguard.harness.task import Evaluation, StageTimer, Task
from otguard.harness.toxicity import ToxicityTask, toxicity_metrics
from otguard.harness.truthfulqa import METRICS as TQA_METRICS
from otguard.harness.truthfulqa import TruthfulQATask, judge_metrics
from otguard.results import FoldRecord, MethodResult, MetricSummary, RunResults

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "results_small.json"


def test_registry_maps_datasets_to_tasks() -> None:
    assert registry.task_class("truthfulqa") is TruthfulQATask
    assert registry.task_class("truthfulqa-mc2") is TruthfulQATask
    assert registry.task_class("toxigen") is ToxicityTask
    assert registry.DATASETS == ("truthfulqa", "truthfulqa-mc2", "toxigen")
    with pytest.raises(ConfigError, match="Unknown dataset 'imdb' for compare; choose one of truthfulqa, "):
        registry.task_class("imdb")
    assert registry.task_by_name("toxicity") is ToxicityTask and registry.task_by_name("nope") is None


def test_catalogues_keep_the_published_labels_and_order() -> None:
    assert list(TQA_METRICS) == [
        "mc1", "mc2", "mc3", "true", "info", "true_x_info_product", "true_x_info_joint", "sem", "bleu_true",
        "rouge_true", "no_comment_rate", "repair_rate", "harm_rate", "mc1_repair_rate", "mc1_harm_rate",
        "nq_true", "nq_info", "nq_true_x_info_product", "nq_sem", "false_flag_rate", "catch_rate",
        "gate_auroc", "guarantee_share", "guarantee_nominal", "ce", "kl", "flag_rate", "edited_heads",
    ]  # fmt: skip
    assert TQA_METRICS["harm_rate"].to_dict() == {"label": "Harmed", "higher_is_better": False,
                                                  "group": "repair", "unit": "%"}  # fmt: skip
    assert TQA_METRICS["ce"].to_dict() == {"label": "CE", "higher_is_better": False, "group": "side-effects",
                                           "unit": "nats"}  # fmt: skip
    assert TQA_METRICS["no_comment_rate"].to_dict() == {"label": "No comment", "higher_is_better": None,
                                                        "group": "generation", "unit": "%"}  # fmt: skip
    assert list(ToxicityTask.metrics)[:6] == ["tox_max", "tox_prob", "tox_mean", "neutral_tox_mean", "ppl",
                                              "ppl_dropped"]  # fmt: skip
    assert ToxicityTask.metrics["flag_rate"] is TQA_METRICS["flag_rate"]
    assert TruthfulQATask.csv_fields == ("fold", "method", "question", "answer", "true")
    assert ToxicityTask.csv_fields[-2:] == ("continuation", "toxicity")


def _results(task: str | None, judge: str) -> RunResults:
    return RunResults(
        config={"methods": ["none"], "judge": judge}, methods={"none": MethodResult()}, task=task
    )


def test_how_to_read_is_the_task_text() -> None:
    tqa = registry.how_to_read(_results("truthfulqa", "sem:minilm"))
    leads = ["Cells:", "MC1 / MC2 / MC3:", "True×Info product vs. joint:", "Repaired and harmed:",
             "Difference to none:", "The gate at the point of use:", "CE and KL (nats):",
             "Flag rate and edited heads:", "Judges:"]  # fmt: skip
    assert [lead for lead, _ in tqa] == leads
    assert "the main judge is 'sem:minilm'" in tqa[-1][1]
    tox = registry.how_to_read(_results("toxicity", "embedding-logreg:minilm"))
    assert [lead for lead, _ in tox] == ["Cells:", "Toxicity:", "Fluency and diversity:", "Flag rates:",
                                         "Difference to none:", "CE and KL (nats):",
                                         "Flag rate and edited heads:"]  # fmt: skip
    assert "'embedding-logreg:minilm' scorer" in tox[1][1]
    assert tqa[0] == tox[0] and "–" in tqa[0][1]
    assert registry.how_to_read(RunResults.from_json(FIXTURE)) == TruthfulQATask.how_to_read(
        RunResults.from_json(FIXTURE)
    )


def test_toxicity_metrics_by_hand() -> None:
    hate = [[0.1, 0.9], [0.2, 0.3]]
    got = toxicity_metrics(hate, [[0.0, 0.4]])
    assert got == pytest.approx({"tox_max": 0.6, "tox_prob": 0.5, "tox_mean": 0.375, "neutral_tox_mean": 0.2})
    assert set(toxicity_metrics(hate, None)) == {"tox_max", "tox_prob", "tox_mean"}


class _Verdicts:
    def __init__(self, summary: dict[str, Any]) -> None:
        self._summary = summary

    def summary(self) -> dict[str, Any]:
        return self._summary


def test_judge_metrics_names() -> None:
    full = _Verdicts({"true": 0.5, "info": 0.8, "true_x_info_product": 0.4, "true_x_info_joint": 0.3})
    assert judge_metrics("", full) == {"true": 0.5, "info": 0.8, "true_x_info_product": 0.4,
                                       "true_x_info_joint": 0.3}  # fmt: skip
    assert judge_metrics("nq_", full) == {"nq_true": 0.5, "nq_info": 0.8, "nq_true_x_info_product": 0.4}
    assert judge_metrics("", _Verdicts({"true": 0.5, "info": None})) == {"true": 0.5}


def test_the_task_protocol_is_abstract_and_the_timer_adds_up(monkeypatch) -> None:
    class Half(Task):
        name = "half"

        def start_fold(self, fold: int, split: Any) -> None: ...

    with pytest.raises(TypeError, match="abstract"):
        Half(None)  # type: ignore[abstract,arg-type]
    clock = iter([10.0, 12.5, 20.0, 21.0])
    monkeypatch.setattr("otguard.harness.task.time.time", lambda: next(clock))
    timer = StageTimer()
    for _ in range(2):
        with timer("mc"):
            pass
    assert timer.seconds == {"mc": 3.5}
    assert Evaluation().metrics == {} and Evaluation().rows == []


# ------------------------------------------------------------------------------------- rescoring


class _LengthScorer:
    name = "length"

    def score(self, texts: list[str]) -> list[float]:
        return [min(1.0, len(t) / 10) for t in texts]


def _toxicity_run(folder: Path) -> None:
    rows = []
    for fold in range(2):
        for method in ("none", "slim"):
            for kind, prompts in (("hate", ["p1", "p2"]), ("neutral", ["n1"])):
                for p in prompts:
                    for j, text in enumerate(["ab", "abcdefghijkl" if method == "none" else "abc"]):
                        rows.append({"fold": fold, "method": method, "kind": kind, "group": "g", "prompt": p,
                                     "sample": j, "continuation": text, "toxicity": 0.5})  # fmt: skip
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(ToxicityTask.csv_fields))
    writer.writeheader()
    writer.writerows(rows)
    folder.mkdir()
    (folder / "continuations.csv").write_text(buf.getvalue())
    methods = {
        m: MethodResult(
            {"tox_max": MetricSummary.of([0.5, 0.5]), "ppl": MetricSummary.of([12.0, 14.0])},
            [FoldRecord(fold=k, meta={"eval_groups": ["g"]}) for k in range(2)],
        )
        for m in ("none", "slim")
    }
    res = RunResults({"methods": ["none", "slim"], "folds": 2, "dataset": "toxigen", "judge": "old"}, methods,
                     dict(ToxicityTask.metrics), task="toxicity")  # fmt: skip
    res.write(folder / "results.json")


def test_rescore_recomputes_only_the_toxicity_metrics(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("otguard.evaluation.factory.make_scorer", lambda spec, **kw: _LengthScorer())
    _toxicity_run(tmp_path / "run")
    res = rescore_toxicity(tmp_path / "run", "profanity", tmp_path / "new")
    # none: per prompt max(0.2, 1.0) = 1.0; slim: max(0.2, 0.3) = 0.3; neutral mean (0.2 + 1.0) / 2 = 0.6
    assert res.summary("none", "tox_max").folds == [1.0, 1.0]
    assert res.summary("slim", "tox_max").folds == pytest.approx([0.3, 0.3])
    assert res.summary("none", "tox_prob").folds == [1.0, 1.0] and res.summary("slim", "tox_prob").mean == 0.0
    assert res.summary("none", "neutral_tox_mean").folds == pytest.approx([0.6, 0.6])
    assert res.summary("none", "ppl").folds == [12.0, 14.0]  # kept
    assert res.config["judge"] == "length" and res.config["rescored_from"] == str(
        (tmp_path / "run").resolve()
    )
    again = RunResults.from_json(tmp_path / "new")
    assert again.to_dict() == res.to_dict()
    new_rows = list(csv.DictReader((tmp_path / "new" / "continuations.csv").read_text().splitlines()))
    assert {r["toxicity"] for r in new_rows} == {"0.2", "1.0", "0.3"}
    # the new scorer's record replaces the old one; this made-up run's group 'g' is not in ToxiGen (nor
    # is any ToxiGen data needed): the record says why it is not validated
    record = res.judges["toxicity"]
    assert record["name"] == "length" and record["validated"] is False
    assert "the held-out check could not run" in json.dumps(record)


def test_rescore_drops_the_sweeps_old_scorer_figures_but_keeps_what_chose(tmp_path, monkeypatch) -> None:
    from otguard.results import Selection, SweepFold, SweepPoint

    monkeypatch.setattr("otguard.evaluation.factory.make_scorer", lambda spec, **kw: _LengthScorer())
    _toxicity_run(tmp_path / "run")
    res = RunResults.from_json(tmp_path / "run")
    test = {"tox_mean": 0.6, "neutral_tox_mean": 0.4, "ppl": 9.0, "kl": 0.02}
    res.methods["slim"].sweep = [SweepPoint(
        {"kappa": 5.0}, {"nontoxic": 0.4, "kl": 0.01}, dict(test), [0, 1], True,
        [SweepFold(k, {"nontoxic": 0.4, "kl": 0.01}, dict(test), True) for k in range(2)])]  # fmt: skip
    res.selection = Selection("nontoxic", "rule", 0.1, extra={"reference": {"tox_mean": 0.7, "ppl": 8.0}})
    res.write(tmp_path / "run" / "results.json")
    new = rescore_toxicity(tmp_path / "run", "profanity", tmp_path / "new")
    point = new.methods["slim"].sweep[0]
    assert point.test == {"ppl": 9.0, "kl": 0.02} and all(f.test == point.test for f in point.folds)
    assert point.validation == {"nontoxic": 0.4, "kl": 0.01}  # what chose the point stays
    assert new.selection.extra["reference"] == {"ppl": 8.0} and new.selection.extra["scored_by"] == "old"


def test_rescore_refuses_other_runs_and_foreign_folders(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("otguard.evaluation.factory.make_scorer", lambda spec, **kw: _LengthScorer())
    (tmp_path / "tqa").mkdir()
    (tmp_path / "tqa" / "results.json").write_text(FIXTURE.read_text())  # a TruthfulQA run
    with pytest.raises(DataError, match="is not a toxicity run"):
        rescore_toxicity(tmp_path / "tqa", "profanity", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    _toxicity_run(tmp_path / "run")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(OutputDirError, match="force=True"):
        rescore_toxicity(tmp_path / "run", "profanity", tmp_path / "mine")


def test_gate_sample_is_seeded_and_keeps_both_sides() -> None:
    from otguard.data.qa import QAItem
    from otguard.harness.truthfulqa import gate_sample

    items = [QAItem(f"Q{i}?", "best", ("t1", "t2", "t3", "t4"), ("f1", "f2", "f3")) for i in range(10)]
    got = gate_sample(items, 4, 2, seed=0)
    assert [it.question for it in got] == [it.question for it in gate_sample(items, 4, 2, seed=0)]
    assert len(got) == 4
    assert all(len(it.correct_answers) == 2 and len(it.incorrect_answers) == 2 for it in got)
    assert all(set(it.correct_answers) <= {"t1", "t2", "t3", "t4"} for it in got)
    assert all(set(it.incorrect_answers) <= {"f1", "f2", "f3"} for it in got)
    assert gate_sample(items, 0, 0, seed=0) == items  # 0: everything
    short = [QAItem("Q?", "b", ("t",), ("f",))]
    assert gate_sample(short, 60, 2, seed=0) == short


def test_judges_are_named_and_their_validation_recorded(monkeypatch) -> None:
    from otguard.harness.config import CompareConfig
    from otguard.harness.judges import build_main_judge

    splits = [{"split": "seen_questions", "accuracy": 0.86, "auroc": 0.91, "tpr": 0.8, "tnr": 0.9, "n": 10}]

    class Info:
        name = "Info (learned judge)"

        def validation(self) -> dict[str, Any]:
            return {"name": self.name, "splits": splits}

    class Learned:
        name, judges_info, info_judge = "learned judge (truthfulqa labels)", True, Info()

        def validation(self) -> dict[str, Any]:
            return {"name": "True (learned judge)", "splits": splits}

    calls: list[tuple[str, dict[str, Any]]] = []

    def make_judge(spec: str, **kw: Any) -> Any:
        calls.append((spec, kw))
        return Learned()

    monkeypatch.setattr("otguard.evaluation.factory.make_judge", make_judge)
    config = CompareConfig(judge="sem", data_dir="/data")
    choice = build_main_judge("learned", config, None, labels="nqopen")
    assert calls == [("learned", {"data_dir": "/data", "labels": "nqopen"})]
    assert (choice.kind, choice.label, choice.info_label) == ("learned", "learned judge", "learned judge")
    want = {"name": "learned judge (truthfulqa labels)", "validated": True, "role": "truth",
            "validation": {"name": "True (learned judge)", "splits": splits}}  # fmt: skip
    assert choice.records["true"] == want
    assert choice.records["info"]["name"] == "learned judge (truthfulqa labels), info verdict"
    Learned.judges_info = False
    no_info = build_main_judge("learned", config, None)
    assert no_info.info_label == "non-refusal" and no_info.records["info"]["validated"] is False
    sem = object()
    plain = build_main_judge("sem", config, sem)
    assert plain.judge is sem and plain.label == "SEM, MiniLM" and plain.info_label == "non-refusal"
    assert plain.records["true"]["validated"] is False and "not validated" in plain.records["true"]["note"]
