"""Find or start an MQTT broker for the demo.

Order: the machine's Mosquitto on 127.0.0.1:1883; else a private ``mosquitto`` process on
a free loopback port; else an embedded amqtt broker (MQTT 3.1.1) in a child process, so a
fresh machine without Mosquitto still runs the demo.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
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


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for(host: str, port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not open port {port}")


@contextlib.contextmanager
def demo_broker() -> Iterator[BrokerEndpoint]:
    if port_open("127.0.0.1", 1883):
        yield BrokerEndpoint("127.0.0.1", 1883, "machine mosquitto")
        return
    port = free_port()
    mosquitto = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    with tempfile.TemporaryDirectory() as tmp:
        if mosquitto:
            conf = Path(tmp) / "mosquitto.conf"
            conf.write_text(
                f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                "persistence false\nmessage_size_limit 0\n"
            )
            command = [mosquitto, "-c", str(conf)]
            kind = "private mosquitto"
        else:
            command = [sys.executable, "-c", EMBEDDED_BROKER, str(port)]
            kind = "embedded amqtt"
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for("127.0.0.1", port, process, kind)
            yield BrokerEndpoint("127.0.0.1", port, kind)
        finally:
            process.terminate()
            process.wait(timeout=10)
