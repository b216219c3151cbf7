"""Modbus to MQTT against a real pymodbus server and a real mosquitto.

The bridge runs in the test's event loop next to the pymodbus server; a paho subscriber
reads what the broker delivers, as the agent would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fedgate_bridge.bridge import Bridge, read_status
from fedgate_bridge.config import load_config
from fedgate_bridge.counters import SourceCounters
from fedgate_bridge.errors import SourceUnavailable
from fedgate_bridge.modbus_source import ModbusPoller
from fedgate_bridge.outbox import AsyncOutbox, Outbox
from fedgate_bridge.registers import ReadBlock
from fedgate_common.tasks import cancel_until_done
from pymodbus.framer import FramerType
from pymodbus.pdu.register_message import ReadInputRegistersResponse
from pymodbus.simulator import SimDevice

from tests.bridge.bridge_support import (
    FAST,
    modbus_server,
    mosquitto,
    registers_of,
    sim_device,
    subscriber,
    wait_until,
    write_bridge_config,
)

# (tag, address, type, word order, scale, offset, raw value) laid out from address 0
HOLDING = [
    ("F32", "float32", "big", 1.0, 0.0, 3.25),
    ("F32_LE", "float32", "little", 1.0, 0.0, -0.5),
    ("F64", "float64", "big", 1.0, 0.0, -123.456),
    ("I16", "int16", "big", 0.1, 0.0, -1234.0),
    ("U16", "uint16", "big", 1.0, 0.0, 65535.0),
    ("I32_LE", "int32", "little", 1.0, 100.0, -70000.0),
    ("U32", "uint32", "big", 1.0, 0.0, 3_000_000_000.0),
    ("NAN", "float32", "big", 1.0, 0.0, math.nan),
    ("FLAG", "bool", "big", 1.0, 0.0, 1.0),
]
WIDTH = {"float32": 2, "float64": 4, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "bool": 1}


def holding_map() -> tuple[str, list[int], dict[str, float]]:
    """Register tables, the device's holding registers, and the expected published values."""
    tables: list[str] = []
    expected: dict[str, float] = {}
    address = 0
    for tag, data_type, order, scale, offset, raw in HOLDING:
        tables.append(
            f'  [[modbus.registers]]\n  tag = "{tag}"\n  address = {address}\n'
            f'  type = "{data_type}"\n  word_order = "{order}"\n'
            f"  scale = {scale}\n  offset = {offset}\n"
            + ('  unit = "kscmh"\n' if tag == "F32" else "")
        )
        address += WIDTH[data_type]
        if not math.isnan(raw):
            expected[tag] = raw * scale + offset
    words = registers_of([(raw, t, o) for _, t, o, _, _, raw in HOLDING])
    tables.append('  [[modbus.registers]]\n  tag = "IN0"\n  address = 1\n  kind = "input"\n')
    tables.append(
        '  [[modbus.registers]]\n  tag = "COIL2"\n  address = 2\n  kind = "coil"\n  type = "bool"\n'
    )
    tables.append(
        '  [[modbus.registers]]\n  tag = "DI0"\n  address = 0\n  kind = "discrete"\n'
        '  type = "bool"\n'
    )
    expected.update({"IN0": 4242.0, "COIL2": 1.0, "DI0": 0.0})
    return "\n".join(tables), words, expected


def modbus_source(port: int, transport: str, tables: str, interval: float = 0.1) -> str:
    return (
        f'[[modbus]]\nname = "plc-1"\ntransport = "{transport}"\nhost = "127.0.0.1"\n'
        f"port = {port}\nunit = 1\npoll_interval_s = {interval}\ntimeout_s = 0.5\n\n{tables}"
    )


