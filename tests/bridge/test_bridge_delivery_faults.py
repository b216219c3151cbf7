"""Faults between the outbox and the broker that must lose no reading.

* a publish the broker's ACL refuses (MQTT 5 PUBACK "Not authorized") is parked in the
  outbox, not deleted, and sent after the ACL is fixed and the bridge restarted;
* a broker that stops answering (SIGSTOP: the TCP connection stays up, no PUBACK comes)
  ends the connection after ``ack_timeout_s``, and everything goes again;
* two bridges sharing one client id (a cloned gateway) throw each other off the broker:
  the reconnect backoff grows instead of starting over after each short connection;
* an outbox locked by another process for longer than SQLite's busy timeout makes the
  bridge wait, not exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner
from fedgate_bridge.bridge import Bridge
from fedgate_bridge.config import BrokerSettings, load_config
from fedgate_bridge.counters import PublisherCounters
from fedgate_bridge.outbox import AsyncOutbox, Outbox, Reading, read_outbox_summary
from fedgate_bridge.publisher import TOPIC_BLOCK_S, MqttPublisher
from fedgate_bridge.run_cli import status
from fedgate_common.backoff import Backoff
from fedgate_common.tasks import cancel_until_done

from tests.bridge.bridge_support import (
    FAST,
    modbus_server,
    registers_of,
    sim_device,
    subscriber,
    wait_until,
    write_bridge_config,
)
from tests.bridge.test_bridge_outages import assert_complete_and_unambiguous, source
from tests.mosquitto_support import Mosquitto

ALLOWED = "plant/test/plc-1/A"
DENIED = "plant/test/plc-1/B"


def acl_broker(directory: Path, acl: Path, rules: str) -> Mosquitto:
    """A broker whose anonymous clients may write only what ``rules`` allow, read all."""
    acl.write_text(rules + "topic read plant/#\n")
    return Mosquitto(directory, extra=f"acl_file {acl}\n")  # keeps the subscriber's session


def plc_bridge_config(tmp_path: Path, broker_port: int, modbus_port: int) -> Path:
    """A bridge polling tags A and B of one Modbus device every 50 ms."""
    return write_bridge_config(
        tmp_path / "bridge.toml",
        state_dir=tmp_path / "state",
        broker_port=broker_port,
        sources=source(modbus_port),
    )


async def run_bridge_until(bridge: Bridge, condition: object, what: str) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        await wait_until(condition, 20, what)  # type: ignore[arg-type]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_readings_the_acl_refuses_are_parked_and_sent_after_a_restart(
    tmp_path: Path,
) -> None:
    acl = tmp_path / "bridge.acl"
    broker = acl_broker(tmp_path / "broker", acl, f"topic write {ALLOWED}\n")
    await asyncio.to_thread(broker.start)
    device = sim_device(holding=registers_of([(7, "uint16", "big"), (1.5, "float32", "big")]))
    try:
        with subscriber(broker.port, "plant/#") as sub:
            async with modbus_server(device) as server:
                config_path = plc_bridge_config(tmp_path, broker.port, server.port)
                config = load_config(config_path)
                assert config.broker.protocol == "5"  # the default
                # The production backoff: with max_queued_messages 0 (as section 16.4 of
                # operations.md asks) Mosquitto closes the connection after the refusal.
                first = Bridge(config, source_backoff=FAST)
                published = first.publisher_counters
                await run_bridge_until(
                    first,
                    lambda: published.parked >= 10 and published.acked >= 10,
                    "readings of B refused and parked, readings of A delivered",
                )
                # One refusal per topic costs at most one reconnect, at once: B's later rows
                # are parked without being sent, and A keeps flowing.
                assert published.connects <= 2
                assert published.refused <= 2
                parked = read_outbox_summary(config.outbox_path)
                assert parked is not None
                assert parked.parked == published.parked
                assert "Not authorized" in published.last_refusal
                assert DENIED not in sub.by_topic()  # the broker dropped them, as it should

                report = CliRunner().invoke(status, ["--config", str(config_path)])
                assert report.exit_code == 0, report.output
                assert f"{parked.parked} parked" in report.output
                assert DENIED in report.output
                assert "Not authorized" in report.output

                # The operator fixes the ACL and restarts broker and bridge.
                await asyncio.to_thread(broker.stop)
                sub.connected.clear()
                acl.write_text(f"topic write {ALLOWED}\ntopic write {DENIED}\ntopic read plant/#\n")
                await asyncio.to_thread(broker.start)
                assert await asyncio.to_thread(sub.connected.wait, 15), "subscriber is back"
                second = Bridge(
                    config, source_backoff=FAST, broker_backoff=FAST, flush_timeout_s=20.0
                )
                await run_bridge_until(
                    second,
                    lambda: second.publisher_counters.acked >= parked.parked + 10,
                    "parked readings sent after the restart",
                )
            with Outbox(config.outbox_path, max_messages=10) as outbox:
                summary = outbox.summary()
                next_seqs = outbox.next_seqs()
            assert summary.parked == 0
            assert summary.depth == 0
            await wait_until(
                lambda: len({(t, p["seq"]) for t, p in sub.snapshot()}) >= sum(next_seqs.values()),
                15,
                "every reading delivered",
            )
            # Nothing lost: B's stream is complete from seq 0, the parked ones included.
            assert_complete_and_unambiguous(sub.by_topic(), next_seqs)
    finally:
        broker.stop()
    assert second.publisher_counters.refused == 0


@contextlib.asynccontextmanager
async def running_publisher(
    database: Path,
    settings: BrokerSettings,
    client_id: str,
    *,
    rows: Sequence[Reading] = (),
    max_messages: int = 100,
    backoff: Backoff | None = None,
    topic_block_s: float = TOPIC_BLOCK_S,
) -> AsyncIterator[MqttPublisher]:
    """A publisher sending the outbox at ``database`` (``rows`` stored in it first) until
    the block ends; its outbox and counters are ``publisher.outbox`` and ``.counters``."""
    async with await AsyncOutbox.open(
        database, max_messages=max_messages, policy="drop_oldest"
    ) as outbox:
        if rows:
            await outbox.append(rows)
        publisher = MqttPublisher(
            settings=settings,
            client_id=client_id,
            outbox=outbox,
            counters=PublisherCounters(),
            backoff=backoff,
            topic_block_s=topic_block_s,
        )
        task = asyncio.create_task(publisher.run())
        try:
            yield publisher
        finally:
            await cancel_until_done([task])


async def five_rows(outbox: AsyncOutbox, first: int) -> None:
    await outbox.append([Reading(topic=ALLOWED, ts=1.0, value=float(first + i)) for i in range(5)])


async def test_a_broker_that_stops_acknowledging_is_left_and_everything_sent_again(
    tmp_path: Path,
) -> None:
    broker = Mosquitto(tmp_path / "broker", persistence=False)
    await asyncio.to_thread(broker.start)
    assert broker.process is not None
    settings = BrokerSettings(port=broker.port, keepalive_s=600, ack_timeout_s=1)
    try:
        with subscriber(broker.port, "plant/#") as sub:
            async with running_publisher(tmp_path / "outbox.db", settings, "stalled") as publisher:
                counters, ob = publisher.counters, publisher.outbox
                await five_rows(ob, 0)
                publisher.notify()
                await wait_until(lambda: counters.acked == 5, 15, "first five acknowledged")
                os.kill(broker.process.pid, signal.SIGSTOP)
                try:
                    await five_rows(ob, 5)
                    publisher.notify()
                    await wait_until(
                        lambda: "no PUBACK within 1 s" in counters.last_error,
                        15,
                        "the missing PUBACKs noticed",
                    )
                    assert not counters.connected
                    assert counters.acked == 5
                    assert ob.depth == 5  # unacknowledged rows stay
                finally:
                    os.kill(broker.process.pid, signal.SIGCONT)
                await wait_until(lambda: publisher.idle, 30, "the rest acknowledged")
            await wait_until(lambda: len(sub.snapshot()) >= 10, 10, "ten messages received")
            values = {p["value"] for _, p in sub.snapshot()}
    finally:
        broker.stop()
    assert values == {float(i) for i in range(10)}
    assert counters.acked >= 10
    assert counters.disconnects >= 1


async def test_two_bridges_with_one_client_id_back_off_instead_of_storming(
    tmp_path: Path,
) -> None:
    broker = Mosquitto(tmp_path / "broker", persistence=False)
    await asyncio.to_thread(broker.start)
    settings = BrokerSettings(port=broker.port)
    try:
        started = time.monotonic()
        async with (  # the default backoff, as in production
            running_publisher(tmp_path / "a.db", settings, "cloned") as a,
            running_publisher(tmp_path / "b.db", settings, "cloned") as b,
        ):
            await asyncio.sleep(6.0)
        elapsed = time.monotonic() - started
    finally:
        broker.stop()
    counters = [a.counters, b.counters]
    connects = sum(c.connects for c in counters)
    # Each takes the other's session: every connection is short. Restarting the backoff at
    # each CONNACK reconnected every 0.25-0.5 s (about 24 connects each in 6 s); growing
    # it allows 0.25 + 0.5 + 1 + 2 s at the least between the first five.
    assert 3 <= connects <= 12, (connects, elapsed)
    assert all(c.disconnects >= 1 for c in counters), counters  # they did collide


async def test_a_locked_outbox_is_waited_for_not_fatal(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", persistence=False)
    await asyncio.to_thread(broker.start)
    device = sim_device(holding=registers_of([(7, "uint16", "big"), (1.5, "float32", "big")]))
    try:
        async with modbus_server(device) as server:
            config = load_config(plc_bridge_config(tmp_path, broker.port, server.port))
            bridge = Bridge(config, source_backoff=FAST, broker_backoff=FAST, flush_timeout_s=20)
            [plc] = bridge.source_counters
            stop = asyncio.Event()
            task = asyncio.create_task(bridge.run(stop))
            await wait_until(lambda: plc.readings >= 10, 15, "first readings stored")
            # Another process (here: another connection) holds the write lock for longer
            # than the bridge's 5 s busy timeout, as a backup tool or a stray sqlite3 might.
            locker = sqlite3.connect(config.outbox_path, isolation_level=None, timeout=10)
            locker.execute("BEGIN EXCLUSIVE")
            health = bridge.outbox_health
            await wait_until(lambda: health.failing, 20, "the lock noticed")
            assert not task.done()  # the bridge waits instead of exiting 4
            stored = plc.readings
            locker.execute("COMMIT")
            locker.close()
            await wait_until(lambda: plc.readings >= stored + 10, 20, "storing again")
            stop.set()
            await asyncio.wait_for(task, 30)
    finally:
        broker.stop()
    assert health.failures >= 1
    assert not health.failing
    assert "locked" in health.last_error


async def test_a_row_the_broker_will_never_take_is_parked_not_blocking_the_rest(
    tmp_path: Path,
) -> None:
    # A payload above the broker's size limit: Mosquitto closes the connection, no PUBACK.
    broker = Mosquitto(tmp_path / "broker", persistence=False, extra="message_size_limit 70\n")
    await asyncio.to_thread(broker.start)
    poison = Reading(topic=ALLOWED, ts=1.0, value=1.0, unit="x" * 80)
    rows = [poison, *(Reading(topic=ALLOWED, ts=1.0, value=float(10 + i)) for i in range(5))]
    try:
        async with running_publisher(
            tmp_path / "o.db", BrokerSettings(port=broker.port), "poisoned", rows=rows, backoff=FAST
        ) as publisher:
            await wait_until(lambda: publisher.idle, 30, "the rest delivered")
            summary = await publisher.outbox.summary()
            [parked] = publisher.outbox.outbox.parked_topics()
    finally:
        broker.stop()
    counters = publisher.counters
    assert counters.acked == 5
    assert summary.parked == 1
    assert "closed the connection each time it was sent (5 times)" in parked.reason
    assert counters.connects == 6  # five lost with the row in front, one that delivered


async def test_a_slow_link_that_keeps_acknowledging_is_not_cut_off(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", persistence=False)
    await asyncio.to_thread(broker.start)
    proxy = await SlowProxy.start(broker.port, bytes_per_s=20_000)
    settings = BrokerSettings(port=proxy.port, max_inflight=2_000, ack_timeout_s=2)
    rows = [Reading(topic=ALLOWED, ts=1.0, value=float(i)) for i in range(2_000)]
    try:
        async with running_publisher(
            tmp_path / "o.db", settings, "slow", rows=rows, max_messages=10_000
        ) as publisher:
            await wait_until(lambda: publisher.idle, 60, "everything acknowledged")
    finally:
        await proxy.close()
        broker.stop()
    counters = publisher.counters
    # 2,000 messages at 20 kB/s take about 6 s: the last of the window waits three times
    # ack_timeout_s for its PUBACK, yet PUBACKs never pause for that long.
    assert proxy.elapsed_s > 2 * settings.ack_timeout_s
    assert counters.connects == 1
    assert counters.resent == 0
    assert counters.acked == 2_000


class SlowProxy:
    """A loopback TCP proxy that passes one direction's bytes at a fixed rate."""

    def __init__(
        self, server: asyncio.Server, broker_port: int, bytes_per_s: int, *, downlink: bool
    ) -> None:
        self._server = server
        self._downlink = downlink  # slow the broker's answers instead of the client's bytes
        self._broker_port = broker_port
        self._rate = bytes_per_s
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = int(server.sockets[0].getsockname()[1])
        self._started = time.monotonic()
        self.elapsed_s = 0.0

    @classmethod
    async def start(
        cls, broker_port: int, *, bytes_per_s: int, downlink: bool = False
    ) -> SlowProxy:
        holder: list[SlowProxy] = []
        server = await asyncio.start_server(lambda r, w: holder[0]._connect(r, w), "127.0.0.1", 0)
        proxy = cls(server, broker_port, bytes_per_s, downlink=downlink)
        holder.append(proxy)
        return proxy

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._broker_port)
        self._started = time.monotonic()
        for task in (
            asyncio.create_task(self._pipe(reader, up_writer, slow=not self._downlink)),
            asyncio.create_task(self._pipe(up_reader, writer, slow=self._downlink)),
        ):
            self._tasks.add(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, slow: bool
    ) -> None:
        try:
            while chunk := await reader.read(48 if slow else 65_536):
                writer.write(chunk)
                await writer.drain()
                if slow:
                    await asyncio.sleep(len(chunk) / self._rate)
                self.elapsed_s = time.monotonic() - self._started
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._server.close()
        await self._server.wait_closed()


