"""``report.html`` opened in a real browser (headless Debian Chromium, driven by Playwright).

The HTML report is a page people open in a browser, so string checks on the file are not enough: here
Chromium loads it from disk and the test asks the page itself whether every image decoded (at the size
of the PNG written next to it), whether every table has the rows and cells the report's tables have,
and whether the page asked for anything but its own file (it must work offline and leak nothing).

Skipped, with the reason, only where Chromium or the ``playwright`` package is absent; ``.ci/run``
installs Debian's ``chromium`` when it is missing. Playwright's own browser downloads are never used:
the system Chromium is launched by path.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otguard.report import results_table, write_report
from otguard.report.tables import MISSING
from otguard.results import RunResults

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "results_small.json"
SWEEP_FIXTURE = FIXTURE.parent / "results_sweep.json"  # a run with hyper-parameter sweeps
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Table groups the fixture fills, in report order (the "How to read" list explains them).
GROUPS = ["mc", "generation", "transfer", "side-effects", "detector"]


def _chromium() -> str | None:
    """``$OTGUARD_CHROMIUM`` (when it is an executable), else Debian's chromium on PATH or in /usr/bin."""
    env = os.environ.get("OTGUARD_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (bytes 16-24), the reference for naturalWidth/Height."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[dev]')"
    )
    executable = _chromium()
    if executable is None:
        pytest.skip(
            "Chromium not found: install Debian's chromium (apt-get install chromium), as .ci/run does, "
            "or point $OTGUARD_CHROMIUM at a Chromium executable"
        )
    with sync_api.sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("browser-report")
    write_report(FIXTURE, out)
    return out


@pytest.fixture(scope="module")
def loaded(browser: Any, report_dir: Path) -> Iterator[dict[str, Any]]:
    """The report opened in a fresh page: the page, every request it made, console errors and the URL."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    page = context.new_page()
    requests: list[str] = []
    errors: list[str] = []
    context.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    url = (report_dir / "report.html").as_uri()
    page.goto(url, wait_until="load")
    page.wait_for_load_state("networkidle")
    try:
        yield {"page": page, "requests": requests, "errors": errors, "url": url}
    finally:
        context.close()


def test_every_image_loaded_at_its_png_size(loaded: dict[str, Any], report_dir: Path) -> None:
    images = loaded["page"].evaluate(
        "() => Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,"
        " w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().width}))"
    )
    expected = [_png_size(report_dir / name) for name in ("detector.png", "tradeoff.png", "flags.png")]
    assert [(img["w"], img["h"]) for img in images] == expected
    assert all(img["complete"] and img["w"] > 0 and img["shown"] > 0 for img in images)
    assert [img["alt"] for img in images] == [
        "Detector FPR and FNR per layer",
        "True×Info (product) versus KL per method",
        "Flag rate and edited heads per method",
    ]


def test_every_table_rendered_with_the_report_cells(loaded: dict[str, Any]) -> None:
    tables = loaded["page"].evaluate(
        "() => Array.from(document.querySelectorAll('table')).map(t => Array.from(t.rows).map("
        "r => Array.from(r.cells).map(c => c.innerText.trim())))"
    )
    base = RunResults.from_json(FIXTURE)
    expected = []
    for group in GROUPS:
        header, *rows = [[cell.replace("**", "") for cell in row] for row in results_table(base, group)]
        # the report leaves out a method that has none of a group's metrics (e.g. no transfer figures)
        expected.append([header] + [row for row in rows if any(cell != MISSING for cell in row[1:])])
    assert tables == expected
    # Bold in the browser is exactly the cells the table marks best.
    bold = loaded["page"].evaluate(
        "() => Array.from(document.querySelectorAll('td strong')).map(s => s.innerText.trim())"
    )
    marked = [
        c.strip("*") for g in GROUPS for row in results_table(base, g)[1:] for c in row if c[:2] == "**"
    ]
    assert bold == marked
    headings = loaded["page"].evaluate(
        "() => Array.from(document.querySelectorAll('h3')).map(h => h.innerText)"
    )
    assert headings[:5] == [
        "Multiple choice",
        "Generation (judged answers)",
        "Transfer to other data",
        "Side effects on natural text",
        "Detector and edits",
    ]


def test_nothing_fetched_but_the_file(loaded: dict[str, Any]) -> None:
    fetched = [u for u in loaded["requests"] if not u.startswith("data:")]
    assert fetched == [loaded["url"]]
    assert loaded["errors"] == []


def test_page_fits_its_width(loaded: dict[str, Any]) -> None:
    """Nothing spills sideways: tables and images stay inside the text column."""
    page = loaded["page"]
    for width in (1280, 480):  # a laptop and a phone: wide tables scroll inside their own box
        page.set_viewport_size({"width": width, "height": 900})
        sizes = page.evaluate(
            "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        assert sizes[0] == sizes[1], f"the page is {sizes[0]} px wide in a {sizes[1]} px window"


# --------------------------------------------------------------------------------------------------
# A run with hyper-parameter sweeps: the frontier plot and the sweep tables in the browser
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep_page(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    out = tmp_path_factory.mktemp("browser-sweep")
    write_report(SWEEP_FIXTURE, out)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    page = context.new_page()
    page.goto((out / "report.html").as_uri(), wait_until="load")
    try:
        yield page, out
    finally:
        context.close()


def test_sweep_report_shows_the_frontier_and_the_sweep_tables(sweep_page: tuple[Any, Path]) -> None:
    from otguard.report import pareto_table, sweep_table

    page, out = sweep_page
    images = page.evaluate(
        "() => Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,"
        " w: i.naturalWidth, h: i.naturalHeight}))"
    )
    frontier = [i for i in images if i["alt"] == "Test truthfulness versus test KL for every grid point"]
    assert len(frontier) == 1 and frontier[0]["complete"]
    assert (frontier[0]["w"], frontier[0]["h"]) == _png_size(out / "frontier.png")
    # Each h3's first table, as the browser shows it, against the report's own cells.
    shown = dict(
        page.evaluate(
            "() => Array.from(document.querySelectorAll('h3')).map(h => { let e = h.nextElementSibling;"
            " while (e && e.tagName !== 'H3' && !e.querySelector('table')) e = e.nextElementSibling;"
            " const t = e && e.tagName !== 'H3' ? e.querySelector('table') : null;"
            " return [h.innerText, t ? Array.from(t.rows).map(r => Array.from(r.cells).map("
            "c => c.innerText.trim())) : null]; })"
        )
    )
    res = RunResults.from_json(SWEEP_FIXTURE)
    for title, (header, rows) in (
        ("Pareto points: test MC2 vs. test KL", pareto_table(res, "mc2", "kl")),
        ("Pareto points: test True vs. test KL", pareto_table(res, "true", "kl")),
        ("Grid of iti", sweep_table(res, "iti")),
        ("Grid of slim", sweep_table(res, "slim")),
    ):
        assert shown[title] == [header] + [[c.text for c in row] for row in rows], title
    page.set_viewport_size({"width": 480, "height": 900})
    sizes = page.evaluate(
        "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    assert sizes[0] == sizes[1]