@contextlib.asynccontextmanager
async def running(bridge: Bridge) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    await asyncio.wait_for(bridge.running.wait(), 10)
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def fast_bridge(tmp_path: Path, broker_port: int, device_port: int, tables: str) -> Bridge:
    """A bridge polling one Modbus TCP device every 50 ms, retrying fast."""
    config = load_config(
        write_bridge_config(
            tmp_path / "bridge.toml",
            state_dir=tmp_path / "state",
            broker_port=broker_port,
            sources=modbus_source(device_port, "tcp", tables, interval=0.05),
        )
    )
    return Bridge(config, source_backoff=FAST, broker_backoff=FAST)


def assert_contiguous(seqs: dict[str, list[int]], *, duplicates_allowed: bool) -> None:
    for topic, received in seqs.items():
        assert sorted(set(received)) == list(range(max(received) + 1)), f"gap in {topic}"
        if not duplicates_allowed:
            assert len(received) == len(set(received)), f"duplicate in {topic}"


@pytest.mark.parametrize(
    ("transport", "framer"),
    [("tcp", FramerType.SOCKET), ("rtu-over-tcp", FramerType.RTU)],
)
async def test_register_map_is_decoded_and_published(
    tmp_path: Path, transport: str, framer: FramerType
) -> None:
    tables, words, expected = holding_map()
    device = sim_device(
        holding=words, inputs=[0, 4242], coils=[False, False, True], discrete=[False]
    )
    with mosquitto(tmp_path / "broker") as broker, subscriber(broker.port, "plant/#") as sub:
        async with modbus_server(device, framer=framer) as server:
            config = load_config(
                write_bridge_config(
                    tmp_path / "bridge.toml",
                    state_dir=tmp_path / "state",
                    broker_port=broker.port,
                    sources=modbus_source(server.port, transport, tables),
                )
            )
            bridge = Bridge(config, source_backoff=FAST, broker_backoff=FAST)
            async with running(bridge):
                topics = {f"plant/test/plc-1/{tag}" for tag in expected}
                await wait_until(
                    lambda: all(len(sub.by_topic().get(t, [])) >= 3 for t in topics),
                    15,
                    "three readings of every tag",
                )
    received = sub.by_topic()
    assert set(received) == topics  # NAN never published
    for tag, value in expected.items():
        payloads = received[f"plant/test/plc-1/{tag}"]
        assert [p["value"] for p in payloads] == pytest.approx([value] * len(payloads)), tag
        first = payloads[0]
        assert set(first) == (
            {"ts", "value", "seq", "unit"} if tag == "F32" else {"ts", "value", "seq"}
        )
        assert abs(first["ts"] - time.time()) < 60
    assert received["plant/test/plc-1/F32"][0]["unit"] == "kscmh"
    assert_contiguous(sub.seqs(), duplicates_allowed=False)
    status = read_status(config.status_path)
    assert status is not None
    assert status.state == "stopped"
    [source] = status.sources
    assert source.non_finite >= 3
    assert source.errors == 0
    assert source.reads >= 3
    assert status.outbox.depth == 0
    assert status.publisher.sent == sum(len(v) for v in received.values())
    assert status.publisher.resent == 0
    assert status.publisher.acked == status.publisher.sent


# Two registers at addresses 0 and 1 (int16 −5, float32 2.5), as the device holds them.
LEVEL_AND_FLOW = (
    '  [[modbus.registers]]\n  tag = "LEVEL"\n  address = 0\n  type = "int16"\n'
    '  [[modbus.registers]]\n  tag = "FLOW"\n  address = 1\n  type = "float32"\n'
)


def level_and_flow_device() -> SimDevice:
    return sim_device(holding=registers_of([(-5, "int16", "big"), (2.5, "float32", "big")]))


