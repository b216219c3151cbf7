"""OPC-UA to MQTT against a real asyncua server: subscribe and poll modes, server restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.client.ua_client import UASocketProtocol
from asyncua.common.node import Node
from asyncua.server.server import Server
from fedgate_bridge.bridge import Bridge
from fedgate_bridge.config import OpcuaNode, OpcuaSourceConfig, load_config
from fedgate_bridge.counters import SourceCounters
from fedgate_bridge.opcua_source import OpcuaReader, numeric_value, reading_timestamp
from fedgate_bridge.outbox import AsyncOutbox

from tests.bridge.bridge_support import (
    FAST,
    Subscriber,
    mosquitto,
    subscriber,
    wait_until,
    write_bridge_config,
)
from tests.net_support import free_port


@contextlib.asynccontextmanager
async def opcua_server(port: int) -> AsyncIterator[tuple[Server, dict[str, Node]]]:
    logging.getLogger("asyncua").setLevel(logging.ERROR)
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    ns = await server.register_namespace("urn:fedgate:test")
    plant = await server.nodes.objects.add_object(ns, "Plant")
    nodes = {
        "XMEAS_1": await plant.add_variable(
            ua.NodeId(ua.String("XMEAS_1"), ua.Int16(ns)), "XMEAS_1", 1.5
        ),
        "COUNT": await plant.add_variable(
            ua.NodeId(ua.String("COUNT"), ua.Int16(ns)),
            "COUNT",
            ua.Variant(-7, ua.VariantType.Int32),
        ),
        "FLAG": await plant.add_variable(ua.NodeId(ua.String("FLAG"), ua.Int16(ns)), "FLAG", True),
        "NAME": await plant.add_variable(
            ua.NodeId(ua.String("NAME"), ua.Int16(ns)), "NAME", "reactor"
        ),
    }
    await server.start()
    try:
        yield server, nodes
    finally:
        await server.stop()


def opcua_sources(port: int) -> str:
    nodes = (
        '  [[opcua.nodes]]\n  tag = "XMEAS_1"\n  node_id = "ns=2;s=XMEAS_1"\n  unit = "kPa"\n'
        '  [[opcua.nodes]]\n  tag = "COUNT"\n  node_id = "ns=2;s=COUNT"\n'
        '  [[opcua.nodes]]\n  tag = "FLAG"\n  node_id = "ns=2;s=FLAG"\n'
        '  [[opcua.nodes]]\n  tag = "NAME"\n  node_id = "ns=2;s=NAME"\n'
        '  [[opcua.nodes]]\n  tag = "MISSING"\n  node_id = "ns=2;s=NOT_THERE"\n'
    )
    return "\n".join(
        f'[[opcua]]\nname = "{name}"\nendpoint = "opc.tcp://127.0.0.1:{port}/"\n'
        f'mode = "{mode}"\npoll_interval_s = 0.1\n\n{nodes}'
        for name, mode in (("ua-sub", "subscribe"), ("ua-poll", "poll"))
    )


def values(sub: Subscriber, topic: str) -> list[float]:
    return [p["value"] for p in sub.by_topic().get(topic, [])]


async def test_subscribe_and_poll_modes_publish_and_survive_a_server_restart(
    tmp_path: Path,
) -> None:
    port = free_port()
    with mosquitto(tmp_path / "broker") as broker, subscriber(broker.port, "plant/#") as sub:
        async with opcua_server(port) as (server, nodes):
            config = load_config(
                write_bridge_config(
                    tmp_path / "bridge.toml",
                    state_dir=tmp_path / "state",
                    broker_port=broker.port,
                    sources=opcua_sources(port),
                )
            )
            bridge = Bridge(config, source_backoff=FAST, broker_backoff=FAST)
            sub_counters, poll_counters = bridge.source_counters
            stop = asyncio.Event()
            task = asyncio.create_task(bridge.run(stop))
            topics = [f"plant/test/{s}/XMEAS_1" for s in ("ua-sub", "ua-poll")]
            try:
                await wait_until(
                    lambda: all(1.5 in values(sub, t) for t in topics), 15, "initial values"
                )
                await nodes["XMEAS_1"].write_value(42.0)
                await wait_until(
                    lambda: all(42.0 in values(sub, t) for t in topics), 10, "changed value"
                )
                await server.stop()
                await wait_until(
                    lambda: not sub_counters.connected and not poll_counters.connected,
                    15,
                    "server loss noticed",
                )
                await server.start()
                await wait_until(
                    lambda: sub_counters.connected and poll_counters.connected, 15, "reconnected"
                )
                await nodes["XMEAS_1"].write_value(43.0)
                await wait_until(
                    lambda: all(43.0 in values(sub, t) for t in topics), 15, "value after restart"
                )
                await wait_until(
                    lambda: (
                        bridge.publisher_counters.acked
                        >= sub_counters.readings + poll_counters.readings
                    ),
                    10,
                    "everything published",
                )
            finally:
                stop.set()
                await asyncio.wait_for(task, 20)
    received = sub.by_topic()
    for source_name in ("ua-sub", "ua-poll"):
        prefix = f"plant/test/{source_name}"
        assert {t for t in received if t.startswith(prefix)} == {
            f"{prefix}/XMEAS_1",
            f"{prefix}/COUNT",
            f"{prefix}/FLAG",
        }  # NAME is text and MISSING does not exist: neither is published
        assert set(values(sub, f"{prefix}/COUNT")) == {-7.0}
        assert set(values(sub, f"{prefix}/FLAG")) == {1.0}
        assert received[f"{prefix}/XMEAS_1"][0]["unit"] == "kPa"
        assert "unit" not in received[f"{prefix}/COUNT"][0]
        for topic in (f"{prefix}/XMEAS_1", f"{prefix}/COUNT", f"{prefix}/FLAG"):
            seqs = [p["seq"] for p in received[topic]]
            assert seqs == list(range(len(seqs))), topic  # in order, no gap, no duplicate
    for counters in (sub_counters, poll_counters):
        assert counters.reconnects >= 1
        assert counters.non_numeric >= 1  # NAME
        assert counters.errors >= 2  # MISSING node, lost connection
        assert counters.reads >= 3
    assert sum(len(v) for v in received.values()) == bridge.publisher_counters.acked


@pytest.mark.parametrize("mode", ["poll", "subscribe"])
async def test_a_stop_that_meets_an_answered_request_ends_only_that_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A cancel() of a source's task that lands in the loop turn its request is answered in
    (as the bridge's stop, or an enclosing group's abort, can): asyncua's wait_for2 raises a
    CancelledError subclass. The source ends cancelled, and a sibling in the same task group
    (the publisher, other sources) is not taken down with it. The timing is forced by
    cancelling from inside the client's answer delivery, against a real server."""
    port = free_port()
    answered = UASocketProtocol._call_callback
    source: list[asyncio.Task[None]] = []
    counters = SourceCounters(name=f"ua-{mode}", kind="opcua")

    def call_callback(protocol: UASocketProtocol, request_id: int, body: object) -> None:
        answered(protocol, request_id, body)  # type: ignore[arg-type]
        ready = counters.reads >= 3 if mode == "poll" else counters.connected
        if source and ready and not source[0].done() and source[0].cancelling() == 0:
            source[0].cancel()

    monkeypatch.setattr(UASocketProtocol, "_call_callback", call_callback)
    outbox = await AsyncOutbox.open(tmp_path / "outbox.db", max_messages=1000, policy="drop_oldest")
    config = OpcuaSourceConfig(
        name=f"ua-{mode}",
        endpoint=f"opc.tcp://127.0.0.1:{port}/",
        mode=mode,
        poll_interval_s=0.1,
        nodes=(OpcuaNode(tag="XMEAS_1", node_id="ns=2;s=XMEAS_1"),),
    )
    reader = OpcuaReader(
        config=config, topic_prefix="plant/test", outbox=outbox, counters=counters, backoff=FAST
    )
    try:
        async with opcua_server(port), asyncio.timeout(30), asyncio.TaskGroup() as group:
            source.append(group.create_task(reader.run(), name=f"source ua-{mode}"))
            sibling = group.create_task(asyncio.sleep(1.0, result="publisher still running"))
    finally:
        await outbox.aclose()
    assert source[0].cancelled()
    assert sibling.result() == "publisher still running"
    assert counters.connected is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, 1.0), (False, 0.0), (3, 3.0), (-2.5, -2.5), ("3", None), (None, None), ([1], None)],
)
def test_numeric_values(value: object, expected: float | None) -> None:
    assert numeric_value(value) == expected


