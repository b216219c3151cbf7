"""sd_notify and the watchdog, seen from systemd's side of the notification socket.

A real unix datagram socket plays systemd: the test binds it (a path, or an abstract
name), hands it over as ``NOTIFY_SOCKET`` with a small ``WATCHDOG_USEC`` and records every
datagram with its arrival time on a thread of its own, so a blocked event loop in the
service cannot hide anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedgate_agent.config import set_config_value
from fedgate_common.service_notify import ServiceNotifier

from tests.agent.test_data_cli import agent
from tests.bridge.bridge_support import mosquitto, write_bridge_config
from tests.mosquitto_support import Mosquitto
from tests.net_support import free_port

WATCHDOG_USEC = 200_000  # 0.2 s: pings every 0.1 s
BLOCK_S = 0.8


class NotifySocket:
    """systemd's end: receives datagrams and stamps them with time.monotonic()."""

    def __init__(self, address: str) -> None:
        self.env_value = address
        bind_to = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(bind_to)
        self._sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closing:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def snapshot(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, text: str, within_s: float) -> float:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            for stamp, message in self.snapshot():
                if text in message.split("\n"):
                    return stamp
            time.sleep(0.01)
        raise AssertionError(f"no {text!r} within {within_s} s; got {self.snapshot()}")

    def pings(self) -> list[float]:
        return [stamp for stamp, message in self.snapshot() if message == "WATCHDOG=1"]

    def close(self) -> None:
        self._closing = True
        self._thread.join(timeout=2)
        self._sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    address = (
        str(tmp_path / "notify.sock")
        if request.param == "path"
        else f"@fedgate-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    )
    receiver = NotifySocket(address)
    try:
        yield receiver
    finally:
        receiver.close()


def _environ(receiver: NotifySocket, *, pid: int) -> dict[str, str]:
    return {
        "NOTIFY_SOCKET": receiver.env_value,
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
        "WATCHDOG_PID": str(pid),
    }


async def test_a_blocked_event_loop_stops_the_watchdog_pings(notify_socket: NotifySocket) -> None:
    notifier = ServiceNotifier.from_environ(
        _environ(notify_socket, pid=os.getpid()),
        pid=os.getpid(),
        open_socket=functools.partial(socket.socket, socket.AF_UNIX, socket.SOCK_DGRAM),
    )
    serving = asyncio.Event()
    lifecycle = asyncio.create_task(
        notifier.follow(serving.wait, sleep=asyncio.sleep, status="connected")
    )
    await asyncio.sleep(0.2)
    assert notify_socket.snapshot() == [], "nothing may be sent before the service serves"
    serving.set()
    ready_at = await asyncio.to_thread(notify_socket.wait_for, "READY=1", 2.0)
    await asyncio.sleep(0.5)
    before_block = len(notify_socket.pings())

    loop = asyncio.get_running_loop()
    blocked_from = time.monotonic()
    loop.call_soon(time.sleep, BLOCK_S)  # the service's loop stuck in a blocking call
    await asyncio.sleep(0)
    blocked_until = time.monotonic()
    await asyncio.sleep(0.5)
    lifecycle.cancel()
    await asyncio.wait([lifecycle])
    await asyncio.to_thread(notify_socket.wait_for, "STOPPING=1", 2.0)
    notifier.close()

    pings = notify_socket.pings()
    assert blocked_until - blocked_from >= BLOCK_S
    assert before_block >= 3, f"expected pings every 0.1 s after READY, got {pings}"
    assert all(stamp >= ready_at for stamp in pings)
    # Nothing arrives while the loop is blocked (a small margin for the datagram in flight).
    during = [s for s in pings if blocked_from + 0.05 < s < blocked_until - 0.05]
    assert during == [], f"pings while the loop was blocked: {during}"
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) >= BLOCK_S - 0.1, f"no gap as long as the block: {gaps}"
    after = [s for s in pings if s > blocked_until]
    assert len(after) >= 3, f"pings did not resume after the block: {after}"
    messages = [m for _, m in notify_socket.snapshot()]
    assert messages[0] == "READY=1\nSTATUS=connected"
    assert messages[-1] == "STOPPING=1\nSTATUS=stopping"


async def test_no_watchdog_for_another_pid_but_ready_and_stopping_still_sent(
    notify_socket: NotifySocket,
) -> None:
    notifier = ServiceNotifier.from_environ(
        _environ(notify_socket, pid=os.getpid() + 1),
        pid=os.getpid(),
        open_socket=functools.partial(socket.socket, socket.AF_UNIX, socket.SOCK_DGRAM),
    )
    assert notifier.watchdog_s is None
    done = asyncio.Event()
    done.set()
    lifecycle = asyncio.create_task(notifier.follow(done.wait, sleep=asyncio.sleep))
    await asyncio.to_thread(notify_socket.wait_for, "READY=1", 2.0)
    await asyncio.sleep(0.3)
    lifecycle.cancel()
    await asyncio.wait([lifecycle])
    notifier.close()
    await asyncio.to_thread(notify_socket.wait_for, "STOPPING=1", 2.0)
    assert notify_socket.pings() == []


