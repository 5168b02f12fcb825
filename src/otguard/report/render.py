"""Markdown and HTML renderings of the report's blocks, and of one table.

The HTML page is self-contained: the PNGs are embedded as base64 data URIs and the style sheet is inline,
so the file can be mailed or opened from anywhere and the browser fetches nothing. All text from the
results file is escaped (Markdown syntax backslash-escaped, HTML through :func:`html.escape`).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from otguard.report.document import Block
from otguard.report.tables import Cell, ResultsLike, as_results, table

__all__ = ["markdown_table", "render_html", "render_markdown"]


def _md_escape(text: str) -> str:
    """Backslash-escape markdown syntax in text that comes from the results file (or prose)."""
    return "".join("\\" + ch if ch in "\\`*_[]<>|#" else ch for ch in str(text))


def _md_table(header: list[str], rows: list[list[Cell]]) -> str:
    def cell(c: Cell) -> str:
        text = _md_escape(c.text)
        return f"**{text}**" if c.bold else text

    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |"]
    lines.append("|" + "|".join([":--"] + ["--:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(results: ResultsLike, group: str | None = None) -> str:
    """:func:`~otguard.report.results_table` as a GitHub-flavoured markdown table ("" if nothing to show)."""
    header, rows = table(as_results(results), group)
    return _md_table(header, rows) if header else ""


def _html_table(header: list[str], rows: list[list[Cell]]) -> str:
    esc = html.escape
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in header)
    body = []
    for row in rows:
        cells = [f'<th scope="row">{esc(row[0].text)}</th>']
        cells += [
            f"<td><strong>{esc(c.text)}</strong></td>" if c.bold else f"<td>{esc(c.text)}</td>"
            for c in row[1:]
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n'
        + "\n".join(body)
        + "\n</tbody>\n</table></div>"
    )


def render_markdown(blocks: list[Block]) -> str:
    """``report.md``: images are linked by file name (the PNGs sit next to it)."""
    out: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + _md_escape(b.text))
        elif b.kind == "p":
            out.append(_md_escape(b.text))
        elif b.kind == "ul":
            out.append("\n".join(f"- **{_md_escape(lead)}** {_md_escape(rest)}" for lead, rest in b.items))
        elif b.kind == "table":
            out.append(_md_table(list(b.header), [list(r) for r in b.rows]))
        elif b.kind == "img":
            out.append(f"![{_md_escape(b.alt or b.text)}]({b.text})")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 62rem; margin: 2rem auto;
       padding: 0 1rem; color: #1f2328; line-height: 1.5; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2rem; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-variant-numeric: tabular-nums;
        font-size: .92rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .5rem; }
thead th { background: #f6f8fa; text-align: right; } thead th:first-child { text-align: left; }
td { text-align: right; white-space: nowrap; }
tbody th { text-align: left; font-weight: 600; white-space: nowrap; }
img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
""".strip()


def render_html(blocks: list[Block], image_dir: Path) -> str:
    """``report.html``: one self-contained page; the PNGs of the image blocks are read from ``image_dir``."""
    esc = html.escape
    title = next((b.text for b in blocks if b.kind == "h1"), "otguard report")
    body: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{esc(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{esc(b.text)}</p>")
        elif b.kind == "ul":
            lis = "".join(f"<li><strong>{esc(lead)}</strong> {esc(rest)}</li>" for lead, rest in b.items)
            body.append(f"<ul>{lis}</ul>")
        elif b.kind == "table":
            body.append(_html_table(list(b.header), [list(r) for r in b.rows]))
        elif b.kind == "img":
            data = base64.b64encode((image_dir / b.text).read_bytes()).decode("ascii")
            body.append(f'<p><img alt="{esc(b.alt or b.text)}" src="data:image/png;base64,{data}"></p>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(title)}</title>\n'
        f"<style>\n{_CSS}\n</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
