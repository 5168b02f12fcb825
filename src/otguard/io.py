"""The ground floor for writing files: atomic writes, output folders, stale temp cleanup, the version.

Every otguard output goes through here so that

- a reader never sees half a file or half a folder (write into a temp name next to the target,
  then ``os.replace``);
- outputs get the modes any other file gets (``0o666``/``0o777`` minus the umask), not the
  ``0600``/``0700`` of :func:`tempfile.mkstemp`/:func:`tempfile.mkdtemp`, so a policy can be
  shared on a team machine;
- temp names are recognisable (``.otguard-tmp-<pid>-<host>-<random>.<name>``), so the temps that a
  killed run leaves behind are removed by the next write into the same folder;
- a user's files are never deleted: writing into an existing folder moves the new files in and
  leaves every other file where it is, and :func:`prepare_output_dir` refuses a non-empty folder
  that is not an otguard output of the same kind unless asked to (``force``).

This module imports nothing else from otguard except the errors, so any module may use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from otguard.errors import OutputDirError

logger = logging.getLogger(__name__)

FALLBACK_VERSION = "0.1.0"  # used when the package metadata is absent (a source tree on sys.path)
MARKER = ".otguard-output"  # JSON {"kind": ...}: what wrote this folder
STALE_HOURS = 24.0

_TEMP_RE = re.compile(r"^\.otguard-(?:tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}\.")
# Names of temps written before this module existed (mkdtemp/mkstemp): no owner pid, so age decides.
_LEGACY_TEMP_RE = re.compile(r"^\..*(?:\.tmp-[A-Za-z0-9_]{8}|\.old-\d+|\.[A-Za-z0-9_]{8}\.tmp)$")
# Files that identify an output kind written before the marker existed.
_KIND_FILES = {
    "policy": {"policy.json", "tensors.safetensors"},
    "activations": {"activations.safetensors", "meta.json"},
    # otguard compare folders written before the marker (results, CSV, report and its plots)
    "compare": {"results.json", "answers.csv", "continuations.csv", "report.md", "report.html",
                "detector.png", "tradeoff.png", "flags.png"},  # fmt: skip
}


def package_version() -> str:
    """The installed otguard version (package metadata), else :data:`FALLBACK_VERSION`."""
    try:
        return metadata.version("otguard")
    except metadata.PackageNotFoundError:
        return FALLBACK_VERSION


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` minus the process umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder: ``0o777`` minus the process umask."""
    return 0o777 & ~_umask()


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_name(name: str, kind: str = "tmp") -> str:
    """A recognisable temp name for ``name``: owner pid and host are part of it."""
    return f".otguard-{kind}-{os.getpid()}-{_host_tag()}-{secrets.token_hex(4)}.{name}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(
    folder: str | os.PathLike[str],
    max_age_hours: float = STALE_HOURS,
    *,
    legacy: re.Pattern[str] | None = None,
) -> list[Path]:
    """Remove the temps that dead writers left in ``folder``; returns what was removed.

    A temp of this host is stale as soon as its owner pid is dead; a temp of another host (a
    shared file system) or one in the pre-marker naming (no pid) once it is older than
    ``max_age_hours``. Temps of live writers are never touched. ``legacy``: one more name pattern
    of old, pid-less temps in this folder (removed by age, like the built-in old names).
    """
    root = Path(folder)
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    host, now, removed = _host_tag(), time.time(), []
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        old_name = match is None and (
            _LEGACY_TEMP_RE.match(entry.name) is not None
            or (legacy is not None and legacy.match(entry.name) is not None)
        )
        if match is None and not old_name:
            continue
        try:
            age_h = (now - entry.lstat().st_mtime) / 3600.0
        except OSError:
            continue
        if match is not None and match["host"] == host:
            pid = int(match["pid"])
            stale = pid != os.getpid() and not _pid_alive(pid)
        else:
            stale = age_h > max_age_hours
        if stale:
            _remove(entry)
            removed.append(entry)
    if removed:
        logger.info("Removed %d stale temp(s) left by interrupted runs in %s", len(removed), root)
    return removed


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file + ``os.replace``: readers never see half a file."""
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        raise OutputDirError(f"{target} is a folder; cannot write a file there.")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent)
    tmp = target.with_name(temp_name(target.name))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in chunks: tensor files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, recursively through dicts, lists and tuples
    (strict JSON, as results.json and policy.json are, has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_finite(v) for v in value]
    return value


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write_bytes` for text."""
    return atomic_write_bytes(path, text.encode(encoding))


def write_marker(directory: str | os.PathLike[str], kind: str) -> Path:
    """Mark ``directory`` as an otguard output of ``kind`` (read by :func:`prepare_output_dir`)."""
    return atomic_write_text(Path(directory) / MARKER, json.dumps({"kind": kind}) + "\n")


def output_kind(directory: str | os.PathLike[str]) -> str | None:
    """The kind of otguard output ``directory`` holds (marker, else known files), or ``None``."""
    root = Path(directory)
    try:
        data = json.loads((root / MARKER).read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("kind"), str):
            return str(data["kind"])
    except (OSError, ValueError):
        pass
    try:
        names = {p.name for p in root.iterdir() if not _TEMP_RE.match(p.name)}
    except OSError:
        return None
    for kind, files in _KIND_FILES.items():
        if names and names <= files | {MARKER}:
            return kind
    return None


