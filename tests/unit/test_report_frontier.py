"""Hyper-parameter sweeps in the report: the Pareto rows (checked against a front computed by hand), the
per-method grid tables, the selection rule, the frontier PNG, variant labels, and no sweep section (nor
PNG) for a run without sweeps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from otguard.report import pareto_front, pareto_table, plot_frontier, sweep_table, write_report
from otguard.report.frontier import FrontierPoint
from otguard.report.tables import method_label
from otguard.results import RunResults

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "results_small.json"
SWEEP_FIXTURE = FIXTURE.parent / "results_sweep.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results() -> RunResults:
    """``tests/fixtures/results_sweep.json``: two swept methods (iti: grid points A-C, slim: D-F) and two
    reference rows (none, iti@paper), two folds.

    Test (MC2, KL, True) of the grid points: A alpha=1 (.42, .01, .50), B alpha=5 (.46, .10, .48),
    C alpha=15 (.44, .80, .55), D kappa=2 (.45, .02, .52), E kappa=5 (.46, .05, .47), F kappa=10
    (.40, .30, no True). Validation: MC2 one point above the test MC2, KL half the test KL, budget 0.1.
    Chosen: B in folds 0 and 1, D in fold 0, E in fold 1.
    """
    return RunResults.from_json(SWEEP_FIXTURE)


def _section_rows(md: str, heading: str) -> list[str]:
    """The table rows (no header or rule) under a ``### heading`` of report.md."""
    part = md.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    lines = [line for line in part.splitlines() if line.startswith("| ")]
    return lines[1:]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("frontier")
    md_path, html_path = write_report(_results(), out)
    return out, md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")


def test_pareto_rows_of_mc2_and_true_are_the_hand_computed_fronts(report: tuple[Path, str, str]) -> None:
    _, md, _ = report
    # MC2 vs KL: A, D, E (B is beaten by E: same MC2 at lower KL; C by D; F by A).
    assert _section_rows(md, "Pareto points: test MC2 vs. test KL") == [
        "| iti | alpha=1 | 42.0 | 0.010 | – |",
        "| slim | kappa=2 | 45.0 | 0.020 | 0 |",
        "| slim | kappa=5 | 46.0 | 0.050 | 1 |",
    ]
    # True vs KL (F has no True): A, D, C (E and B are beaten by D).
    assert _section_rows(md, "Pareto points: test True vs. test KL") == [
        "| iti | alpha=1 | 50.0 | 0.010 | – |",
        "| slim | kappa=2 | 52.0 | 0.020 | 0 |",
        "| iti | alpha=15 | 55.0 | 0.800 | – |",
    ]


def test_grid_tables_selection_text_and_variant_label(report: tuple[Path, str, str]) -> None:
    _, md, html = report
    assert "## Hyper-parameter sweeps" in md
    assert md.count("| Params | Validation MC2 (%) | Validation KL (nats) | Test MC2 (%) | Test True (%) | "
                    "Test KL (nats) | Selected in folds | Within KL budget |") == 2  # fmt: skip
    assert _section_rows(md, "Grid of iti") == [
        "| alpha=1 | 43.0 | 0.005 | 42.0 | 50.0 | 0.010 | – | yes |",
        "| **alpha=5** | 47.0 | 0.050 | 46.0 | 48.0 | 0.100 | 0, 1 | yes |",
        "| alpha=15 | 45.0 | 0.400 | 44.0 | 55.0 | 0.800 | – | no |",
    ]
    assert _section_rows(md, "Grid of slim")[2] == "| kappa=10 | 41.0 | 0.150 | 40.0 | – | 0.300 | – | no |"
    rule = (
        "Per fold, the grid point with the highest validation MC2 among those within the KL "
        "budget. Validation metric MC2; KL budget 0.1 nats (KL on validation documents). Test metrics of "
        "the grid points: 100 test questions."
    )
    assert f"- **Selection:** {rule}" in md
    assert f"trade-off curve. Selection rule: {rule}" in md
    assert rule in html
    # The variant row is named as the method at its paper defaults, in the tables and the run facts.
    assert "| ITI (paper defaults) | 30.0 ± 0.0 |" in md
    assert "iti@paper" not in md
    assert "- **Methods:** none, iti, ITI (paper defaults), slim" in md


