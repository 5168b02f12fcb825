"""otguard.io: atomic writes, output folders that never lose a user's files, stale temps, file modes."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otguard import io
from otguard.errors import OutputDirError


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root``: file contents, None for folders."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))
    }


def user_folder(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    (root / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return root


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------ atomic writes
def test_atomic_write_bytes_writes_with_umask_mode_and_leaves_no_temp(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "deep" / "out.json"
    assert io.atomic_write_bytes(target, b"{}") == target
    assert target.read_bytes() == b"{}"
    assert mode(target) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]
    io.atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_atomic_write_bytes_failure_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")

    def broken_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_bytes(target, b"new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_bytes_refuses_a_folder(tmp_path: Path) -> None:
    with pytest.raises(OutputDirError, match="is a folder"):
        io.atomic_write_bytes(tmp_path, b"x")


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 17)
    (tmp_path / "f").write_bytes(data)
    assert io.sha256_file(tmp_path / "f", chunk=1024) == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ atomic_dir
def test_atomic_dir_new_folder_gets_umask_modes(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "policy"
    with io.atomic_dir(target, kind="policy") as tmp:
        (tmp / "a.json").write_text("{}")
        private = tmp / "weights.bin"
        private.write_bytes(b"w")
        os.chmod(private, 0o600)  # what safetensors' save_file does
        (tmp / "nested").mkdir(mode=0o700)
        (tmp / "nested" / "x").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == [io.MARKER, "a.json", "nested", "weights.bin"]
    assert json.loads((target / io.MARKER).read_text()) == {"kind": "policy"}
    assert mode(target) == mode(target / "nested") == 0o777 & ~umask
    for name in ("a.json", "weights.bin", "nested/x", io.MARKER):
        assert mode(target / name) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_atomic_dir_into_a_user_folder_keeps_every_other_file(tmp_path: Path) -> None:
    root = user_folder(tmp_path / "out")
    before = tree(root)
    with io.atomic_dir(root, kind="policy") as tmp:
        (tmp / "policy.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("n")
    after = tree(root)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {"policy.json", "sub/new.txt", io.MARKER}


def test_atomic_dir_refuses_to_replace_a_user_folder_by_a_file(tmp_path: Path) -> None:
    root = user_folder(tmp_path / "out")
    (root / "policy.json").mkdir()
    (root / "policy.json" / "keep.txt").write_text("k")
    before = tree(root)
    with pytest.raises(OutputDirError, match=r"policy\.json"), io.atomic_dir(root) as tmp:
        (tmp / "policy.json").write_text("{}")
        (tmp / "other.txt").write_text("o")
    assert tree(root) == before  # nothing moved in, nothing deleted, no temp left


def test_atomic_dir_exception_leaves_target_untouched(tmp_path: Path) -> None:
    root = user_folder(tmp_path / "out")
    before = tree(root)
    with pytest.raises(KeyboardInterrupt), io.atomic_dir(root) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt
    assert tree(root) == before
    missing = tmp_path / "new"
    with pytest.raises(RuntimeError), io.atomic_dir(missing):
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_dot_writes_into_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with io.atomic_dir(".", kind="policy") as tmp:
        (tmp / "policy.json").write_text("{}")
    assert sorted(p.name for p in work.iterdir()) == [io.MARKER, "policy.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # nothing next to it


# ------------------------------------------------------------------------------ prepare_output_dir
def test_prepare_output_dir_accepts_new_empty_and_same_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert io.prepare_output_dir(tmp_path / "a" / "b", "policy") == (tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()  # checking creates nothing
    (tmp_path / "empty").mkdir()
    assert io.prepare_output_dir(tmp_path / "empty", "policy") == tmp_path / "empty"
    with io.atomic_dir(tmp_path / "pol", kind="policy") as tmp:
        (tmp / "policy.json").write_text("{}")
    assert io.prepare_output_dir(tmp_path / "pol", "policy") == tmp_path / "pol"
    # a policy folder written before the marker existed is recognised by its files
    old = tmp_path / "old"
    old.mkdir()
    (old / "policy.json").write_text("{}")
    (old / "tensors.safetensors").write_bytes(b"")
    assert io.output_kind(old) == "policy"
    assert io.prepare_output_dir(old, "policy") == old
    monkeypatch.chdir(tmp_path / "empty")
    assert io.prepare_output_dir(".", "policy") == tmp_path / "empty"


def test_prepare_output_dir_refuses_a_user_folder_unless_forced(tmp_path: Path) -> None:
    root = user_folder(tmp_path / "mine")
    before = tree(root)
    with pytest.raises(OutputDirError) as info:
        io.prepare_output_dir(root, "policy")
    message = str(info.value)
    assert "--out" in message and "not empty" in message and "--force" in message
    assert "notes.txt" in message and "sub/" in message
    assert io.prepare_output_dir(root, "policy", force=True) == root
    with pytest.raises(OutputDirError, match="force=True"):
        io.prepare_output_dir(root, "policy", option="directory")
    assert tree(root) == before


def test_prepare_output_dir_refuses_another_kind_a_file_and_empty(tmp_path: Path) -> None:
    with io.atomic_dir(tmp_path / "acts", kind="activations") as tmp:
        (tmp / "meta.json").write_text("{}")
    with pytest.raises(OutputDirError, match="otguard activations output"):
        io.prepare_output_dir(tmp_path / "acts", "policy")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(OutputDirError, match="is a file"):
        io.prepare_output_dir(tmp_path / "f.txt", "policy")
    with pytest.raises(OutputDirError, match="is a file"):
        io.prepare_output_dir(tmp_path / "f.txt" / "sub", "policy")
    with pytest.raises(OutputDirError, match="empty"):
        io.prepare_output_dir("  ", "policy")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_prepare_output_dir_refuses_an_unwritable_parent(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(OutputDirError, match="no permission"):
        io.prepare_output_dir(locked / "out", "policy")


# ------------------------------------------------------------------------------ stale temps
def test_remove_stale_temps(tmp_path: Path) -> None:
    host = io._host_tag()
    dead = tmp_path / f".otguard-tmp-{dead_pid()}-{host}-0123abcd.policy"
    live = tmp_path / f".otguard-tmp-{os.getppid()}-{host}-0123abcd.acts"
    own = tmp_path / io.temp_name("x")
    other_host_old = tmp_path / ".otguard-tmp-1-ffffffff-0123abcd.y"
    other_host_new = tmp_path / ".otguard-tmp-1-fffffffe-0123abcd.z"
    legacy_old = tmp_path / "..tmp-ab_cd123"  # `fit --out .` of older versions
    legacy_new = tmp_path / ".acts.tmp-abcdefgh"
    user = tmp_path / ".config.tmp"  # not one of ours
    for p in (dead, live, own, other_host_old, other_host_new, legacy_old, legacy_new):
        p.mkdir()
        (p / "big.bin").write_bytes(b"x" * 10)
    user.write_text("keep")
    old = time.time() - 48 * 3600
    for p in (other_host_old, legacy_old):
        os.utime(p, (old, old))
    removed = io.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, other_host_old.name, legacy_old.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, own.name, other_host_new.name, legacy_new.name, user.name]
    )


def test_writes_clean_stale_temps_next_to_them(tmp_path: Path) -> None:
    dead = tmp_path / f".otguard-tmp-{dead_pid()}-{io._host_tag()}-0123abcd.policy"
    dead.mkdir()
    io.atomic_write_text(tmp_path / "x.txt", "x")
    assert not dead.exists()
    dead.mkdir()
    with io.atomic_dir(tmp_path / "new"):
        pass
    assert not dead.exists()
    inner = tmp_path / "new" / f".otguard-tmp-{dead_pid()}-{io._host_tag()}-0123abcd.new"
    inner.mkdir()
    io.prepare_output_dir(tmp_path / "new", "policy")  # a stale temp does not make a folder non-empty
    with io.atomic_dir(tmp_path / "new"):
        pass
    assert not inner.exists()