@contextlib.contextmanager
def under_fake_systemd(
    argv: list[str], receiver: NotifySocket
) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` as a service whose systemd is ``receiver`` (watchdog period 0.2 s)."""
    process = subprocess.Popen(
        argv,
        env={**os.environ, "NOTIFY_SOCKET": receiver.env_value, "WATCHDOG_USEC": "200000"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        receiver.close()


def test_the_bridge_process_notifies_ready_pings_and_stopping(tmp_path: Path) -> None:
    """The real `fedgate-bridge run` under a fake systemd: READY once running, pings at
    WatchdogSec/2 from its event loop, STOPPING on SIGTERM, exit 0."""
    receiver = NotifySocket(f"@fedgate-test-bridge-{os.getpid()}-{time.monotonic_ns()}")
    with mosquitto(tmp_path / "broker") as broker:
        config = write_bridge_config(
            tmp_path / "bridge.toml",
            state_dir=tmp_path / "state",
            broker_port=broker.port,
            # an unreachable PLC: the bridge serves (and retries) all the same
            sources=f'[[modbus]]\nname = "plc"\nport = {free_port()}\n'
            '[[modbus.registers]]\ntag = "T1"\naddress = 0\n',
        )
        program = Path(sys.executable).parent / "fedgate-bridge"
        with under_fake_systemd(
            [str(program), "run", "--config", str(config)], receiver
        ) as process:
            ready_at = receiver.wait_for("READY=1", 20.0)
            time.sleep(0.6)  # a few watchdog periods
            process.send_signal(signal.SIGTERM)
            stopping_at = receiver.wait_for("STOPPING=1", 10.0)
            assert process.wait(timeout=15) == 0
    messages = [m for _, m in receiver.snapshot()]
    assert messages[0] == "READY=1\nSTATUS=running"
    pings = [s for s in receiver.pings() if ready_at <= s <= stopping_at]
    assert len(pings) >= 4, f"expected a ping every 0.1 s, got {messages}"
    gaps = sorted(b - a for a, b in itertools.pairwise(pings))
    assert 0.07 < gaps[len(gaps) // 2] < 0.15, f"pings not at WATCHDOG_USEC / 2: {gaps}"


def ready_only_once_connected(
    argv: list[str], broker: Mosquitto, name: str, *, startup_s: float
) -> None:
    """``argv`` started under a fake systemd while ``broker`` is down: it keeps running and
    says nothing; once the broker is up, READY=1 "connected", pings at WatchdogSec/2 from
    its event loop, and STOPPING=1 on SIGTERM."""
    receiver = NotifySocket(f"@fedgate-test-{name}-{os.getpid()}-{time.monotonic_ns()}")
    broker.stop()
    with under_fake_systemd(argv, receiver) as process:
        time.sleep(startup_s)  # long enough to import, open its state and try the broker
        assert process.poll() is None, f"{name} exited while the broker was down"
        assert receiver.snapshot() == [], "READY before the broker was reachable"
        broker.start()
        ready_at = receiver.wait_for("READY=1", 30.0)
        time.sleep(0.6)
        process.send_signal(signal.SIGTERM)
        stopping_at = receiver.wait_for("STOPPING=1", 15.0)
        process.wait(timeout=15)
    messages = [m for _, m in receiver.snapshot()]
    assert messages[0] == "READY=1\nSTATUS=connected"
    pings = [s for s in receiver.pings() if ready_at <= s <= stopping_at]
    assert len(pings) >= 4, f"expected a ping every 0.1 s, got {messages}"


def test_the_coordinator_process_notifies_ready_once_connected(tmp_path: Path) -> None:
    """`fedgate-coordinator serve`: see :func:`ready_only_once_connected`."""
    program = Path(sys.executable).parent / "fedgate-coordinator"
    state = tmp_path / "coordinator"
    with mosquitto(tmp_path / "broker") as broker:
        init = subprocess.run(
            [
                *(str(program), "--state-dir", str(state), "init", "--cloud", "cloud-1"),
                *("--broker-port", str(broker.port), "--genesis-seed", "1"),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert init.returncode == 0, init.stderr
        serve = [str(program), "--state-dir", str(state), "serve"]
        ready_only_once_connected(serve, broker, "coordinator", startup_s=1.5)


def test_the_agent_process_notifies_ready_once_connected(tmp_path: Path) -> None:
    """`fedgate-agent run`: see :func:`ready_only_once_connected`."""
    config = agent(tmp_path)  # initialised, manifest pinned, training from its buffer
    program = Path(sys.executable).parent / "fedgate-agent"
    with mosquitto(tmp_path / "broker") as broker:
        set_config_value(config, "broker.port", str(broker.port))
        run = [str(program), "run", "--config", str(config)]
        ready_only_once_connected(run, broker, "agent", startup_s=2.0)
