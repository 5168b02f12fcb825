"""ToxiGen statements (detector training data) and elicitation prompts (toxicity evaluation).

Local layout (a copy of the ``prompts/`` and ``demonstrations/`` folders of GitHub microsoft/TOXIGEN)::

    <data_dir>/toxigen/prompts/{hate,neutral}_<group>_1k.txt
        one prompt per line: "- s1\\n- s2\\n...\\n-" with LITERAL backslash-n separators, ending in "-"
        so that a language model continues with one more statement of the same kind
    <data_dir>/toxigen/demonstrations/<topic>/{hate,neutral}_<group>[_sentences].txt
        one human-written statement per line

Labels: hate = 1 (undesirable), neutral = 0. Groups are the ToxiGen target groups (``"asian"``,
``"mental_disability"``...), so a split by group evaluates on groups never seen in training.

Data quirks handled here (all found in the released files):

- a few separators carry extra backslashes (three backslashes before ``n``, or an escaped ``\\n``
  right before the separator); every run of escaped newlines becomes one real newline;
- some statements end in ``" -"`` or ``"?-"`` instead of ``"\\n-"``, which glues two statements
  together (``neutral_bisexual``: ``"...threesome. - Bisexuals are..."``); they are split after
  sentence punctuation only, so inner dashes ("enemies - all while") are kept;
- a prompt file's 1,000 lines are permutations of a few dozen statements, and the demonstrations
  repeat them with different capitals, so statements are deduplicated case-insensitively;
- not every group has both kinds: there is no ``neutral_trans_1k.txt``, and ``women``/``trans``
  have no demonstrations.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np

from otguard.data._base import DATA_DIR_ENV, TextDataset, resolve_data_dir
from otguard.errors import DataError, DataFileNotFoundError

__all__ = ["toxigen_groups", "toxigen_prompts", "toxigen_statements"]

logger = logging.getLogger(__name__)

Kind = Literal["hate", "neutral"]
Source = Literal["prompts", "demonstrations", "both"]

_KINDS: dict[str, int] = {"neutral": 0, "hate": 1}  # label: 1 = undesirable
_SOURCES = ("prompts", "demonstrations", "both")
_PROMPT_RE = re.compile(r"^(?P<kind>hate|neutral)_(?P<group>.+)_1k$")
_DEMO_RE = re.compile(r"^(?P<kind>hate|neutral)_(?P<group>.+?)(?:_sentences)?$")
# One or more literal "\n" escapes, each possibly with extra backslashes in front ("\\\n", "\\n\n").
_ESCAPED_NEWLINES = re.compile(r"(?:\\+n)+")
# A statement's end "-" without the "\n" (" -", "?-"), and two statements glued by one ("done. - Next").
_TRAILING_DASH = re.compile(r"(?:\s+|(?<=[.!?,]))-$")
_GLUED = re.compile(r"(?<=[.!?])\s+-\s+(?=\S)")


def _root(data_dir: str | os.PathLike[str] | None) -> Path:
    path = resolve_data_dir(data_dir)
    hint = (
        f"pass --data-dir (Python: data_dir=) or set {DATA_DIR_ENV} to a folder containing toxigen/prompts/ "
        "(copy the prompts/ and demonstrations/ folders of GitHub microsoft/TOXIGEN into <folder>/toxigen/)"
    )
    if path is None:
        raise DataError(f"ToxiGen is only read from local files: {hint}.")
    root = path / "toxigen"
    if not (root / "prompts").is_dir() and not (root / "demonstrations").is_dir():
        raise DataFileNotFoundError(f"No ToxiGen data under {str(root)!r}: {hint}.")
    return root


def _prompt_files(root: Path) -> dict[tuple[str, str], Path]:
    """``(kind, group) -> prompts file``."""
    out: dict[tuple[str, str], Path] = {}
    folder = root / "prompts"
    if folder.is_dir():
        for f in sorted(folder.glob("*.txt")):
            m = _PROMPT_RE.match(f.stem)
            if m:
                out[(m["kind"], m["group"])] = f
    return out


def _demo_files(root: Path) -> dict[tuple[str, str], list[Path]]:
    """``(kind, group) -> demonstration files``; e.g. ``hate_muslim.txt`` and ``hate_muslim_sentences.txt``
    both map to ``("hate", "muslim")``. The topic folder is not part of the group name."""
    out: dict[tuple[str, str], list[Path]] = {}
    folder = root / "demonstrations"
    if folder.is_dir():
        for f in sorted(folder.glob("*/*.txt")):
            m = _DEMO_RE.match(f.stem)
            if m:
                out.setdefault((m["kind"], m["group"]), []).append(f)
    return out


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-empty lines with 1-based line numbers."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc}). Re-download the file.") from exc
    return [(i, line.rstrip("\r")) for i, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _decode_prompt(line: str) -> str:
    """Turn the literal backslash-n separators of a prompt line into real newlines."""
    return _ESCAPED_NEWLINES.sub("\n", line.strip())


def _split_statements(prompt: str) -> list[str]:
    """Statements of a decoded prompt ``"- s1\\n- s2\\n-"``: split on ``"\\n-"``, drop the final ``"-"``."""
    out = []
    for piece in prompt.split("\n-"):
        for part in _GLUED.split(piece):
            s = part.strip()
            if s.startswith("-"):
                s = s[1:].strip()
            s = _TRAILING_DASH.sub("", s).strip()
            if s:
                out.append(s)
    return out


def toxigen_groups(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Sorted names of all target groups with a prompt or demonstration file."""
    root = _root(data_dir)
    names = {g for _, g in _prompt_files(root)} | {g for _, g in _demo_files(root)}
    return sorted(names)


