"""One running instance per state directory.

A coordinator's ``serve``, an agent's ``run`` and a bridge's ``run`` hold an exclusive
``flock`` on a lock file in their state directory for as long as they run. A second one
started on the same directory (by hand next to the systemd unit, or a second unit) stops
at once with :class:`AlreadyRunning` instead of fighting the first over the broker
session, the round, the store and ``status.json``. The kernel drops the lock when the
process ends, however it ends, so a stale lock file never blocks a start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fedgate_common.errors import FedgateError

__all__ = ["AlreadyRunning", "StateDirUnusable", "single_instance"]


class AlreadyRunning(FedgateError):
    """Another process holds the state directory's lock."""

    def __init__(self, message: str, *, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class StateDirUnusable(FedgateError):
    """The state directory cannot hold the lock file: missing, or not writable by this user
    (a configuration problem, found before any network IO)."""


@contextlib.contextmanager
def single_instance(state_dir: Path, program: str) -> Iterator[Path]:
    """Hold ``state_dir/<program>.lock`` exclusively while the block runs; yields its path.

    The file keeps the holder's pid, for the message a second instance prints. Raises
    :class:`AlreadyRunning` when another process holds it, :class:`StateDirUnusable` when
    the directory cannot hold the file.
    """
    path = state_dir / f"{program}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise StateDirUnusable(
            f"state directory {state_dir} cannot be used by uid {os.getuid()}: "
            f"{exc.strerror} ({path}); create it, owned by the service user, mode 0750"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            pid = int(holder) if holder.isdigit() else None
            raise AlreadyRunning(
                f"{program} is already running on {state_dir} "
                f"(pid {pid if pid is not None else 'unknown'}; lock {path}): "
                "stop it first (systemctl stop, or kill that pid)",
                pid=pid,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a start)
