"""CheckpointStore: a complete checkpoint always exists, whatever moment a writer is killed at."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_killed

from keystone_kernels.checkpoints import MARKER, POINTER, CheckpointStore


def _writer(step: int, payload: torch.Tensor):
    def write(folder: Path) -> None:
        torch.save({"step": step, "payload": payload}, folder / "state.pt")
        (folder / "meta.json").write_text(json.dumps({"step": step}))
    return write


def _read(folder: Path) -> dict:
    state = torch.load(folder / "state.pt")
    assert json.loads((folder / "meta.json").read_text())["step"] == state["step"]
    return state


def test_save_latest_prune_and_pointer(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep=2)
    assert store.latest() is None
    payloads = {s: torch.randn(5, 3) for s in (10, 20, 30)}
    for step, payload in payloads.items():
        store.save(step, _writer(step, payload))
    steps = [s for s, _ in store.complete()]
    assert steps == [20, 30]  # the oldest was pruned
    latest = store.latest()
    assert _read(latest)["step"] == 30 and torch.equal(_read(latest)["payload"], payloads[30])
    assert (store.root / POINTER).read_text().strip() == latest.name


def test_a_failing_writer_changes_nothing(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    store.save(1, _writer(1, torch.ones(2)))

    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store.save(2, broken)
    assert _read(store.latest())["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_stale_or_missing_pointer_falls_back_to_the_newest_complete(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    for step in (1, 2):
        store.save(step, _writer(step, torch.full((2,), float(step))))
    (tmp_path / POINTER).write_text("step-00000999-deadbeef\n")  # names nothing
    assert _read(store.latest())["step"] == 2
    (tmp_path / POINTER).unlink()
    assert _read(store.latest())["step"] == 2
    # a folder without the completion marker is not a checkpoint
    half = tmp_path / "step-00000003-0badc0de"
    half.mkdir()
    (half / "state.pt").write_bytes(b"torn")
    assert _read(store.latest())["step"] == 2


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep must be >= 1"):
        CheckpointStore(tmp_path, keep=0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        CheckpointStore(tmp_path).save(-1, _writer(0, torch.zeros(1)))


def _killed_writer(root: Path, kill_at: int) -> int:
    """Fork a writer that dies (``os._exit``, like SIGKILL: no cleanup) before its ``kill_at``-th
    file-system operation while saving step 2 on top of a complete step 1; returns its exit code
    (0: it ran past its last operation)."""
    store = CheckpointStore(root, keep=1)
    if not store.complete():
        store.save(1, lambda f: torch.save({"step": 1, "payload": torch.full((4,), 1.0)}, f / "state.pt"))

    def work(boundary):
        save = boundary(torch.save)
        store.save(2, lambda f: save({"step": 2, "payload": torch.full((4,), 2.0)}, f / "state.pt"))

    return run_killed(kill_at, work)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_killed_at_every_boundary_a_complete_checkpoint_remains(tmp_path):
    """Kill the writer before each of its file-system operations in turn; resume always works."""
    kill_at, outcomes = 1, set()
    while kill_at < 200:
        root = tmp_path / f"run{kill_at}"
        code = _killed_writer(root, kill_at)
        store = CheckpointStore(root, keep=1)
        latest = store.latest()
        assert latest is not None and (latest / MARKER).is_file(), f"no complete checkpoint after a kill at {kill_at}"
        state = torch.load(latest / "state.pt")
        assert torch.equal(state["payload"], torch.full((4,), float(state["step"])))
        outcomes.add(state["step"])
        # the next start cleans up and can save again
        store.clean()
        assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]
        store.save(3, lambda f: torch.save({"step": 3, "payload": torch.full((4,), 3.0)}, f / "state.pt"))
        assert torch.load(store.latest() / "state.pt")["step"] == 3
        if code == 0:  # ran past its last operation: every boundary was tried
            break
        assert code == 9
        kill_at += 1
    assert 5 < kill_at < 200 and outcomes == {1, 2}  # killed early: step 1 stays; late: step 2 is there


def test_a_higher_step_of_an_earlier_run_does_not_beat_the_pointer(tmp_path):
    """Folders of an earlier, longer run completed before this run's pointer was written: the pointer wins."""
    import time

    earlier = CheckpointStore(tmp_path, keep=5)
    earlier.save(8, _writer(8, torch.full((2,), 8.0)))
    time.sleep(0.01)
    store = CheckpointStore(tmp_path, keep=5)
    store.save(4, _writer(4, torch.full((2,), 4.0)))
    assert _read(store.latest())["step"] == 4
    assert [_read(p)["step"] for p in store.candidates()] == [4, 8]
    # whereas a folder completed after the pointer is a save killed before its pointer update: it wins
    time.sleep(0.01)
    late = tmp_path / "step-00000006-0000beef"
    late.mkdir()
    _writer(6, torch.full((2,), 6.0))(late)
    (late / MARKER).write_text("6\n")
    assert _read(store.latest())["step"] == 6