def test_frontier_png_is_written_and_embedded(report: tuple[Path, str, str]) -> None:
    out, md, html = report
    png = out / "frontier.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "![Test truthfulness versus test KL for every grid point](frontier.png)" in md
    alt = "Test truthfulness versus test KL for every grid point"
    assert html.count(f'alt="{alt}" src="data:image/png;base64,') == 1


def test_no_sweep_no_frontier_section_and_a_stale_png_is_removed(tmp_path: Path) -> None:
    write_report(_results(), tmp_path)
    assert (tmp_path / "frontier.png").is_file()
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))
    md_path, html_path = write_report(data, tmp_path)
    md = md_path.read_text(encoding="utf-8")
    assert not (tmp_path / "frontier.png").exists()
    for text in ("Hyper-parameter sweeps", "Pareto", "frontier", "Selection", "Grid of"):
        assert text not in md and text not in html_path.read_text(encoding="utf-8")
    assert plot_frontier(data, tmp_path / "f.png") is None and not (tmp_path / "f.png").exists()
    assert pareto_table(RunResults.from_dict(data), "mc2", "kl") == ([], [])
    assert sweep_table(RunResults.from_dict(data), "iti") == ([], [])


def test_pareto_front_ties_and_directions() -> None:
    def p(name: str, x: float, y: float) -> FrontierPoint:
        return FrontierPoint(name, {}, x, y)

    pts = [p("a", 1.0, 5.0), p("b", 1.0, 5.0), p("c", 2.0, 5.0), p("d", 0.5, 1.0), p("e", 3.0, 9.0)]
    # Equal points a and b both stay; c is beaten by a (same y, more x).
    assert [q.method for q in pareto_front(pts)] == ["d", "a", "b", "e"]
    # Lower y is better (e.g. toxicity): d (0.5, 1.0) dominates everything else.
    assert [q.method for q in pareto_front(pts, y_higher=False)] == ["d"]


def test_method_label() -> None:
    assert method_label("iti@paper") == "ITI (paper defaults)"
    assert method_label("mean-shift@paper") == "Mean shift (paper defaults)"
    assert method_label("slim@other") == "SLIM (other)"
    assert method_label("iti") == "iti" and method_label("custom@x") == "custom (x)"


def test_log_axis_when_kl_spans_decades(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The frontier's x axis: logarithmic when KL spans over 20 times (0.01 to 4.3), else linear."""
    from matplotlib.figure import Figure

    seen: list[str] = []
    original = Figure.savefig

    def spy(fig: Figure, *args: Any, **kwargs: Any) -> None:
        seen.extend(ax.get_xscale() for ax in fig.axes)
        original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    res = _results()
    assert plot_frontier(res, tmp_path / "a.png") == tmp_path / "a.png"
    # Without the cross (KL 4.3) and iti's ends (0.01, 0.80): KL from 0.02 to 0.30, 15 times apart.
    del res.methods["iti@paper"]
    res.methods["iti"].sweep = [s for s in res.methods["iti"].sweep or [] if s.params["alpha"] == 5.0]
    plot_frontier(res, tmp_path / "b.png")
    assert seen == ["log", "log", "linear", "linear"]
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


def test_a_perplexity_budget_shows_in_the_grid_header_and_the_selection_text(tmp_path: Path) -> None:
    data = json.loads(SWEEP_FIXTURE.read_text(encoding="utf-8"))
    data["selection"]["ppl_budget"] = 1.5
    for point in data["methods"]["iti"]["sweep"]:
        point["validation"]["ppl_ratio"] = 1.2
    md = write_report(data, tmp_path)[0].read_text(encoding="utf-8")
    assert md.count("| Selected in folds | Within budgets |") == 2 and "Within KL budget" not in md
    assert "Validation Perplexity ratio to none" in md
    facts = "KL budget 0.1 nats (KL on validation documents); perplexity budget 1.5× the unsteered model's"
    assert facts in md
