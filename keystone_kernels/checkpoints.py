"""Training checkpoints that are never lost: numbered folders written whole, then a pointer.

Layout under a run's output folder::

    checkpoints/step-00000040-3f9a1c2e/   complete checkpoints (written in a temporary folder,
    checkpoints/step-00000050-8d02b7aa/   then renamed into place, never modified afterwards)
    checkpoints/LATEST                     the name of the newest one, replaced atomically

A kill at any moment leaves at least the previous complete checkpoint and a pointer to it (or,
killed between the rename and the pointer update, a pointer to the previous one and the new folder
beside it). :meth:`CheckpointStore.latest` also survives a missing or stale pointer: it takes the
highest step among the folders that hold the completion marker, which is written last. The
temporaries of killed writes (``.tmp-*``) are removed by :meth:`CheckpointStore.clean`, which a
training run calls when it starts.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from .utils.io import atomic_write_text, remove_temporaries, umask

__all__ = ["CheckpointStore", "MARKER", "POINTER"]

MARKER = "COMPLETE"  # written last inside a checkpoint folder: its presence means every file is there
POINTER = "LATEST"
_NAME = re.compile(r"^step-(\d{8})-[0-9a-f]{8}$")


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """Numbered, immutable checkpoint folders under ``root`` plus an atomically replaced pointer.

    Args:
        root: the folder that holds the checkpoints (created on the first save).
        keep: complete checkpoints to keep (the newest ones; the one the pointer names is always kept).
    """

    def __init__(self, root: str | os.PathLike, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (a complete checkpoint must always exist), got {keep}")
        self.root = Path(root)
        self.keep = keep

    def clean(self) -> list[str]:
        """Remove the temporaries that killed writes left behind; returns their names."""
        return remove_temporaries(self.root) if self.root.is_dir() else []

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write a checkpoint of ``step`` with ``write(folder)`` and make it the latest one.

        ``write`` fills an empty temporary folder; if it raises, nothing changes on disk (the
        temporary is removed) and the exception propagates.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}-{uuid.uuid4().hex[:8]}"
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".tmp-{name}-"))
        try:
            write(tmp)
            with open(tmp / MARKER, "w", encoding="utf-8") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
            final = self.root / name
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.root)
        atomic_write_text(self.root / POINTER, name + "\n")
        self._prune(keep_name=name)
        return final

    def complete(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _NAME.match(entry.name)
            if match and (entry / MARKER).is_file():
                found.append((int(match.group(1)), entry))
        return sorted(found, key=lambda item: (item[0], item[1].stat().st_mtime))

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the pointer's, else the highest complete step; None if none.

        A complete folder of a higher step than the pointer's is taken only when it was completed
        after the pointer was written: a kill between the rename and the pointer update. A higher
        step completed before the pointer belongs to another, earlier run in the same folder.
        """
        return next(iter(self.candidates()), None)

    def candidates(self) -> list[Path]:
        """Every complete checkpoint, the one :meth:`latest` picks first, then the others newest first
        (what a resume tries, in order, when a checkpoint does not load)."""
        complete = self.complete()
        order = [p for _, p in reversed(complete)]
        pointer = self.root / POINTER
        if pointer.is_file():
            name = pointer.read_text(encoding="utf-8").strip()
            if _NAME.match(name) and (self.root / name / MARKER).is_file():
                named = self.root / name
                since = pointer.stat().st_mtime_ns
                newer = [p for s, p in complete if s > int(_NAME.match(name).group(1))
                         and (p / MARKER).stat().st_mtime_ns > since]
                first = newer[-1] if newer else named  # a kill after the rename, before the pointer
                order = [first] + [p for p in order if p != first]
        return order

    def _prune(self, keep_name: str) -> None:
        complete = self.complete()
        for _, folder in complete[:-self.keep]:
            if folder.name != keep_name:
                shutil.rmtree(folder, ignore_errors=True)