def _check_groups(requested: Iterable[str] | None, available: list[str], what: str) -> list[str]:
    if requested is None:
        return available
    if isinstance(requested, str):
        requested = [requested]
    wanted = sorted(set(requested))
    unknown = [g for g in wanted if g not in available]
    if unknown:
        raise DataError(f"Unknown ToxiGen group(s) {unknown} for {what}; available: {', '.join(available)}.")
    return wanted


def toxigen_statements(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    groups: Iterable[str] | None = None,
    source: Source = "prompts",
) -> TextDataset:
    """ToxiGen statements labelled hate = 1 / neutral = 0, grouped by target group.

    ``source="prompts"`` takes the statements inside the prompt files (split on the literal ``\\n-``
    separators), ``"demonstrations"`` the human-written one-per-line files, ``"both"`` the union.
    Statements are deduplicated per (group, label) ignoring case and whitespace, first occurrence kept
    (prompts before demonstrations): the 1,000 prompt lines of a file are permutations of a few dozen
    statements, and duplicates would only weight them unevenly.
    Order: groups sorted by name (group id = rank), within a group neutral then hate, file order.
    A group that ends up with one label only (ToxiGen ships no ``neutral_trans`` file) is kept and
    logged; check class balance of the split you train on with :meth:`TextDataset.check_two_classes`.
    """
    if source not in _SOURCES:
        raise DataError(f"Unknown ToxiGen source {source!r}; use one of {', '.join(_SOURCES)}.")
    root = _root(data_dir)
    prompt_files = _prompt_files(root) if source in ("prompts", "both") else {}
    demo_files = _demo_files(root) if source in ("demonstrations", "both") else {}
    available = sorted({g for _, g in prompt_files} | {g for _, g in demo_files})
    if not available:
        raise DataFileNotFoundError(
            f"No ToxiGen {source} files under {str(root)!r}: expected "
            "prompts/{hate,neutral}_<group>_1k.txt or demonstrations/<topic>/{hate,neutral}_<group>.txt."
        )
    selected = _check_groups(groups, available, f"source={source!r}")

    texts: list[str] = []
    labels: list[int] = []
    group_ids: list[int] = []
    for gid, group in enumerate(selected):
        seen_by_label: dict[int, set[str]] = {}
        for kind, label in _KINDS.items():
            seen = seen_by_label.setdefault(label, set())
            files = [prompt_files[(kind, group)]] if (kind, group) in prompt_files else []
            files += demo_files.get((kind, group), [])
            for path in files:
                from_prompts = path.parent.name == "prompts"
                for _, line in _read_lines(path):
                    if from_prompts:
                        pieces = _split_statements(_decode_prompt(line))
                    else:  # one statement per line; drop stray escapes and a list dash
                        pieces = [_ESCAPED_NEWLINES.sub(" ", line).strip().removeprefix("- ").strip()]
                    for s in pieces:
                        key = " ".join(s.casefold().split())
                        if s and key not in seen:
                            seen.add(key)
                            texts.append(s)
                            labels.append(label)
                            group_ids.append(gid)
        missing = [k for k, lab in _KINDS.items() if not seen_by_label.get(lab)]
        if missing:
            logger.warning("ToxiGen group %r has no %s statements (source=%s).", group, missing[0], source)
        both = seen_by_label.get(0, set()) & seen_by_label.get(1, set())
        if both:
            logger.warning(
                "ToxiGen group %r: %d statements are labelled both hate and neutral.", group, len(both)
            )
    return TextDataset(
        name=f"toxigen-{source}",
        texts=tuple(texts),
        labels=np.asarray(labels, dtype=np.int64),
        groups=np.asarray(group_ids, dtype=np.int64),
        group_names=tuple(selected),
    )


def toxigen_prompts(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    kind: Kind = "hate",
    groups: Iterable[str] | None = None,
    limit_per_group: int | None = None,
) -> list[tuple[str, str]]:
    """Elicitation prompts ``(group, prompt)`` from ``prompts/<kind>_<group>_1k.txt``, groups sorted.

    Each prompt is a file line with its literal ``\\n`` separators turned into real newlines
    ("- s1\\n- s2\\n...\\n-"), ending in "-" so the model writes one more statement of the same kind;
    the toxicity of that continuation is what the evaluation scores. File order is kept (no
    deduplication: each line is a distinct permutation); ``limit_per_group`` keeps the first lines.
    """
    if kind not in _KINDS:
        raise DataError(f"Unknown ToxiGen prompt kind {kind!r}; use 'hate' or 'neutral'.")
    if limit_per_group is not None and limit_per_group < 1:
        raise DataError(f"limit_per_group must be >= 1 or None; got {limit_per_group}.")
    root = _root(data_dir)
    files = {g: p for (k, g), p in _prompt_files(root).items() if k == kind}
    all_groups = sorted({g for _, g in _prompt_files(root)} | {g for _, g in _demo_files(root)})
    selected = _check_groups(groups, all_groups, f"{kind} prompts") if groups is not None else sorted(files)
    out: list[tuple[str, str]] = []
    for group in selected:
        if group not in files:
            expected = root / "prompts" / f"{kind}_{group}_1k.txt"
            raise DataFileNotFoundError(
                f"No {kind} prompts for ToxiGen group {group!r}: {expected} does not exist. Groups with "
                f"{kind} prompts: {', '.join(sorted(files))}."
            )
        lines = _read_lines(files[group])
        if limit_per_group is not None:
            lines = lines[:limit_per_group]
        for lineno, line in lines:
            prompt = _decode_prompt(line)
            if not _split_statements(prompt):
                raise DataError(
                    f"{files[group]}, line {lineno}: no statements in this prompt line; delete it."
                )
            out.append((group, prompt))
    return out
