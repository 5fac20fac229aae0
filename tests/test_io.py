"""Atomic writes (keystone_kernels._io): a folder replaced by atomic_dir is never lost, whenever the writer dies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_killed

from keystone_kernels.utils import io as _io


def _folder_with(path: Path, text: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "a.txt").write_text(text)
    (path / "b.txt").write_text(text * 2)


def _complete(path: Path) -> str | None:
    """The version a folder holds ("old" / "new"), or None when it is missing or torn."""
    try:
        a, b = (path / "a.txt").read_text(), (path / "b.txt").read_text()
    except OSError:
        return None
    return a if b == a * 2 else None


def _killed_replacement(parent: Path, kill_at: int, use_exchange: bool) -> int:
    """Fork a writer that replaces ``parent/merged`` ("old") by a new folder ("new") and dies (``os._exit``,
    like SIGKILL) before its ``kill_at``-th file-system operation; returns its exit code (0: it finished)."""
    _folder_with(parent / "merged", "old")

    def work(boundary):
        _io.exchange = boundary(_io.exchange if use_exchange else (lambda a, b: False))
        with _io.atomic_dir(parent / "merged") as tmp:
            _folder_with(Path(tmp), "new")

    return run_killed(kill_at, work)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("use_exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_replaced_folder_survives_a_kill_at_every_boundary(tmp_path, use_exchange):
    """The start-up clean-up (remove_temporaries) always leaves a complete copy, old or new, and no temporaries."""
    if use_exchange and not _io.exchange(str(_mk(tmp_path / "x")), str(_mk(tmp_path / "y"))):
        pytest.skip("this file system cannot exchange two paths")
    kill_at, seen = 1, set()
    while kill_at < 50:
        parent = tmp_path / f"run{kill_at}"
        code = _killed_replacement(parent, kill_at, use_exchange)
        _io.remove_temporaries(parent)
        version = _complete(parent / "merged")
        assert version in ("old", "new"), f"killed at operation {kill_at}: no complete copy left"
        assert not [p for p in parent.iterdir() if p.name.startswith(".tmp-")]
        seen.add(version)
        if code == 0:
            break
        assert code == 9
        kill_at += 1
    assert 2 < kill_at < 50 and seen == {"old", "new"}


def _mk(path: Path) -> Path:
    path.mkdir()
    return path


def test_the_gap_of_two_renames_is_recovered_not_deleted(tmp_path):
    """What a kill between the renames left: the old copy renamed aside and the new one complete, no target."""
    _folder_with(tmp_path / ".tmp-merged-abcd1234", "new")
    _folder_with(tmp_path / ".tmp-merged-abcd1234.old", "old")
    assert _io.remove_temporaries(tmp_path) == []
    assert _complete(tmp_path / "merged") == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    # killed before the new one was complete cannot leave a .old (the old copy moves only after the write);
    # the old one alone is put back
    _folder_with(tmp_path / ".tmp-adapter-zz99yy88.old", "old")
    _io.recover_replacements(tmp_path)
    assert _complete(tmp_path / "adapter") == "old"


def test_ensure_writable_dir(tmp_path):
    assert _io.ensure_writable_dir(tmp_path / "new" / "deep") == tmp_path / "new" / "deep"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"output .*file is a file, not a folder"):
        _io.ensure_writable_dir(tmp_path / "file")
    assert not [p for p in (tmp_path / "new" / "deep").iterdir()]  # the probe file is gone
