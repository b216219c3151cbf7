"""Broker outage and bridge crash: every reading reaches the subscriber, no seq is reused.

Delivery is at least once: a message whose PUBACK was lost with the connection is sent
again (same topic, same seq, same payload) and the agent deduplicates. What must never
happen is a gap in a stream or one seq carrying two different readings.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from fedgate_bridge.bridge import Bridge
from fedgate_bridge.config import BrokerSettings, load_config
from fedgate_bridge.counters import PublisherCounters
from fedgate_bridge.outbox import Outbox, read_outbox_summary
from fedgate_bridge.run_cli import status

from tests.bridge.bridge_support import (
    FAST,
    modbus_server,
    publish_five,
    registers_of,
    sim_device,
    subscriber,
    wait_until,
    write_bridge_config,
)
from tests.mosquitto_support import Mosquitto

TABLES = (
    '  [[modbus.registers]]\n  tag = "A"\n  address = 0\n  type = "uint16"\n'
    '  [[modbus.registers]]\n  tag = "B"\n  address = 1\n  type = "float32"\n'
)


def source(port: int, interval: float = 0.05) -> str:
    return (
        f'[[modbus]]\nname = "plc-1"\nport = {port}\npoll_interval_s = {interval}\n'
        f"timeout_s = 0.5\n\n{TABLES}"
    )


def assert_complete_and_unambiguous(
    by_topic: dict[str, list[dict[str, Any]]], next_seqs: dict[str, int]
) -> None:
    """Every seq 0..next-1 arrived; duplicates are byte-identical resends."""
    assert set(by_topic) == set(next_seqs)
    for topic, payloads in by_topic.items():
        assert {p["seq"] for p in payloads} == set(range(next_seqs[topic])), topic
        first_seen: dict[int, dict[str, Any]] = {}
        for payload in payloads:
            assert first_seen.setdefault(payload["seq"], payload) == payload, topic


async def test_broker_outage_is_buffered_and_drained(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    device = sim_device(holding=registers_of([(7, "uint16", "big"), (1.5, "float32", "big")]))
    try:
        with subscriber(broker.port, "plant/#") as sub:
            async with modbus_server(device) as server:
                config = load_config(
                    write_bridge_config(
                        tmp_path / "bridge.toml",
                        state_dir=tmp_path / "state",
                        broker_port=broker.port,
                        sources=source(server.port),
                        broker_extra="max_inflight = 10\n",
                    )
                )
                # A generous flush at the stop: on a loaded machine the last readings of
                # the polling may still be on their way when stop is set.
                bridge = Bridge(
                    config, source_backoff=FAST, broker_backoff=FAST, flush_timeout_s=20.0
                )
                published = bridge.publisher_counters
                [counters] = bridge.source_counters
                stop = asyncio.Event()
                task = asyncio.create_task(bridge.run(stop))
                await wait_until(lambda: published.acked >= 10, 10, "first PUBACKs")
                await asyncio.to_thread(broker.stop)
                await wait_until(lambda: not published.connected, 10, "outage noticed")
                before = counters.readings
                await asyncio.sleep(3.0)  # keep polling into the outbox
                buffered = read_outbox_summary(config.outbox_path)
                assert buffered is not None
                assert counters.readings - before >= 20  # polling never stopped
                assert buffered.depth >= counters.readings - before - 20
                await asyncio.to_thread(broker.start)
                await wait_until(
                    lambda: published.connected and published.acked >= counters.readings,
                    15,
                    "outbox drained after the broker returned",
                )
                stop.set()
                await asyncio.wait_for(task, 40)
            with Outbox(config.outbox_path, max_messages=10) as outbox:
                assert outbox.depth == 0
                next_seqs = outbox.next_seqs()
            total = sum(next_seqs.values())
            await wait_until(
                lambda: len({(t, p["seq"]) for t, p in sub.snapshot()}) >= total,
                15,
                "every reading delivered to the subscriber",
            )
            assert_complete_and_unambiguous(sub.by_topic(), next_seqs)
    finally:
        broker.stop()
    assert published.connects >= 2
    assert published.disconnects >= 1
    assert published.inflight == 0
    assert counters.errors == 0


BRIDGE = "import sys; from fedgate_bridge.run_cli import run; run(sys.argv[1:])"


def start_bridge(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", BRIDGE, "--config", str(config), "--log-json"],
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


async def test_kill_9_then_restart_continues_seq_and_sends_unsent_rows(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker")  # not started yet: readings stay in the outbox
    device = sim_device(holding=registers_of([(3, "uint16", "big"), (-2.5, "float32", "big")]))
    log = tmp_path / "bridge.log"
    async with modbus_server(device) as server:
        config_path = write_bridge_config(
            tmp_path / "bridge.toml",
            state_dir=tmp_path / "state",
            broker_port=broker.port,
            sources=source(server.port),
        )
        config = load_config(config_path)
        first = start_bridge(config_path, log)
        try:
            await wait_until(
                lambda: (read_outbox_summary(config.outbox_path) or _empty).depth >= 40,
                20,
                "readings buffered by the first bridge",
            )
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        killed_at = time.time()
        with Outbox(config.outbox_path, max_messages=10) as outbox:
            before = outbox.next_seqs()
            assert outbox.depth == sum(before.values())  # nothing was ever published
        await asyncio.to_thread(broker.start)
        try:
            with subscriber(broker.port, "plant/#") as sub:
                second = start_bridge(config_path, log)
                try:
                    await wait_until(
                        lambda: all(
                            max(sub.seqs().get(topic, [-1])) >= before[topic] + 20
                            for topic in before
                        ),
                        20,
                        "old and new readings delivered",
                    )
                finally:
                    second.send_signal(signal.SIGTERM)
                    code = await asyncio.to_thread(second.wait, 15)
                assert code == 0, log.read_text()
                with Outbox(config.outbox_path, max_messages=10) as outbox:
                    after = outbox.next_seqs()
                    assert outbox.depth == 0  # SIGTERM flushed everything
                total = sum(after.values())
                await wait_until(
                    lambda: len({(t, p["seq"]) for t, p in sub.snapshot()}) >= total,
                    15,
                    "every reading delivered",
                )
                by_topic = sub.by_topic()
        finally:
            broker.stop()
    assert_complete_and_unambiguous(by_topic, after)
    for topic, payloads in by_topic.items():
        stamp = {p["seq"]: p["ts"] for p in payloads}
        assert stamp[before[topic] - 1] < killed_at < stamp[before[topic]]  # continued, not reused
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(e["msg"] == "bridge stopped" and e["flushed"] is True for e in events)

    result = CliRunner().invoke(status, ["--config", str(config_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["running"] is False
    assert report["outbox"]["depth"] == 0
    assert report["status"]["state"] == "stopped"
    [plc] = report["status"]["sources"]
    assert plc["name"] == "plc-1"
    assert plc["reads"] > 0
    assert plc["errors"] == 0, plc  # its last_error says what failed, if anything did
    assert report["status"]["publisher"]["acked"] >= sum(before.values())
    text = CliRunner().invoke(status, ["--config", str(config_path)])
    assert text.exit_code == 0
    assert "bridge:   not running" in text.output
    assert "outbox:   0 waiting" in text.output
    assert "plc-1" in text.output


class _Empty:
    depth = 0


_empty = _Empty()


async def publish_with(tmp_path: Path, port: int, secret: Path) -> PublisherCounters:
    """A publisher with ``secret`` as its password file, until it drains or gives up."""
    settings = BrokerSettings(port=port, username="bridge", password_file=str(secret))
    database = tmp_path / f"{secret.name}.db"
    counters, _ = await publish_five(database, settings, client_id=f"auth-{secret.name}")
    return counters


async def test_broker_credentials_come_from_the_password_file(tmp_path: Path) -> None:
    passwords = tmp_path / "mosquitto.passwd"
    command = ["/usr/bin/mosquitto_passwd", "-c", "-b", str(passwords), "bridge", "s3cret"]
    await asyncio.to_thread(subprocess.run, command, check=True, capture_output=True)
    passwords.chmod(0o600)
    broker = Mosquitto(tmp_path / "broker", extra=f"password_file {passwords}\n")
    good = tmp_path / "good"
    good.write_text("s3cret\n")  # a trailing newline, as editors and systemd-creds write
    bad = tmp_path / "bad"
    bad.write_text("guess")
    await asyncio.to_thread(broker.start)
    try:
        refused = await publish_with(tmp_path, broker.port, bad)
        accepted = await publish_with(tmp_path, broker.port, good)
    finally:
        broker.stop()
    assert refused.acked == 0
    assert refused.connects == 0
    assert "refused" in refused.last_error
    assert accepted.acked == 5
    assert accepted.connect_failures == 0
