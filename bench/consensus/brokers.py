"""Private Mosquitto brokers on free loopback ports, one per cloud, for one scenario."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

MOSQUITTO = Path("/usr/sbin/mosquitto")
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


class BrokerStartFailed(RuntimeError):
    """A Mosquitto broker did not start listening (``port``) in time."""

    def __init__(self, message: str, *, port: int) -> None:
        super().__init__(message)
        self.port = port


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _write_config(directory: Path, index: int, port: int) -> Path:
    """A broker config: loopback only, anonymous, nothing persisted (no stale retained)."""
    if not MOSQUITTO.exists():
        raise FileNotFoundError(f"{MOSQUITTO} not found: install mosquitto (apt install mosquitto)")
    conf = directory / f"mosquitto-{index + 1}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    return conf


async def _wait_listening(port: int, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise BrokerStartFailed(
                f"mosquitto on port {port} exited with {process.returncode}", port=port
            )
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise BrokerStartFailed(f"nothing listens on port {port} after {START_TIMEOUT_S} s", port=port)


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()


@contextlib.asynccontextmanager
async def mosquitto_brokers(directory: Path, count: int) -> AsyncIterator[list[int]]:
    """Start ``count`` brokers; yield their ports; stop them on exit."""
    processes: list[asyncio.subprocess.Process] = []
    ports: list[int] = []
    try:
        for index in range(count):
            port = free_port()
            conf = _write_config(directory, index, port)
            processes.append(
                await asyncio.create_subprocess_exec(
                    str(MOSQUITTO),
                    "-c",
                    str(conf),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )
            ports.append(port)
        for port, process in zip(ports, processes, strict=True):
            await _wait_listening(port, process)
        yield ports
    finally:
        await asyncio.gather(*(_stop(process) for process in processes))
