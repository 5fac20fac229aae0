"""Atomic file writes: a temporary file beside the target, then ``os.replace``.

A crash or an exception mid-write leaves the old file (or nothing), never a torn one. A folder is
replaced by an atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``), so a complete copy stands
at its path at every moment; where the exchange is not available, two renames with a recoverable
gap (:func:`recover_replacements`, which every start-up clean-up calls before deleting anything).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_libc = None
# a folder being replaced by atomic_dir without the exchange: ".tmp-<name>-<mkdtemp's 8 characters>.old"
_OLD_COPY = re.compile(r"^\.tmp-(?P<name>.+)-(?P<rand>[A-Za-z0-9_]{8})\.old$")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path to write to; on success it replaces ``path`` atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2``); False where that is not available."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.renameat2  # noqa: B018  (raises AttributeError on a libc without it)
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):  # this file system cannot exchange
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder; on success it takes the place of ``path`` (replacing an old one).

    A complete folder is at ``path`` at every moment: the new one is exchanged with the old one in
    one step, then the old one is removed. Without the exchange the old folder is renamed aside to
    ``.tmp-<name>-XXXXXXXX.old`` first; a kill in that gap leaves both copies, which
    :func:`recover_replacements` puts back.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(path) + "-")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
        if os.path.isdir(path):
            if not exchange(tmp, path):
                old = tmp + ".old"
                os.replace(path, old)  # from here until the next line, both copies sit under .tmp- names
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # a failed write, or the old copy after the exchange
            shutil.rmtree(tmp, ignore_errors=True)


def recover_replacements(folder: str | os.PathLike) -> list[str]:
    """Finish the folder replacements that a kill interrupted in ``folder``; returns the paths restored.

    Only :func:`atomic_dir` without the exchange leaves such a state: ``.tmp-<name>-X.old`` (the old
    copy, renamed aside) and, when the kill came before the second rename, ``.tmp-<name>-X`` (the new
    copy, complete, since the old one is moved aside only after the write). The new copy goes to
    ``<name>`` when it is there, else the old one; a ``.old`` whose target exists is a finished
    replacement and is removed.
    """
    folder = Path(folder)
    restored = []
    if not folder.is_dir():
        return restored
    for entry in sorted(folder.iterdir()):
        match = _OLD_COPY.match(entry.name)
        if not match or not entry.is_dir():
            continue
        target = folder / match.group("name")
        new = folder / entry.name[: -len(".old")]
        if target.exists():
            shutil.rmtree(entry, ignore_errors=True)
            continue
        os.replace(new if new.is_dir() else entry, target)
        restored.append(str(target))
        shutil.rmtree(entry, ignore_errors=True)
    return restored


def remove_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove what killed atomic writes left in ``folder`` (``.tmp-*``), after :func:`recover_replacements`
    has put back any copy that is the only one; returns the names removed."""
    recover_replacements(folder)
    removed = []
    for stale in Path(folder).glob(".tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale.name)
    return removed


def ensure_writable_dir(path: str | os.PathLike, what: str = "output") -> Path:
    """Create folder ``path`` if needed and prove it writable; ValueError naming it (and why) otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder; give a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".tmp-write-check-"):
            pass
    except OSError as err:
        raise ValueError(f"{what} {path} is not writable ({err.strerror or err}); choose another folder or fix its "
                         "permissions") from None
    return path