async def park_then_allow(
    outbox: AsyncOutbox, publisher: MqttPublisher, acl: Path, broker: Mosquitto, rows: int
) -> None:
    """``rows`` readings of the denied topic, refused and parked; then the operator fixes
    the ACL and reloads the broker (SIGHUP), not the bridge."""
    await outbox.append([Reading(topic=DENIED, ts=1.0, value=float(i)) for i in range(rows)])
    publisher.notify()
    await wait_until(lambda: publisher.counters.parked >= rows, 15, "B refused and parked")
    rules = f"topic write {ALLOWED}\ntopic write {DENIED}\ntopic read plant/#\n"
    await asyncio.to_thread(acl.write_text, rules)
    assert broker.process is not None
    os.kill(broker.process.pid, signal.SIGHUP)
    await asyncio.sleep(1.0)


@pytest.mark.parametrize("later", [3, 0], ids=["new-readings", "silent-topic"])
async def test_a_topic_the_acl_allows_again_flows_again_with_what_was_parked(
    tmp_path: Path, later: int
) -> None:
    """With no new reading of the topic after the ACL is fixed ("silent-topic"), its oldest
    parked row tries the topic when the block runs out, and the rest follow."""
    acl = tmp_path / "bridge.acl"
    broker = acl_broker(tmp_path / "broker", acl, f"topic write {ALLOWED}\n")
    await asyncio.to_thread(broker.start)
    settings = BrokerSettings(port=broker.port)
    try:
        with subscriber(broker.port, "plant/#") as sub:
            async with running_publisher(
                tmp_path / "o.db", settings, "reloaded", backoff=FAST, topic_block_s=0.5
            ) as publisher:
                outbox = publisher.outbox
                await park_then_allow(outbox, publisher, acl, broker, 5)
                await outbox.append(
                    [Reading(topic=DENIED, ts=2.0, value=float(i)) for i in range(5, 5 + later)]
                )
                publisher.notify()
                total = 5 + later
                await wait_until(
                    lambda: len(sub.seqs().get(DENIED, [])) >= total, 20, "B delivered"
                )
                await wait_until(lambda: publisher.idle, 10, "nothing left")
                summary = await outbox.summary()
    finally:
        broker.stop()
    assert sorted(set(sub.seqs()[DENIED])) == list(range(total))  # the parked five included
    assert summary.parked == 0
    assert summary.depth == 0


