"""A private Mosquitto for tests that need their own broker settings: free ports, start
with a generated config, wait until it listens, stop."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd"
HAVE_MOSQUITTO = Path(MOSQUITTO).exists() and Path(MOSQUITTO_PASSWD).exists()


@contextlib.contextmanager
def mosquitto(conf: Path, ports: list[int]) -> Iterator[None]:
    """Run ``mosquitto -c conf`` until the block ends; fail if it does not listen on every
    port of ``ports`` (127.0.0.1) within 10 s. Its log is ``conf`` with suffix ``.log``."""
    # Its log goes to a file: a pipe nobody reads fills up and then blocks the broker.
    log = conf.with_suffix(".log")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=sink
        )
    try:
        deadline = time.monotonic() + 10
        waiting = set(ports)
        while waiting:
            if process.poll() is not None:
                raise AssertionError(f"mosquitto exited: {log.read_text()!r}")
            assert time.monotonic() < deadline, f"mosquitto does not listen on {waiting}"
            for port in list(waiting):
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), 0.2),
                ):
                    waiting.discard(port)
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)