async def test_device_disappearing_and_returning_loses_and_repeats_nothing(tmp_path: Path) -> None:
    tables = LEVEL_AND_FLOW
    device = level_and_flow_device()
    with mosquitto(tmp_path / "broker") as broker, subscriber(broker.port, "plant/#") as sub:
        async with modbus_server(device) as server:
            bridge = fast_bridge(tmp_path, broker.port, server.port, tables)
            [counters] = bridge.source_counters
            async with running(bridge):
                await wait_until(lambda: counters.readings >= 10, 10, "first readings")
                await server.stop()
                gone_at = time.time()
                await wait_until(lambda: counters.errors >= 3, 10, "failed reads counted")
                assert not counters.connected
                readings_while_gone = counters.readings
                await asyncio.sleep(0.5)
                assert counters.readings == readings_while_gone  # nothing produced while gone
                await server.start()
                back_at = time.time()
                await wait_until(
                    lambda: counters.readings >= readings_while_gone + 10, 10, "polling resumed"
                )
                await wait_until(lambda: everything_acked(bridge), 10, "outbox drained")
    assert counters.reconnects >= 1
    assert "127.0.0.1" in counters.last_error
    seqs = sub.seqs()
    assert set(seqs) == {"plant/test/plc-1/LEVEL", "plant/test/plc-1/FLOW"}
    assert_contiguous(seqs, duplicates_allowed=False)
    stamps = [p["ts"] for p in sub.by_topic()["plant/test/plc-1/LEVEL"]]
    assert not any(gone_at + 0.2 < ts < back_at for ts in stamps)  # no reading invented
    assert any(ts > back_at for ts in stamps)
    assert len(stamps) == counters.readings // 2
    with Outbox(bridge.config.outbox_path, max_messages=10) as outbox:
        assert outbox.next_seqs()["plant/test/plc-1/LEVEL"] == len(stamps)


def everything_acked(bridge: Bridge) -> bool:
    return bridge.publisher_counters.acked == sum(c.readings for c in bridge.source_counters)


def test_status_file_is_json_with_the_documented_sections(tmp_path: Path) -> None:
    """The status file format other tools read; a torn or foreign file reads as None."""
    from fedgate_bridge.bridge import BridgeStatus, write_status
    from fedgate_bridge.counters import PublisherCounters, SourceCounters
    from fedgate_bridge.outbox import OutboxSummary

    path = tmp_path / "status.json"
    write_status(
        path,
        BridgeStatus(
            pid=1,
            state="running",
            started_at=1.0,
            updated_at=2.0,
            outbox=OutboxSummary(depth=3, oldest_id=7, streams=2, dropped_oldest=0, rejected_new=1),
            publisher=PublisherCounters(acked=5),
            sources=[SourceCounters(name="plc-1", kind="modbus", reads=4)],
        ),
    )
    data = json.loads(path.read_text())
    assert set(data) >= {"pid", "state", "outbox", "publisher", "sources"}
    assert data["outbox"]["depth"] == 3
    assert data["sources"][0]["reads"] == 4
    assert read_status(path) is not None
    path.write_text("{not json")
    assert read_status(path) is None


async def test_serial_rtu_without_a_device_is_counted_as_unavailable(tmp_path: Path) -> None:
    """No serial hardware here: the RTU client must fail cleanly, counted, and keep retrying."""
    config = load_config(
        write_bridge_config(
            tmp_path / "bridge.toml",
            state_dir=tmp_path / "state",
            broker_port=1,
            sources=(
                '[[modbus]]\nname = "line-3"\ntransport = "rtu"\n'
                'serial_port = "/dev/fedgate-no-such-tty"\nbaudrate = 9600\nparity = "E"\n'
                "poll_interval_s = 0.1\ntimeout_s = 0.2\n"
                '  [[modbus.registers]]\n  tag = "A"\n  address = 0\n'
            ),
        )
    )
    async with await AsyncOutbox.open(
        config.outbox_path, max_messages=10, policy="drop_oldest"
    ) as outbox:
        counters = SourceCounters(name="line-3", kind="modbus")
        poller = ModbusPoller(
            config=config.modbus[0],
            topic_prefix=config.topic_prefix,
            outbox=outbox,
            counters=counters,
            backoff=FAST,
        )
        task = asyncio.create_task(poller.run())
        try:
            await wait_until(lambda: counters.errors >= 3, 10, "failed serial connects")
        finally:
            await cancel_until_done([task])
        assert outbox.depth == 0
    assert "/dev/fedgate-no-such-tty" in counters.last_error
    assert counters.readings == 0
    assert not counters.connected


