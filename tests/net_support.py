"""Loopback ports for tests that start their own servers."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port`` (0.2 s to answer)."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def wait_for_port(
    port: int,
    *,
    process: subprocess.Popen[bytes] | None = None,
    timeout: float = 15.0,
    log: Path | None = None,
) -> None:
    """Wait until something listens on 127.0.0.1:``port``; fail at once if ``process`` (the
    server started for it) exits first, with its ``log`` if it has one, and after
    ``timeout`` seconds otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            said = f": {log.read_text()!r}" if log is not None else ""
            raise AssertionError(f"the server for port {port} exited ({process.returncode}){said}")
        if port_open(port):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout:g} s")