async def test_a_server_answering_with_too_few_results_is_counted_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that answers a Read of five nodes with four results used to end the whole
    bridge (zip(strict=True) raised out of the source's task). The answer is made short
    here on the client's side of the wire, as a broken server's would arrive; the source
    counts it, reconnects, and publishes again once the answers are whole."""
    from asyncua.client.client import Client

    whole = Client.read_attributes
    short = {"on": True}

    async def answered(self: Client, *args: object, **kwargs: object) -> list[ua.DataValue]:
        results = await whole(self, *args, **kwargs)  # type: ignore[arg-type]
        return results[:-1] if short["on"] else results

    monkeypatch.setattr(Client, "read_attributes", answered)
    port = free_port()
    with mosquitto(tmp_path / "broker") as broker, subscriber(broker.port, "plant/#") as sub:
        async with opcua_server(port) as (_server, nodes):
            poll_only = opcua_sources(port).split("[[opcua]]")[2]
            config = load_config(
                write_bridge_config(
                    tmp_path / "bridge.toml",
                    state_dir=tmp_path / "state",
                    broker_port=broker.port,
                    sources="[[opcua]]" + poll_only,
                )
            )
            bridge = Bridge(config, source_backoff=FAST, broker_backoff=FAST)
            (counters,) = bridge.source_counters
            stop = asyncio.Event()
            task = asyncio.create_task(bridge.run(stop))
            try:
                await wait_until(lambda: counters.errors >= 2, 15, "short answers counted")
                assert "answered Read for 5 nodes with 4 results" in counters.last_error
                assert not task.done()
                short["on"] = False
                await nodes["XMEAS_1"].write_value(44.0)
                await wait_until(
                    lambda: 44.0 in values(sub, "plant/test/ua-poll/XMEAS_1"), 15, "published"
                )
            finally:
                stop.set()
                await asyncio.wait_for(task, 20)


ARRIVAL = 1_800_000_000.0  # 2027-01-15


@pytest.mark.parametrize(
    ("source", "server", "expected"),
    [
        (ua.DateTime(2027, 1, 15, 7, 59, tzinfo=UTC), None, ARRIVAL - 60),
        (ua.DateTime(1601, 1, 1, tzinfo=UTC), None, ARRIVAL),  # DateTime 0: "not set"
        (ua.DateTime(9999, 12, 31, tzinfo=UTC), None, ARRIVAL),
        (
            ua.DateTime(2030, 1, 1, tzinfo=UTC),
            ua.DateTime(2027, 1, 15, 7, 59, tzinfo=UTC),
            ARRIVAL - 60,
        ),
        (None, None, ARRIVAL),
        # A device clock never set: every change stamped alike, decades back.
        (ua.DateTime(1990, 1, 1, tzinfo=UTC), None, ARRIVAL),
        (
            ua.DateTime(2001, 1, 1, tzinfo=UTC),
            ua.DateTime(2027, 1, 15, 7, 59, tzinfo=UTC),
            ARRIVAL - 60,
        ),
        (ua.DateTime(2027, 1, 14, 8, 1, tzinfo=UTC), None, ARRIVAL - 86340),  # within a day
    ],
)
def test_implausible_source_timestamps_fall_back(
    source: ua.DateTime | None, server: ua.DateTime | None, expected: float
) -> None:
    """A stamp of 1601, 9999 or years ahead was published and then refused by the agent
    (``ts_out_of_range``, ``ts_in_future``); the next plausible one is taken instead."""
    value = ua.DataValue(ua.Variant(1.5), SourceTimestamp=source, ServerTimestamp=server)
    assert reading_timestamp(value, ARRIVAL) == pytest.approx(expected)
