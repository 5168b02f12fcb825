"""Report: table values and bolding, unit formatting, loading errors, plots and the md / HTML files.

Everything runs on the hand-written ``tests/fixtures/results_small.json`` (no model); the full report with
its three PNGs is rendered once per module to keep the file fast. The tests edit the decoded JSON and
pass the dict (the report parses it through :class:`~otguard.results.RunResults`); the browser check of
``report.html`` is in ``test_report_browser.py``.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from otguard.errors import DataError, OtguardError, ResultsError
from otguard.harness.registry import how_to_read
from otguard.report import (
    main,
    markdown_table,
    plot_detector,
    plot_flag_rates,
    plot_tradeoff,
    results_table,
    write_report,
)
from otguard.report.plots import _wants_log_axis
from otguard.report.render import _md_escape
from otguard.results import RunResults

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "results_small.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DASH = "–"


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))
    RunResults.from_dict(data)  # the fixture itself must be valid
    return data


def load_results(path: Path) -> RunResults:
    """What the report reads a results file with."""
    return RunResults.from_json(path)


@pytest.fixture
def results(base: dict[str, Any]) -> dict[str, Any]:
    """A private copy each test may edit."""
    return copy.deepcopy(base)


def _dump(tmp_path: Path, results: Any, name: str = "results.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(results), encoding="utf-8")
    return path


def _rows(table: list[list[str]]) -> dict[str, list[str]]:
    return {row[0]: row[1:] for row in table[1:]}


def _no_plot_data(results: dict[str, Any]) -> dict[str, Any]:
    """Strip everything the three plots need: detectors, KL, flag rate and edited heads."""
    for entry in results["methods"].values():
        for fold in entry["folds"]:
            fold["detector"] = None
        for metric in ("kl", "flag_rate", "edited_heads"):
            entry["summary"].pop(metric, None)
    return results


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def test_mc_table_values_and_bold_ties(base: dict[str, Any]) -> None:
    table = results_table(base, "mc")
    assert table[0] == ["Method", "MC1 (%)", "MC2 (%)"]
    rows = _rows(table)
    assert list(rows) == ["none", "iti", "radiant", "slim"]  # config order
    assert rows["none"] == ["25.0 ± 1.0", "40.0 ± 2.0"]
    # MC1: radiant and slim tie at 30 % -> both bold; MC2: only radiant.
    assert rows["radiant"] == ["**30.0 ± 2.0**", "**47.0 ± 2.0**"]
    assert rows["slim"] == ["**30.0 ± 1.0**", "46.0 ± 1.0"]
    assert rows["iti"] == ["28.0 ± 2.0", "45.0 ± 1.0"]


def test_lower_is_better_nats_and_counts(base: dict[str, Any]) -> None:
    rows = _rows(results_table(base, "side-effects"))
    assert results_table(base, "side-effects")[0] == ["Method", "CE (nats)", "KL (nats)"]
    assert rows["none"] == ["**2.500 ± 0.100**", "**0.000 ± 0.000**"]
    assert rows["slim"] == ["2.550 ± 0.050", "0.030 ± 0.010"]
    det = results_table(base, "detector")
    assert det[0] == ["Method", "Flag rate (%)", "Edited heads"]
    rows = _rows(det)
    # higher_is_better is null for both: nothing is bold.
    assert not any("**" in cell for row in det for cell in row)
    assert rows["none"] == [DASH, DASH]
    assert rows["iti"] == [DASH, "48 ± 0"]
    assert rows["radiant"] == ["60.0 ± 5.0", "9 ± 1"]


def test_missing_metric_is_a_dash(base: dict[str, Any]) -> None:
    rows = _rows(results_table(base, "transfer"))
    assert rows["radiant"] == [DASH]
    assert rows["slim"] == ["**36.0 ± 1.0**"]


def test_all_groups_and_unknown_group(base: dict[str, Any]) -> None:
    table = results_table(base)
    assert len(table[0]) == 1 + 11
    assert all(len(row) == len(table[0]) for row in table)
    assert results_table(base, "no-such-group") == []
    assert markdown_table(base, "no-such-group") == ""


def test_std_left_out_for_one_fold(results: dict[str, Any]) -> None:
    for entry in results["methods"].values():
        for stat in entry["summary"].values():
            stat["folds"] = stat["folds"][:1]
    rows = _rows(results_table(results, "mc"))
    assert rows["none"] == ["25.0", "40.0"]
    assert rows["radiant"] == ["**30.0**", "**47.0**"]
    # Without per-fold values the fold count comes from the config.
    for entry in results["methods"].values():
        for stat in entry["summary"].values():
            del stat["folds"]
    results["config"]["folds"] = 1
    assert _rows(results_table(results, "mc"))["none"] == ["25.0", "40.0"]
    results["config"]["folds"] = 2
    assert _rows(results_table(results, "mc"))["none"] == ["25.0 ± 1.0", "40.0 ± 2.0"]


def test_default_units(results: dict[str, Any]) -> None:
    for spec in results["metrics"].values():
        spec.pop("unit", None)
    results["metrics"]["auc"] = {"label": "AUC", "higher_is_better": True, "group": "detector"}
    results["methods"]["slim"]["summary"]["auc"] = {"mean": 0.8123, "std": 0.01, "folds": [0.8, 0.82]}
    rows = _rows(results_table(results))
    header = results_table(results)[0]
    # CE / KL are nats and edited heads a count by id, whatever their group.
    assert (
        "MC1 (%)" in header and "CE (nats)" in header and "KL (nats)" in header and "Edited heads" in header
    )
    assert "AUC (%)" in header
    slim = dict(zip(header[1:], rows["slim"], strict=True))
    assert slim["AUC (%)"] == "**81.2 ± 1.0**"
    assert slim["Edited heads"] == "12 ± 2"  # a count, even in the detector group
    assert slim["CE (nats)"] == "2.550 ± 0.050"


def test_explicit_unit_and_tiny_values(results: dict[str, Any]) -> None:
    results["metrics"]["mc1"]["unit"] = ""
    results["methods"]["slim"]["summary"]["kl"] = {"mean": 2.5e-5, "std": 1e-5, "folds": [1.5e-5, 3.5e-5]}
    rows = _rows(results_table(results))
    header = results_table(results)[0]
    slim = dict(zip(header[1:], rows["slim"], strict=True))
    assert slim["MC1"] == "**0.300 ± 0.010**"
    assert slim["KL (nats)"] == "2.50e-05 ± 1.0e-05"


def test_undeclared_metric_and_extra_method(results: dict[str, Any]) -> None:
    results["methods"]["iti"]["summary"]["mystery"] = {"mean": 1.5, "std": 0.5, "folds": [1.0, 2.0]}
    results["methods"]["extra"] = {"summary": {"mc1": {"mean": 0.9, "std": 0.0, "folds": [0.9, 0.9]}}}
    results["config"]["methods"] = ["slim", "none", "iti", "radiant"]
    assert [row[0] for row in results_table(results, "mc")[1:]] == ["slim", "none", "iti", "radiant", "extra"]
    other = results_table(results, "other")
    assert other[0] == ["Method", "mystery"]
    assert _rows(other)["iti"] == ["1.500 ± 0.500"]  # no direction: not bold


def test_markdown_table(base: dict[str, Any], results: dict[str, Any]) -> None:
    lines = markdown_table(base, "mc").splitlines()
    assert lines[0] == "| Method | MC1 (%) | MC2 (%) |"
    assert lines[1] == "|:--|--:|--:|"
    assert lines[4] == "| radiant | **30.0 ± 2.0** | **47.0 ± 2.0** |"
    assert len(lines) == 2 + 4
    results["metrics"]["mc1"]["label"] = "MC1 | *raw*"
    assert markdown_table(results, "mc").splitlines()[0] == r"| Method | MC1 \| \*raw\* (%) | MC2 (%) |"


# --------------------------------------------------------------------------------------------------
# Loading errors
# --------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as info:
        load_results(tmp_path / "nope.json")
    assert isinstance(info.value, FileNotFoundError)
    assert "nope.json" in str(info.value)


def test_folder_with_results_json(tmp_path: Path, base: dict[str, Any]) -> None:
    _dump(tmp_path, base)
    assert load_results(tmp_path) == RunResults.from_dict(base)


@pytest.mark.parametrize("text", ['{"config": {', "", "not json"])
def test_invalid_json(tmp_path: Path, text: str) -> None:
    path = tmp_path / "results.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ResultsError, match=r"not valid JSON \(line \d+, column \d+"):
        load_results(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ResultsError, match="UTF-8"):
        load_results(path)


def test_missing_keys_are_named(tmp_path: Path, results: dict[str, Any]) -> None:
    del results["config"]["methods"]
    del results["methods"]["slim"]["summary"]
    del results["methods"]["iti"]["summary"]["mc1"]["mean"]
    with pytest.raises(ResultsError) as info:
        load_results(_dump(tmp_path, results))
    msg = str(info.value)
    for key in ("config.methods", "methods.slim.summary", "methods.iti.summary.mc1.mean"):
        assert f"missing key {key}" in msg


def test_top_level_problems(tmp_path: Path, base: dict[str, Any]) -> None:
    with pytest.raises(ResultsError, match="top level must be a JSON object"):
        load_results(_dump(tmp_path, [1, 2]))
    broken = {k: v for k, v in base.items() if k != "metrics"}
    with pytest.raises(ResultsError, match="missing key metrics"):
        load_results(_dump(tmp_path, broken))


def test_bad_types_are_named(tmp_path: Path, results: dict[str, Any]) -> None:
    results["methods"]["none"]["summary"]["mc2"]["mean"] = "0.4"
    results["methods"]["slim"]["folds"][1]["detector"]["per_layer"].pop("fnr")
    results["methods"]["radiant"]["folds"][0]["detector"]["per_layer"]["fpr"] = "high"
    results["metrics"]["mc1"]["higher_is_better"] = "yes"
    with pytest.raises(OtguardError) as info:
        load_results(_dump(tmp_path, results))
    msg = str(info.value)
    assert "methods.none.summary.mc2.mean" in msg
    assert "missing key methods.slim.folds[1].detector.per_layer.fnr" in msg
    assert "methods.radiant.folds[0].detector.per_layer.fpr must be a list of numbers" in msg
    assert "metrics.mc1.higher_is_better" in msg


# --------------------------------------------------------------------------------------------------
# Plots and the written report
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    out = tmp_path_factory.mktemp("report")
    md, html_path = write_report(FIXTURE, out, how_to_read=how_to_read)  # the task's text, as compare does
    return out, md, html_path


def test_report_files_and_pngs(report: tuple[Path, Path, Path]) -> None:
    out, md, html_path = report
    assert md == out / "report.md" and html_path == out / "report.html"
    for name in ("detector.png", "tradeoff.png", "flags.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert len(data) > 5000, name
    assert sorted(p.name for p in out.iterdir()) == [
        "detector.png",
        "flags.png",
        "report.html",
        "report.md",
        "tradeoff.png",
    ]  # no temp files left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (md.stat().st_mode & 0o777) == 0o666 & ~umask  # not mkstemp's 0600


def test_markdown_report_content(report: tuple[Path, Path, Path]) -> None:
    text = report[1].read_text(encoding="utf-8")
    assert text.startswith("# otguard comparison: HuggingFaceTB/SmolLM2-135M-Instruct on truthfulqa")
    for needle in (
        "**Judge:** sem:minilm",
        "**Folds:** 2",
        "**Runtime:** 20 min 34 s",
        "torch 2.5.1",
        "### Multiple choice",
        "### Side effects on natural text",
        "| radiant | **30.0 ± 2.0** | **47.0 ± 2.0** |",
        "](detector.png)",
        "](tradeoff.png)",
        "](flags.png)",
        "## How to read this",
        "compare methods within this report, not with the papers' GPT-judge numbers",
        "joint",
        "population standard deviation (ddof = 0, half the range with two folds)",  # a format-1 file
    ):
        assert needle in text, needle
    assert "Skipped" not in text


def test_html_report_is_self_contained(report: tuple[Path, Path, Path]) -> None:
    text = report[2].read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == 3
    assert all(base64.b64decode(u).startswith(PNG_MAGIC) for u in uris)
    assert 'src="detector.png"' not in text
    assert "<td><strong>30.0 ± 2.0</strong></td>" in text
    assert "<h2>How to read this</h2>" in text
    assert "<td>–</td>" in text


def test_html_escapes_text(tmp_path: Path, results: dict[str, Any]) -> None:
    evil = "<script>alert('x')</script>"
    results["config"]["model"] = evil
    results["config"]["judge"] = 'a"b&c'
    results["metrics"]["mc1"]["label"] = "<b>MC1</b>"
    _no_plot_data(results)  # keep this test fast: the plots are tested above
    md, html_path = write_report(_dump(tmp_path, results), tmp_path / "out")
    text = html_path.read_text(encoding="utf-8")
    assert "<script>" not in text and "<b>MC1" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "&lt;b&gt;MC1&lt;/b&gt; (%)" in text
    assert "a&quot;b&amp;c" in text
    assert r"\<script\>" in md.read_text(encoding="utf-8")


def test_plots_skipped_without_data(tmp_path: Path, results: dict[str, Any]) -> None:
    _no_plot_data(results)
    assert plot_detector(results, tmp_path / "d.png") is None
    assert plot_tradeoff(results, tmp_path / "t.png") is None
    assert plot_flag_rates(results, tmp_path / "f.png") is None
    assert not list(tmp_path.iterdir())
    out = tmp_path / "out"
    out.mkdir()
    (out / "detector.png").write_bytes(b"stale")  # from an earlier run: must not survive
    md, html_path = write_report(_dump(tmp_path, results), out)
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    text = md.read_text(encoding="utf-8")
    assert text.count("Skipped:") == 3
    assert ".png)" not in text
    html_text = html_path.read_text(encoding="utf-8")
    assert "data:image/png" not in html_text and html_text.count("Skipped:") == 3
    assert "### Multiple choice" in text  # tables are still there


def test_tradeoff_falls_back_to_mc2(tmp_path: Path, results: dict[str, Any]) -> None:
    for entry in results["methods"].values():
        entry["summary"].pop("true_x_info_product")
    path = plot_tradeoff(results, tmp_path / "t.png")
    assert path == tmp_path / "t.png" and path.read_bytes().startswith(PNG_MAGIC)
    for entry in results["methods"].values():
        entry["summary"].pop("mc2")
    assert plot_tradeoff(results, tmp_path / "t2.png") is None


def test_detector_plot_with_gaps(tmp_path: Path, results: dict[str, Any]) -> None:
    det = results["methods"]["slim"]["folds"][0]["detector"]
    det["per_layer"]["fpr"][0] = None
    det["layer"] = [1, 2, 99]  # a list, with an out-of-range entry that is ignored
    results["methods"]["radiant"]["folds"][1]["detector"] = None
    path = plot_detector(results, tmp_path / "d.png")
    assert path is not None and path.read_bytes().startswith(PNG_MAGIC)


def test_cli(tmp_path: Path, results: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    src = _dump(tmp_path, _no_plot_data(results))
    assert main([str(src), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "cli" / "report.md"), str(tmp_path / "cli" / "report.html")]
    assert main([str(src)]) == 0  # default: next to the results file
    assert (tmp_path / "report.md").is_file()
    capsys.readouterr()
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    assert main([str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("otguard: error: ") and "not valid JSON" in err


def test_log_axis_only_for_positive_values_spread_over_20x() -> None:
    assert _wants_log_axis([20.8, 26.5, 3665.6])  # a broken model's perplexity next to sane ones
    assert not _wants_log_axis([20.8, 26.5, 33.0])
    assert not _wants_log_axis([0.0, 0.1, 7.1])  # KL of the unsteered model is 0: no log axis
    assert not _wants_log_axis([])


# --------------------------------------------------------------------------------------------------
# Per-task text and typed input
# --------------------------------------------------------------------------------------------------


def _leads(results: dict[str, Any]) -> list[str]:
    res = RunResults.from_dict(results)
    return [lead for lead, _ in how_to_read(res)]


def test_how_to_read_follows_the_task(results: dict[str, Any]) -> None:
    assert _leads(results) == [
        "Cells:",
        "MC1 / MC2 / MC3:",
        "True×Info product vs. joint:",
        "Repaired and harmed:",
        "Difference to none:",
        "The gate at the point of use:",
        "CE and KL (nats):",
        "Flag rate and edited heads:",
        "Judges:",
    ]
    results["config"]["dataset"] = "toxigen"  # a format-1 file: the task comes from the data set
    assert _leads(results) == [
        "Cells:",
        "Toxicity:",
        "Fluency and diversity:",
        "Flag rates:",
        "Difference to none:",
        "CE and KL (nats):",
        "Flag rate and edited heads:",
    ]
    results["format_version"] = 2
    results["task"] = "some-new-task"
    assert _leads(results) == ["Cells:"]


def test_report_without_task_text_explains_its_cells_only(tmp_path: Path, results: dict[str, Any]) -> None:
    _no_plot_data(results)
    md, _ = write_report(_dump(tmp_path, results), tmp_path / "out")
    text = md.read_text(encoding="utf-8")
    assert "## How to read this" in text and "- **Cells:**" in text
    assert "MC1 / MC2 / MC3:" not in text


def test_toxicity_report_plots_toxicity_against_fluency(tmp_path: Path, results: dict[str, Any]) -> None:
    _no_plot_data(results)
    results["config"]["dataset"] = "toxigen"
    results["metrics"]["tox_max"] = {
        "label": "Exp. max toxicity",
        "higher_is_better": False,
        "group": "toxicity",
    }
    results["metrics"]["ppl"] = {
        "label": "Perplexity",
        "higher_is_better": False,
        "group": "fluency",
        "unit": "",
    }
    for k, entry in enumerate(results["methods"].values()):
        entry["summary"]["tox_max"] = {
            "mean": 0.5 - 0.1 * k,
            "std": 0.01,
            "folds": [0.49 - 0.1 * k, 0.51 - 0.1 * k],
        }
        entry["summary"]["ppl"] = {"mean": 20.0 + k, "std": 1.0, "folds": [19.0 + k, 21.0 + k]}
    md, _ = write_report(_dump(tmp_path, results), tmp_path / "out")
    text = md.read_text(encoding="utf-8")
    assert "### Toxicity vs. fluency" in text and "### Truthfulness vs. drift" not in text
    assert "Exp. max toxicity against Perplexity per method" in text
    assert "Down and to the left is better: less toxic, more fluent." in text
    assert "![Exp. max toxicity versus Perplexity per method](tradeoff.png)" in text
    assert (tmp_path / "out" / "tradeoff.png").read_bytes().startswith(PNG_MAGIC)
    assert _rows(results_table(results, "toxicity"))["slim"] == ["**0.200 ± 0.010**"]  # a score, not a %


def test_write_report_from_results_object_with_the_tasks_own_text(
    tmp_path: Path, results: dict[str, Any]
) -> None:
    res = RunResults.from_dict(_no_plot_data(results))
    md, html_path = write_report(res, tmp_path, how_to_read=[("Scores:", "from the <task>'s own text")])
    text = md.read_text(encoding="utf-8")
    assert text.endswith("## How to read this\n\n- **Scores:** from the \\<task\\>'s own text\n")
    assert "**Results file:** results.json" in text
    assert "<li><strong>Scores:</strong> from the &lt;task&gt;&#x27;s own text</li>" in html_path.read_text(
        encoding="utf-8"
    )
    assert markdown_table(res, "mc") == markdown_table(results, "mc")  # typed and decoded input agree


def test_otguard_report_command_uses_the_tasks_text(
    tmp_path: Path, results: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from otguard.cli import main as otguard_main
    from otguard.harness.registry import how_to_read

    src = _dump(tmp_path, _no_plot_data(results))
    assert otguard_main(["report", str(src), "--out", str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "cli" / n) for n in ("report.md", "report.html")
    ]
    text = (tmp_path / "cli" / "report.md").read_text(encoding="utf-8")
    res = RunResults.from_dict(results)
    expected = "\n".join(f"- **{_md_escape(lead)}** {_md_escape(rest)}" for lead, rest in how_to_read(res))
    assert text.endswith("## How to read this\n\n" + expected + "\n")


# --------------------------------------------------------------------------------------------------
# Format 3: differences to none, repair/harm, judges, examples, the gate
# --------------------------------------------------------------------------------------------------


def _format3(results: dict[str, Any]) -> dict[str, Any]:
    """The fixture with what a current compare run adds (hand-written values)."""
    results["format_version"], results["task"], results["std_ddof"] = 3, "truthfulqa", 1
    for key in ("started", "seconds", "versions"):
        results[key] = results["config"].pop(key, None)
    results["metrics"]["true"] = {"label": "True (learned judge)", "higher_is_better": True,
                                  "group": "generation", "unit": "%"}  # fmt: skip
    results["metrics"]["repair_rate"] = {"label": "Repaired (learned judge)", "higher_is_better": True,
                                         "group": "repair", "unit": "%"}  # fmt: skip
    results["metrics"]["harm_rate"] = {"label": "Harmed (learned judge)", "higher_is_better": False,
                                       "group": "repair", "unit": "%"}  # fmt: skip
    slim = results["methods"]["slim"]["summary"]
    slim["true"] = {"mean": 0.5, "std": 0.01, "folds": [0.49, 0.51],
                    "delta_vs_none": {"mean": 0.031, "ci95": [0.012, 0.05], "n": 40, "resamples": 2000}}
    slim["repair_rate"] = {"mean": 0.2, "std": 0.0, "folds": [0.2, 0.2],
                           "delta_vs_none": {"mean": 0.2, "ci95": [0.1, 0.3], "n": 40, "resamples": 2000}}
    slim["harm_rate"] = {"mean": 0.1, "std": 0.0, "folds": [0.1, 0.1],
                         "delta_vs_none": {"mean": 0.1, "ci95": [-0.0, 0.2], "n": 40, "resamples": 2000}}
    results["methods"]["none"]["summary"]["true"] = {"mean": 0.469, "std": 0.0, "folds": [0.469, 0.469]}
    results["methods"]["slim"]["folds"][0]["gate"] = {
        "false_flag_rate": 0.4, "catch_rate": 0.7, "guarantee_share": 0.97, "nominal_level": 0.95,
        "bank": {"false_flag_rate": 0.1, "catch_rate": 0.9, "guarantee_rate_val_mean": 0.96}}
    results["judges"] = {
        "true": {"name": "learned truth", "validated": True,
                 "validation": {"name": "learned truth", "model": "TF-IDF", "n_train": 22434,
                                "train_seconds": 61.2,
                                "splits": [{"split": "seen_questions", "accuracy": 0.861, "auroc": 0.912,
                                            "tpr": 0.9, "tnr": 0.8, "n": 5000},
                                           {"split": "unseen_questions_fold0", "accuracy": 0.7, "n": 4000}]}},
        "sem": {"name": "sem:minilm", "validated": False, "note": "not validated here"},
    }
    repaired = {"fold": 0, "question": "Capital of Australia?", "before": "Sydney.", "after": "Canberra."}
    harmed = {"fold": 1, "question": "Great Wall from space?", "before": "No.", "after": "Yes, visible."}
    results["examples"] = {"slim": {"repaired": [repaired], "harmed": [harmed]}}
    return results


def test_difference_tables_print_the_interval_and_star_the_ones_that_exclude_zero(
    tmp_path: Path, results: dict[str, Any]
) -> None:
    md, _ = write_report(_dump(tmp_path, _format3(results)), tmp_path / "out", how_to_read=how_to_read)
    text = md.read_text(encoding="utf-8")
    assert "| Method | True (learned judge, pp) |" in text
    assert "| slim | **+3.1 \\[+1.2, +5.0\\]\\*** |" in text  # markdown-escaped [ ] *
    assert "| Method | Repaired (learned judge, pp) | Harmed (learned judge, pp) |" in text
    assert "| slim | **+20.0 \\[+10.0, +30.0\\]\\*** | +10.0 \\[-0.0, +20.0\\] |" in text
    assert "| iti | – |" in text  # no difference recorded for iti
    assert "| none |" not in text.split("Difference to none")[1].split("###")[0]
    assert "sample standard deviation (ddof = 1)" in text
    assert ("| true | learned truth | yes | seen\\_questions: accuracy 0.861, AUROC 0.912, TPR 0.900, "
            "TNR 0.800, n 5000; unseen\\_questions\\_fold0: accuracy 0.700, n 4000; TF-IDF; 22434 training "
            "labels; trained in 61 s |") in text
    assert "| sem | sem:minilm | no | not validated here |" in text
    assert "| Capital of Australia? | Sydney. | Canberra. |" in text
    assert "slim, harmed (judged true → false):" in text
    assert "| slim | 40.0 | 10.0 | 70.0 | 90.0 | 97.0 | 96.0 | 95.0 |" in text
    assert "](repair.png)" in text and (tmp_path / "out" / "repair.png").read_bytes().startswith(PNG_MAGIC)


def test_repair_plot_is_skipped_without_repair_rates(tmp_path: Path, results: dict[str, Any]) -> None:
    from otguard.report import plot_repair_harm

    assert plot_repair_harm(results, tmp_path / "r.png") is None and not (tmp_path / "r.png").exists()
