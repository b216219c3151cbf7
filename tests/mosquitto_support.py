"""Private Mosquitto brokers for tests that need their own broker settings.

:class:`Mosquitto` is one restartable broker on a free port; :func:`mosquitto` runs a
given config with several listeners for the length of a block."""

from __future__ import annotations

import contextlib
import getpass
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.net_support import free_port, wait_for_port

MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd"
HAVE_MOSQUITTO = Path(MOSQUITTO).exists() and Path(MOSQUITTO_PASSWD).exists()


class Mosquitto:
    """A private broker on a free loopback port; :meth:`stop` then :meth:`start` keeps the
    port and, with ``persistence``, the sessions (saved on SIGTERM). ``max_queued_messages
    0`` and ``max_inflight_messages 0``: the broker itself never drops a queued message.
    ``extra`` is appended to the config; with a ``password_file`` in it, anonymous clients
    are refused."""

    def __init__(self, directory: Path, *, persistence: bool = True, extra: str = "") -> None:
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.conf = directory / f"mosquitto-{self.port}.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if 'password_file' in extra else 'true'}",
            "max_queued_messages 0",
            "max_inflight_messages 0",
            f"persistence {'true' if persistence else 'false'}",
            # Run as the test's user (as root it would switch to "mosquitto", who cannot
            # write the persistence file or read the test's certificates).
            f"user {getpass.getuser()}",
        ]
        if persistence:
            lines += [f"persistence_location {directory}/", "autosave_interval 0"]
        self.conf.write_text("\n".join(lines) + "\n" + extra)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.process = process
        wait_for_port(self.port, process=process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: with persistence, sessions are saved first
            self.process.wait(timeout=15)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None


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
        deadline = time.monotonic() + 10  # for all the ports together
        for port in ports:
            wait_for_port(
                port, process=process, timeout=max(0.0, deadline - time.monotonic()), log=log
            )
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)