async def test_a_topic_still_refused_is_tried_with_one_parked_row_at_a_time(
    tmp_path: Path,
) -> None:
    """While the ACL still denies the topic, each try sends one parked row, which is parked
    again; the other parked rows stay put and the wait doubles."""
    acl = tmp_path / "bridge.acl"
    broker = acl_broker(tmp_path / "broker", acl, f"topic write {ALLOWED}\n")
    await asyncio.to_thread(broker.start)
    settings = BrokerSettings(port=broker.port)
    try:
        async with running_publisher(
            tmp_path / "o.db", settings, "still-denied", backoff=FAST, topic_block_s=0.3
        ) as publisher:
            outbox = publisher.outbox
            await outbox.append([Reading(topic=DENIED, ts=1.0, value=float(i)) for i in range(8)])
            publisher.notify()
            await wait_until(lambda: publisher.counters.parked >= 8, 15, "B parked")
            sent_before = publisher.counters.sent
            # Blocks of 0.3, 0.6 and 1.2 s run out within 2.5 s: three tries at most.
            await asyncio.sleep(2.5)
            tries = publisher.counters.sent - sent_before
            summary = await outbox.summary()
    finally:
        broker.stop()
    assert 1 <= tries <= 3
    assert summary.parked == 8  # each try parked again, nothing lost
    assert summary.depth == 0