def _usual_modes(root: Path) -> None:
    """Give every file and folder under ``root`` the modes of :func:`file_mode` / its folder twin.

    Some writers create private files (safetensors' ``save_file`` makes 0600), which would make a
    policy unreadable to the rest of a team; otguard outputs are as readable as any new file.
    """
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), dmode)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, fmode)


def _conflicts(src: Path, dst: Path) -> list[Path]:
    """Entries of ``dst`` that the merge of ``src`` would have to delete (a file where a folder
    goes or a folder where a file goes): a user's data is never removed to make room."""
    out: list[Path] = []
    for entry in src.iterdir():
        dest = dst / entry.name
        if not (dest.exists() or dest.is_symlink()):
            continue
        src_dir, dest_dir = entry.is_dir(), dest.is_dir() and not dest.is_symlink()
        if src_dir and dest_dir:
            out.extend(_conflicts(entry, dest))
        elif src_dir != dest_dir:
            out.append(dest)
    return out


def _merge_into(src: Path, dst: Path) -> None:
    """Move every entry of ``src`` into the existing folder ``dst``; data files before JSON files
    (which index them) and the marker last. Entries of ``dst`` not in ``src`` stay; same-named
    files are replaced (each by one atomic rename)."""

    def order(p: Path) -> tuple[int, str]:
        return (2 if p.name == MARKER else 1 if p.suffix == ".json" else 0, p.name)

    for entry in sorted(src.iterdir(), key=order):
        dest = dst / entry.name
        if entry.is_dir() and dest.is_dir() and not dest.is_symlink():
            _merge_into(entry, dest)
            entry.rmdir()
        else:
            os.replace(entry, dest)


@contextmanager
def atomic_dir(target: str | os.PathLike[str], *, kind: str | None = None) -> Iterator[Path]:
    """Write a folder atomically: ``with atomic_dir(path) as tmp: ...write into tmp...``.

    A missing ``target`` is written in a temp folder next to it and created by one rename. An
    existing one (``.`` included) gets the temp folder inside it; on success the new files are
    moved in (replacing same-named files, one rename each) and every other file is kept. On an
    exception the temp folder is removed and ``target`` is untouched. With ``kind``, the folder is
    marked as an otguard output of that kind.
    """
    dest = Path(target).expanduser().resolve()
    if dest.exists() and not dest.is_dir():
        raise OutputDirError(f"{dest} exists and is not a folder; choose another output path.")
    existing = dest.is_dir()
    if existing:
        remove_stale_temps(dest)
        tmp = dest / temp_name("new")
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest.parent)
        tmp = dest.with_name(temp_name(dest.name))
    os.mkdir(tmp, 0o777)  # the umask applies, unlike mkdtemp's 0700
    try:
        yield tmp
        if kind is not None:
            (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")
        _usual_modes(tmp)
        if dest.is_dir():
            clash = _conflicts(tmp, dest)
            if clash:
                raise OutputDirError(
                    f"{dest} holds {', '.join(str(c.relative_to(dest)) for c in clash[:4])} where otguard "
                    "writes a file (or a folder) of that name; nothing was written. Move it away or "
                    "choose another output folder."
                )
            _merge_into(tmp, dest)
            tmp.rmdir()
        else:
            if dest.exists() or dest.is_symlink():
                raise OutputDirError(f"{dest} exists and is not a folder; choose another output path.")
            try:
                os.replace(tmp, dest)
            except OSError:
                if not dest.is_dir():  # a concurrent writer created it: merge instead
                    raise
                _merge_into(tmp, dest)
                tmp.rmdir()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _listing(root: Path, limit: int = 4) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def prepare_output_dir(
    path: str | os.PathLike[str], kind: str, *, force: bool = False, option: str = "--out"
) -> Path:
    """Resolve and check an output folder before any work; returns the absolute path.

    Accepts a missing folder (its nearest existing parent must be a writable folder), an empty
    one, or one that already holds an otguard output of the same ``kind`` (it is updated).
    Refuses any other non-empty folder unless ``force`` (then otguard's files are written into it
    and the other files are kept). ``option`` names the setting in the messages.
    """
    raw = os.fspath(path)
    if not raw.strip():
        raise OutputDirError(f"{option} is empty; give the folder to write.")
    target = Path(raw).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"{option} {target} is a file, not a folder; choose a folder to write.")
    if target.is_dir():
        try:
            non_empty = any(not _TEMP_RE.match(p.name) for p in target.iterdir())
        except OSError as exc:
            raise OutputDirError(f"{option} {target} cannot be read ({exc.strerror}).") from exc
        if non_empty and not force:
            found = output_kind(target)
            if found != kind:
                hint = "--force" if option.startswith("--") else "force=True"
                what = f"an otguard {found} output" if found else f"not an otguard {kind} output"
                raise OutputDirError(
                    f"{option} {target} is not empty and is {what} (it holds {_listing(target)}); "
                    f"choose a new or empty folder, or pass {hint} to write into it "
                    "(files otguard does not write are kept)."
                )
        writable = target
    else:
        writable = target.parent
        while not writable.exists():
            writable = writable.parent
        if not writable.is_dir():
            raise OutputDirError(f"{option} {target}: {writable} is a file, so the folder cannot be made.")
    if not os.access(writable, os.W_OK | os.X_OK):
        raise OutputDirError(f"{option} {target}: no permission to write in {writable}.")
    if target.parent.is_dir():
        remove_stale_temps(target.parent)
    return target
