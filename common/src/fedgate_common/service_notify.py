"""systemd's service notification protocol (``sd_notify``), without owning a socket.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or an abstract
socket name starting with ``@``) and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` and
``WATCHDOG_PID``. A service sends one datagram per message: ``READY=1`` once it serves,
``WATCHDOG=1`` at least every ``WATCHDOG_USEC`` (we send at half of it), ``STATUS=...``
lines for ``systemctl status``, and ``STOPPING=1`` when it shuts down.

This module decides *what* to send and *when*; the caller hands it something with
``sendto`` (a ``socket.socket(AF_UNIX, SOCK_DGRAM)`` made by the distribution) and an async
``sleep`` (``asyncio.sleep``), so fedgate-common stays free of sockets and event loops
(docs/decisions/0035-sd-notify-without-a-library.md). Without ``NOTIFY_SOCKET`` every
method is a silent no-op, so the same code runs in a terminal, in tests and under systemd.

The watchdog coroutine runs on the service's own event loop: a blocked loop stops the
pings, and systemd restarts the service after ``WatchdogSec``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from fedgate_common.logs import log_event

__all__ = [
    "DatagramSender",
    "ServiceNotifier",
    "notify_address",
    "watchdog_interval_s",
]

log = logging.getLogger("fedgate.systemd")

IDLE_S = 3600.0


class DatagramSender(Protocol):
    """What the notifier needs of a unix datagram socket."""

    def sendto(self, data: bytes, address: bytes, /) -> int: ...

    def close(self) -> None: ...


def notify_address(value: str | None) -> bytes | None:
    """The socket address in ``NOTIFY_SOCKET``; ``None`` when unset or not a unix socket.

    ``@name`` is Linux's abstract namespace (a leading NUL byte on the wire).
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None  # vsock:... and other transports are not supported


def watchdog_interval_s(environ: Mapping[str, str], *, pid: int) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or ``None`` when
    no watchdog is asked of this process."""
    usec_text = environ.get("WATCHDOG_USEC", "")
    pid_text = environ.get("WATCHDOG_PID", "")
    try:
        usec = int(usec_text)
        if pid_text and int(pid_text) != pid:
            return None  # meant for another process (e.g. our parent)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


class ServiceNotifier:
    """Sends sd_notify messages for one service process.

    Example::

        notifier = ServiceNotifier.from_environ(
            os.environ, pid=os.getpid(),
            open_socket=functools.partial(socket.socket, socket.AF_UNIX, socket.SOCK_DGRAM),
        )
        lifecycle = asyncio.create_task(
            notifier.follow(link.connected.wait, sleep=asyncio.sleep, status="connected"))
    """

    def __init__(
        self,
        *,
        address: bytes | None,
        sender: DatagramSender | None,
        watchdog_s: float | None,
    ) -> None:
        self.address = address if sender is not None else None
        self._sender = sender
        self.watchdog_s = watchdog_s if self.address is not None else None
        self.sent = 0
        self.send_errors = 0

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str],
        *,
        pid: int,
        open_socket: Callable[[], DatagramSender],
    ) -> ServiceNotifier:
        """A notifier for the systemd environment in ``environ``; ``open_socket`` is called
        only when there is a notification socket."""
        address = notify_address(environ.get("NOTIFY_SOCKET"))
        sender = open_socket() if address is not None else None
        return cls(
            address=address,
            sender=sender,
            watchdog_s=watchdog_interval_s(environ, pid=pid),
        )

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> None:
        """One datagram of ``KEY=value`` lines. A failing socket is counted and logged
        (once), never raised: notification must not take the service down."""
        if self._sender is None or self.address is None:
            return
        try:
            self._sender.sendto("\n".join(lines).encode("utf-8"), self.address)
        except OSError as exc:
            self.send_errors += 1
            if self.send_errors == 1:
                log_event(log, logging.WARNING, "systemd notification failed", error=str(exc))
            return
        self.sent += 1

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    async def follow(
        self,
        ready: Callable[[], Awaitable[object]],
        *,
        sleep: Callable[[float], Awaitable[object]],
        status: str = "serving",
    ) -> None:
        """Await ``ready()``, send ``READY=1``, then ping the watchdog until cancelled;
        ``STOPPING=1`` on the way out. Run it as a task on the service's event loop.

        ``ready`` is called here, not by the caller: a service that fails before this task
        first runs leaves no un-awaited coroutine behind (and no warning on stderr)."""
        try:
            await ready()
            self.ready(status)
            while True:
                if self.watchdog_s is None:
                    await sleep(IDLE_S)  # nothing to ping: only wait for the cancellation
                    continue
                self.watchdog()
                await sleep(self.watchdog_s)
        finally:
            self.stopping()