async def test_parked_rows_coming_back_on_a_slow_link_are_sent_once(tmp_path: Path) -> None:
    """PUBACKs that arrive while parked rows are moved back must not make the publisher
    send their rows a second time on the same connection."""
    acl = tmp_path / "bridge.acl"
    broker = acl_broker(tmp_path / "broker", acl, f"topic write {ALLOWED}\n")
    await asyncio.to_thread(broker.start)
    proxy = await SlowProxy.start(broker.port, bytes_per_s=24_000, downlink=True)
    settings = BrokerSettings(port=proxy.port, max_inflight=64)
    try:
        with subscriber(broker.port, "plant/#") as sub:
            async with running_publisher(
                tmp_path / "o.db",
                settings,
                "slow-acks",
                max_messages=10_000,
                backoff=FAST,
                topic_block_s=0.5,
            ) as publisher:
                await park_then_allow(publisher.outbox, publisher, acl, broker, 20)
                batch = [Reading(topic=ALLOWED, ts=2.0, value=float(i)) for i in range(300)]
                batch.append(Reading(topic=DENIED, ts=2.0, value=20.0))
                batch += [Reading(topic=ALLOWED, ts=3.0, value=float(i)) for i in range(2000)]
                await publisher.outbox.append(batch)
                publisher.notify()
                await wait_until(lambda: publisher.idle, 60, "everything acknowledged")
            await wait_until(lambda: len(sub.snapshot()) >= 2_321, 15, "all received")
            received = [(topic, p["seq"]) for topic, p in sub.snapshot()]
    finally:
        await proxy.close()
        broker.stop()
    counters = publisher.counters
    assert len(set(received)) == 2_321
    assert counters.acked == 2_321  # each row acknowledged once: none sent twice
    assert counters.resent == 0
