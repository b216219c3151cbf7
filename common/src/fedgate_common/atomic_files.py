"""Crash-safe file replacement: the agent's config, status, models and data, and the
simulated-runs and genesis-weights files.

A reader sees either the old file or the complete new one, never a torn write, and the
rename survives a power cut once :func:`atomic_write` returns.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

NEW_FILE_MODE = 0o640


def atomic_write(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data``: temp file in the same directory, fsync, rename, fsync dir.

    ``mode=None`` keeps an existing file's mode and owner (a new file gets
    :data:`NEW_FILE_MODE`); an explicit ``mode`` is always applied.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's word for "a folder on the way is a file"
        raise NotADirectoryError(
            errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)
        ) from None
    try:
        existing: os.stat_result | None = path.stat()
    except FileNotFoundError:
        existing = None
    if mode is None:
        mode = NEW_FILE_MODE if existing is None else stat.S_IMODE(existing.st_mode)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fchmod(tmp.fileno(), mode)
            if existing is not None:
                # Only root may give a file away; other users keep their own ownership.
                with contextlib.suppress(PermissionError):
                    os.fchown(tmp.fileno(), existing.st_uid, existing.st_gid)
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (best effort on file systems that refuse it)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def file_in_the_way(directory: Path) -> Path | None:
    """``directory`` or the nearest of its parents that exists, when that is not a
    directory (a file, a symbolic link to nothing, a link loop): ``directory`` can then be
    neither used nor created. None otherwise (a missing directory under an existing one is
    fine; it is created on first write)."""
    for candidate in (directory, *directory.parents):
        try:
            if candidate.exists():
                return None if candidate.is_dir() else candidate
        except OSError:  # a symbolic link loop
            return candidate
        if candidate.is_symlink():  # a link to nothing: nothing can be created through it
            return candidate
    return None
