"""Real components for the bridge tests, each on a free loopback port.

* :class:`Mosquitto`: a private broker that can be stopped and started again on the same
  port. Persistence is on (in the test's directory) so the *subscriber's* persistent
  session survives a restart; the bridge does not rely on it.
* :class:`Subscriber`: a paho client with a persistent session (QoS 1) that records every
  message, as the agent would receive them.
* :func:`modbus_server`: a pymodbus server (TCP or RTU framing over TCP) serving fixed
  register values from the test's event loop.
* :func:`write_bridge_config`: a bridge TOML file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from fedgate_bridge.config import BrokerSettings, read_password
from fedgate_bridge.counters import PublisherCounters
from fedgate_bridge.outbox import AsyncOutbox, Reading
from fedgate_bridge.publisher import MqttPublisher
from fedgate_bridge.registers import encode_raw
from fedgate_common.backoff import Backoff
from fedgate_common.tasks import cancel_until_done
from paho.mqtt.enums import CallbackAPIVersion
from pymodbus.framer import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from tests.mosquitto_support import Mosquitto
from tests.net_support import free_port

FAST = Backoff(initial_s=0.05, factor=2.0, max_s=0.3)  # reconnects within a test


@contextlib.contextmanager
def mosquitto(directory: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(directory)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


class Subscriber:
    """Records every message under ``topic_filter`` with QoS 1 and a persistent session."""

    def __init__(self, port: int, topic_filter: str, client_id: str = "test-subscriber") -> None:
        self.topic_filter = topic_filter
        self._lock = threading.Lock()
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.connected = threading.Event()
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
        )
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=1)
        client.connect("127.0.0.1", port, keepalive=10)
        client.loop_start()
        self.client = client
        if not self.connected.wait(10):
            raise RuntimeError("subscriber did not connect")

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        client.subscribe(self.topic_filter, qos=1)
        self.connected.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        payload = json.loads(message.payload)
        with self._lock:
            self.messages.append((message.topic, payload))

    def snapshot(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return list(self.messages)

    def by_topic(self) -> dict[str, list[dict[str, Any]]]:
        grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for topic, payload in self.snapshot():
            grouped[topic].append(payload)
        return dict(grouped)

    def seqs(self) -> dict[str, list[int]]:
        return {topic: [p["seq"] for p in payloads] for topic, payloads in self.by_topic().items()}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@contextlib.contextmanager
def subscriber(port: int, topic_filter: str) -> Iterator[Subscriber]:
    sub = Subscriber(port, topic_filter)
    try:
        yield sub
    finally:
        sub.close()


async def wait_until(condition: Callable[[], bool], within_s: float, what: str) -> None:
    """Poll ``condition`` without blocking the event loop (servers run on it)."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- Modbus


def registers_of(values: list[tuple[float, str, str]]) -> list[int]:
    """Concatenated register words of (value, type, word_order) triples."""
    words: list[int] = []
    for value, data_type, order in values:
        words.extend(encode_raw(value, data_type=data_type, word_order=order))
    return words


def sim_device(
    *,
    holding: list[int],
    inputs: list[int] | None = None,
    coils: list[bool] | None = None,
    discrete: list[bool] | None = None,
    unit: int = 1,
) -> SimDevice:
    """A device with four separate blocks, each starting at address 0."""
    return SimDevice(
        unit,
        simdata=(
            [SimData(0, values=coils or [False] * 8, datatype=DataType.BITS)],
            [SimData(0, values=discrete or [False] * 8, datatype=DataType.BITS)],
            [SimData(0, values=holding, datatype=DataType.REGISTERS)],
            [SimData(0, values=inputs or [0], datatype=DataType.REGISTERS)],
        ),
    )


class ModbusServer:
    """A pymodbus server that can be stopped and started again on the same port."""

    def __init__(self, device: SimDevice, *, port: int, framer: FramerType) -> None:
        self.device = device
        self.port = port
        self.framer = framer
        self._server: ModbusTcpServer | None = None

    async def start(self) -> None:
        server = ModbusTcpServer(self.device, address=("127.0.0.1", self.port), framer=self.framer)
        await server.serve_forever(background=True)
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None


@contextlib.asynccontextmanager
async def modbus_server(
    device: SimDevice, *, framer: FramerType = FramerType.SOCKET
) -> AsyncIterator[ModbusServer]:
    server = ModbusServer(device, port=free_port(), framer=framer)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# --------------------------------------------------------------------------- config


def write_bridge_config(
    path: Path,
    *,
    state_dir: Path,
    broker_port: int,
    sources: str,
    topic_prefix: str = "plant/test",
    outbox: str = "",
    broker_extra: str = "",
) -> Path:
    """A bridge TOML file: fixed header, broker, optional [outbox] body, then ``sources``."""
    path.write_text(
        f'state_dir = "{state_dir}"\n'
        f'topic_prefix = "{topic_prefix}"\n'
        'log_level = "debug"\n\n'
        f'[broker]\nport = {broker_port}\nclient_id = "bridge-under-test"\n{broker_extra}\n'
        f"[outbox]\n{outbox}\n\n{sources}\n"
    )
    return path


async def publish_five(
    database: Path, settings: BrokerSettings, *, client_id: str
) -> tuple[PublisherCounters, int]:
    """Run a publisher of five readings (outbox in ``database``) until it drains them or
    has failed to connect twice; its counters and the readings still in the outbox."""
    counters = PublisherCounters()
    async with await AsyncOutbox.open(database, max_messages=100, policy="drop_oldest") as outbox:
        await outbox.append(
            [Reading(topic="plant/test/plc/A", ts=1.0, value=float(i)) for i in range(5)]
        )
        publisher = MqttPublisher(
            settings=settings,
            client_id=client_id,
            outbox=outbox,
            counters=counters,
            password=read_password(settings.password_file),
            backoff=FAST,
        )
        task = asyncio.create_task(publisher.run())
        try:
            await wait_until(
                lambda: publisher.idle or counters.connect_failures >= 2, 15, "an outcome"
            )
        finally:
            await cancel_until_done([task])
        waiting = outbox.depth
    return counters, waiting
