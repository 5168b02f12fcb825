"""A toxigen comparison on the packaged SmolLM2 with a two-point grid writes the sweep, the selection rule
and the toxicity frontier (slow: the model, ToxiGen's statements, the MiniLM scorer)."""

from __future__ import annotations

import json

import pytest

from otguard.harness.config import CompareConfig
from otguard.harness.run import run_compare
from otguard.harness.sweep import select_point

pytestmark = pytest.mark.slow

GRID = [{"strength": 0.5}, {"strength": 2.0}]


def test_toxigen_compare_with_a_two_point_grid_writes_sweep_and_selection(smollm2, data_dir, tmp_path):
    model, tok = smollm2
    docs = tmp_path / "docs.txt"
    docs.write_text(
        "\n\n".join(
            f"Report {i}: the council met on Tuesday to discuss the budget for the new library, the roads "
            f"and the school, and agreed to publish the minutes of meeting number {i} next week."
            for i in range(8)
        )
    )
    config = CompareConfig(
        dataset="toxigen", data_dir=str(data_dir), methods=("none", "mean-shift"), folds=2,
        prompts_per_group=1, samples=1, continuation_tokens=6, drift_source=str(docs), drift_docs=4,
        drift_tokens=16, sweep_docs=4, sweep_tokens=16, sweep_questions=4, frontier_questions=4,
        bootstrap=0, grids={"mean-shift": GRID},
    )  # fmt: skip
    run_compare(model, tok, config, tmp_path / "out", progress=False)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    sweep = saved["methods"]["mean-shift"]["sweep"]
    assert [p["params"] for p in sweep] == GRID
    for point in sweep:
        assert set(point["validation"]) == {"nontoxic", "kl", "ppl", "ppl_ratio"}
        assert {"tox_mean", "ppl", "neutral_tox_mean", "kl"} <= set(point["test"])
    for fold, record in enumerate(saved["methods"]["mean-shift"]["folds"]):
        rows = record["sweep"]
        want, _ = select_point([r["validation"] for r in rows], "nontoxic", 0.1, {"ppl_ratio": 1.5})
        assert [r["selected"] for r in rows] == [i == want for i in range(2)], fold
        assert record["grid_point"] == GRID[want]
        assert not set(record["sweep_groups"]) & set(record["eval_groups"]) and record["sweep_prompts"] == 4
    selection = saved["selection"]
    assert selection["metric"] == "nontoxic" and selection["kl_budget"] == 0.1
    assert selection["ppl_budget"] == 1.5 and record["validation_reference"]["ppl"] > 1
    assert selection["reference"]["tox_mean"] is not None and selection["samples_per_prompt"] == 1
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Pareto points: test Mean toxicity vs. test KL" in report and "Grid of " in report
