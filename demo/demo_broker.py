"""Start one private MQTT broker per cloud for the demo.

Each cloud gets its own ``mosquitto`` process on a free loopback port (``listener PORT
127.0.0.1``, anonymous, no persistence), so the clouds share nothing but the federation
messages their coordinators fetch from each other's brokers. On a machine without
Mosquitto each cloud gets an embedded amqtt broker (MQTT 3.1.1) in a child process instead,
so a fresh machine still runs the demo.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_BROKER = """
import asyncio, sys
from amqtt.broker import Broker

async def main(port: int) -> None:
    config = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
              "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                          {"allow_anonymous": True}}}
    broker = Broker(config)
    await broker.start()
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""


@dataclass(frozen=True)
class BrokerEndpoint:
    host: str
    port: int
    kind: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def _wait_for(host: str, port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if process.poll() is not None:
            raise RuntimeError(f"{what} on port {port} exited with code {process.returncode}")
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not open port {port}")


@contextlib.contextmanager
def cloud_brokers(names: list[str], directory: Path) -> Iterator[list[BrokerEndpoint]]:
    """One private broker per cloud name, on free loopback ports; stopped on exit.

    Configuration files and broker logs go to ``directory`` (``broker-<name>.conf``/``.log``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    mosquitto = mosquitto_binary()
    kind = "private mosquitto" if mosquitto else "embedded amqtt"
    processes: list[subprocess.Popen[bytes]] = []
    endpoints: list[BrokerEndpoint] = []
    try:
        for name in names:
            port = free_port()
            if mosquitto:
                conf = directory / f"broker-{name}.conf"
                conf.write_text(
                    f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    # A slow or restarting subscriber keeps every message (the default
                    # of 1000 queued messages drops the rest: bench/ingest/README.md).
                    "max_queued_messages 0\n"
                )
                command = [mosquitto, "-c", str(conf)]
            else:
                command = [sys.executable, "-c", EMBEDDED_BROKER, str(port)]
            with (directory / f"broker-{name}.log").open("wb") as log:
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
            endpoints.append(BrokerEndpoint("127.0.0.1", port, kind))
        for endpoint, process in zip(endpoints, processes, strict=True):
            _wait_for(endpoint.host, endpoint.port, process, kind)
        yield endpoints
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