class _AnswersAnotherFunction:
    """The client side of a server that answers every read with an input-register response
    (function 4): pymodbus hands it over unchecked."""

    async def _input_answer(
        self, address: int, *, count: int, device_id: int
    ) -> ReadInputRegistersResponse:
        return ReadInputRegistersResponse(registers=[9] * count)

    read_holding_registers = read_input_registers = _input_answer
    read_coils = read_discrete_inputs = _input_answer


async def test_an_answer_to_another_function_is_refused_not_published(tmp_path: Path) -> None:
    config = load_config(
        write_bridge_config(
            tmp_path / "bridge.toml",
            state_dir=tmp_path / "state",
            broker_port=1,
            sources=modbus_source(1, "tcp", '  [[modbus.registers]]\n  tag = "A"\n  address = 0\n'),
        )
    )
    async with await AsyncOutbox.open(
        config.outbox_path, max_messages=10, policy="drop_oldest"
    ) as outbox:
        poller = ModbusPoller(
            config=config.modbus[0],
            topic_prefix=config.topic_prefix,
            outbox=outbox,
            counters=SourceCounters(name="plc-1", kind="modbus"),
        )
        block = ReadBlock(kind="holding", address=0, count=1, registers=())
        with pytest.raises(SourceUnavailable, match="answered function 4 to a holding read"):
            await poller._read_block(_AnswersAnotherFunction(), block)  # type: ignore[arg-type]


async def test_a_register_the_device_refuses_does_not_silence_the_others(tmp_path: Path) -> None:
    """One tag at an address the device does not have (Modbus exception 2, an operator's
    typo): its read is skipped and counted, the device's other tags are still published,
    and the link is not torn down for it."""
    tables = LEVEL_AND_FLOW + '  [[modbus.registers]]\n  tag = "TYPO"\n  address = 500\n'
    device = level_and_flow_device()
    with mosquitto(tmp_path / "broker") as broker, subscriber(broker.port, "plant/#") as sub:
        async with modbus_server(device) as server:
            bridge = fast_bridge(tmp_path, broker.port, server.port, tables)
            [counters] = bridge.source_counters
            async with running(bridge):
                await wait_until(lambda: counters.readings >= 10, 10, "the other tags read")
    assert counters.blocks_refused >= 5
    assert (counters.errors, counters.reconnects) == (0, 0)
    assert "answered Modbus exception 2" in counters.last_error
    assert "(tags TYPO)" in counters.last_error
    received = sub.by_topic()
    assert set(received) == {"plant/test/plc-1/LEVEL", "plant/test/plc-1/FLOW"}
    assert {p["value"] for p in received["plant/test/plc-1/LEVEL"]} == {-5.0}


async def test_a_device_that_refuses_every_read_is_down_not_quietly_empty(tmp_path: Path) -> None:
    """Every read answered with an exception (a TCP gateway whose device is gone, a wrong
    unit id answered with one): nothing was read, so the source counts as failed and
    reconnects, as for a silent device, instead of staying up with every tag skipped."""
    tables = '  [[modbus.registers]]\n  tag = "TYPO"\n  address = 500\n'
    device = sim_device(holding=registers_of([(-5, "int16", "big")]))
    with mosquitto(tmp_path / "broker") as broker:
        async with modbus_server(device) as server:
            bridge = fast_bridge(tmp_path, broker.port, server.port, tables)
            [counters] = bridge.source_counters
            async with running(bridge):
                await wait_until(lambda: counters.errors >= 3, 10, "failed polls counted")
    assert (counters.reads, counters.readings) == (0, 0)
    assert counters.last_error.startswith("every read refused: ")
    assert counters.last_read_at is None
