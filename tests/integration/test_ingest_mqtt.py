"""MQTT ingest against a real Mosquitto (its own, on a free loopback port, per test).

1. kill -9 of the ingest process at random moments while an independent publisher process
   sends 100,000 QoS 1 messages: afterwards every one is in the buffer exactly once;
2. broker restarted (twice) mid-stream with persistence on: nothing lost or doubled;
3. backpressure: a small queue and a burst, nothing dropped, the reader paused;
4. malformed payloads are counted per reason and acknowledged (not redelivered), the
   stream goes on; a message above the Maximum Packet Size the ingest announced is
   discarded by the broker, not by a broken connection;
5. Sparkplug B over the broker;
6. the tail of a burst: after the publisher stops, every message is committed within a
   second or two and visible to other processes (status, windows, backups), with the
   buffer opened the way `fedgate-agent run` opens it.

The publisher and the ingest process are bench/ingest/publisher.py and consumer.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from fedgate_agent.ingest.buffer import BufferSettings, IngestBuffer
from fedgate_agent.ingest.mqtt_source import MqttIngest, MqttIngestSettings, MqttSubscription
from fedgate_agent.ingest.sparkplug import DATA_TYPES, sparkplug_payload_class
from fedgate_common.backoff import Backoff
from fedgate_common.tasks import cancel_until_done
from paho.mqtt.enums import CallbackAPIVersion

from bench.ingest.publisher import json_payload
from tests.mosquitto_support import Mosquitto

MOSQUITTO = Path("/usr/sbin/mosquitto")
REPO = Path(__file__).resolve().parents[2]
TOPIC = "plant/line1/XMEAS_1"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MOSQUITTO.exists(), reason="needs the mosquitto binary"),
]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    started: list[Mosquitto] = []

    def start(*, persistence: bool = False) -> Mosquitto:
        instance = Mosquitto(tmp_path / f"broker-{len(started)}", persistence=persistence)
        instance.start()
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.stop()


def bench_module(module: str, *args: str, stdout: int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, stdout=stdout)


def stored_seqs(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [seq for (seq,) in db.execute("SELECT seq FROM samples ORDER BY seq")]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def buffer_samples(path: Path) -> int:
    if not path.exists():
        return 0
    with contextlib.suppress(Exception), IngestBuffer.open_read_only(path) as buffer:
        return buffer.stats().samples
    return 0


def test_kill_9_at_random_moments_loses_nothing_and_stores_nothing_twice(
    tmp_path: Path, broker: Callable[..., Mosquitto]
) -> None:
    count = 100_000
    mosquitto = broker()
    buffer = tmp_path / "buffer.db"
    ready = tmp_path / "subscribed"
    consumer_args = [
        "--port", str(mosquitto.port), "--client-id", "kill9-agent", "--topic", "plant/+/+",
        "--buffer", str(buffer),
    ]  # fmt: skip

    def start_ingest() -> subprocess.Popen[bytes]:
        return bench_module("bench.ingest.consumer", *consumer_args, "--ready-file", str(ready))

    ingest = start_ingest()
    wait_until(ready.exists, 30, "the first subscription")
    publisher = bench_module(
        "bench.ingest.publisher",
        "--port", str(mosquitto.port), "--topic", TOPIC, "--count", str(count),
        "--rate", "8000", "--client-id", "kill9-publisher",
        stdout=subprocess.PIPE,
    )  # fmt: skip
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    kills = 0
    try:
        while publisher.poll() is None or kills < 5:
            time.sleep(rng.uniform(0.2, 1.6))
            ingest.kill()  # SIGKILL: no DISCONNECT, no cleanup, maybe mid-commit
            ingest.wait()
            kills += 1
            ingest = start_ingest()
        assert publisher.wait(timeout=120) == 0
        wait_until(lambda: buffer_samples(buffer) >= count, 60, f"{count} samples")
    finally:
        ingest.terminate()
        ingest.wait(timeout=30)
        if publisher.poll() is None:
            publisher.kill()
            publisher.wait()

    seqs = stored_seqs(buffer)
    assert len(seqs) == count
    assert seqs == list(range(count))
    with IngestBuffer.open_read_only(buffer) as stored:
        stats = stored.stats()
    assert stats.samples == count
    assert stats.counters["inserted"] == count
    assert stats.quarantined == ()
    redelivered = stats.counters.get("duplicates", 0)
    print(
        f"\nkill -9 x{kills} (seed {seed}): {count} stored once, "
        f"{redelivered} redeliveries deduplicated"
    )


@contextlib.asynccontextmanager
async def running(ingest: MqttIngest) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(ingest.run())
    try:
        await asyncio.wait_for(ingest.connected.wait(), 15)
        yield task
    finally:
        await cancel_until_done([task])


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def committed_more(ingest: MqttIngest, n: int) -> None:
    target = ingest.counters.committed + n
    await until(lambda: ingest.counters.committed >= target, 20, f"{n} more commits")


def ingest_settings(port: int, client_id: str, **overrides: object) -> MqttIngestSettings:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "client_id": client_id,
        "subscriptions": (MqttSubscription("plant/+/+"),),
        "backoff": Backoff(initial_s=0.05, max_s=0.5),
        "keepalive_s": 5,
    }
    values.update(overrides)
    return MqttIngestSettings(**values)  # type: ignore[arg-type]


async def test_broker_restarts_mid_stream_lose_and_double_nothing(
    tmp_path: Path, broker: Callable[..., Mosquitto]
) -> None:
    count = 20_000
    mosquitto = broker(persistence=True)
    with IngestBuffer.open(BufferSettings(tmp_path / "buffer.db")) as buffer:
        ingest = MqttIngest(
            settings=ingest_settings(mosquitto.port, "restart-agent"), buffer=buffer
        )
        async with running(ingest):
            publisher = bench_module(
                "bench.ingest.publisher",
                "--port", str(mosquitto.port), "--topic", TOPIC, "--count", str(count),
                "--rate", "4000", "--client-id", "restart-publisher", "--persistent",
                stdout=subprocess.PIPE,
            )  # fmt: skip
            try:
                for _ in range(2):
                    await committed_more(ingest, 3000)
                    await asyncio.to_thread(mosquitto.stop)
                    await asyncio.sleep(0.5)
                    await asyncio.to_thread(mosquitto.start)
                    await asyncio.wait_for(ingest.connected.wait(), 20)
                assert await asyncio.to_thread(publisher.wait, 120) == 0
            finally:
                if publisher.poll() is None:
                    publisher.kill()
            assert publisher.stdout is not None
            report = json.loads(publisher.stdout.read())
            await until(lambda: buffer.stats().samples >= count, 60, f"{count} samples")
        stats = buffer.stats()
        seqs = stored_seqs(tmp_path / "buffer.db")
    assert seqs == list(range(count))
    assert stats.counters["inserted"] == count
    assert ingest.counters.reconnects >= 2
    assert ingest.counters.sessions_lost == 0  # the broker's persistence kept our session
    assert report["reconnects"] >= 2
    print(f"\nbroker restarted 2x: {count} stored once, {ingest.counters.duplicates} duplicates")


async def test_a_slow_writer_pauses_the_reader_and_drops_nothing(
    tmp_path: Path, broker: Callable[..., Mosquitto]
) -> None:
    count = 5000
    mosquitto = broker()
    with IngestBuffer.open(BufferSettings(tmp_path / "buffer.db")) as buffer:
        settings = ingest_settings(
            mosquitto.port, "slow-agent", queue_max=50, batch_max=10, batch_wait_s=0.0
        )
        ingest = MqttIngest(settings=settings, buffer=buffer)
        async with running(ingest):
            publisher = bench_module(
                "bench.ingest.publisher",
                "--port", str(mosquitto.port), "--topic", TOPIC, "--count", str(count),
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            assert await asyncio.to_thread(publisher.wait, 60) == 0
            await until(lambda: ingest.counters.acked >= count, 60, "every message acked")
        stats = buffer.stats()
    assert stats.samples == count
    assert ingest.counters.backpressure_waits > 0
    assert ingest.counters.queue_high_water <= 50
    assert ingest.counters.batches >= count // 10
    assert ingest.counters.duplicates == 0


def publish_all(port: int, messages: list[tuple[str, bytes]]) -> None:
    """Publish at QoS 1 and wait until the broker acknowledged every message."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{port}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


MALFORMED = {
    "not_json": b"this is not json",
    "wrong_type": b'{"ts": 1, "value": "high", "seq": 1}',
    "not_finite": b'{"ts": 1, "value": NaN, "seq": 2}',
    "too_large": json.dumps({"ts": 1, "value": 2, "seq": 3, "unit": "x" * 100_000}).encode(),
    "not_object": b"[1, 2, 3]",
    "missing_key": b'{"ts": 1, "value": 2}',
}


async def test_malformed_payloads_are_counted_acknowledged_and_not_redelivered(
    tmp_path: Path, broker: Callable[..., Mosquitto]
) -> None:
    mosquitto = broker()
    messages: list[tuple[str, bytes]] = []
    for seq, bad in enumerate(MALFORMED.values()):
        messages += [(TOPIC, json_payload(seq, 200)), ("plant/line1/XMEAS_2", bad)]
    messages.append((TOPIC, json_payload(len(MALFORMED), 200)))
    settings = ingest_settings(mosquitto.port, "malformed-agent")
    with IngestBuffer.open(BufferSettings(tmp_path / "buffer.db")) as buffer:
        ingest = MqttIngest(settings=settings, buffer=buffer)
        async with running(ingest):
            await asyncio.to_thread(publish_all, mosquitto.port, messages)
            await until(lambda: ingest.counters.acked >= len(messages), 20, "all acked")
        stats = buffer.stats()
        assert stats.samples == len(MALFORMED) + 1  # the stream went on around them
        assert {r: stats.counters.get(f"rejected_{r}") for r in MALFORMED} == dict.fromkeys(
            MALFORMED, 1
        )
        assert ingest.counters.malformed == dict.fromkeys(MALFORMED, 1)
        assert stats.last_rejected[0].source == "mqtt:plant/line1/XMEAS_2"

        # Same session again: nothing comes back (all were acknowledged), new data flows.
        again = MqttIngest(settings=settings, buffer=buffer)
        async with running(again):
            await asyncio.to_thread(publish_all, mosquitto.port, [(TOPIC, json_payload(99, 200))])
            await until(lambda: again.counters.acked >= 1, 20, "the new message")
            await asyncio.sleep(0.3)
        assert again.counters.received == 1
        assert again.counters.malformed == {}
        after = buffer.stats()
    assert after.samples == len(MALFORMED) + 2
    assert {r: after.counters.get(f"rejected_{r}") for r in MALFORMED} == dict.fromkeys(
        MALFORMED, 1
    )


async def test_sparkplug_b_over_the_broker(
    tmp_path: Path, broker: Callable[..., Mosquitto]
) -> None:
    mosquitto = broker()
    payload_class = sparkplug_payload_class()
    birth = payload_class(timestamp=1_700_000_000_000, seq=0)
    birth.metrics.add(name="bdSeq", datatype=DATA_TYPES["UInt64"], long_value=0)
    birth.metrics.add(name="Temp", alias=1, datatype=DATA_TYPES["Float"], float_value=20.5)
    data = payload_class(timestamp=1_700_000_001_000, seq=1)
    data.metrics.add(alias=1, float_value=21.0)
    settings = ingest_settings(
        mosquitto.port,
        "sparkplug-agent",
        subscriptions=(MqttSubscription("spBv1.0/plant/+/edge1/#", format="sparkplug", tag="E1."),),
    )
    with IngestBuffer.open(BufferSettings(tmp_path / "buffer.db")) as buffer:
        ingest = MqttIngest(settings=settings, buffer=buffer)
        async with running(ingest):
            await asyncio.to_thread(
                publish_all,
                mosquitto.port,
                [
                    ("spBv1.0/plant/NBIRTH/edge1", birth.SerializeToString()),
                    ("spBv1.0/plant/NDATA/edge1", data.SerializeToString()),
                    ("spBv1.0/plant/NDATA/edge1", b"\x12\xff"),
                ],
            )
            await until(lambda: ingest.counters.acked >= 3, 20, "3 messages")
        series = buffer.read_series(["E1.Temp"])
        stats = buffer.stats()
    assert series["E1.Temp"][1].tolist() == [20.5, 21.0]
    assert stats.counters["rejected_not_protobuf"] == 1
    assert list(stats.sources) == ["mqtt:spBv1.0/plant/edge1#Temp"]


async def test_a_message_above_the_maximum_packet_size_is_discarded_by_the_broker(
    tmp_path: Path, broker: Callable[..., Mosquitto]
) -> None:
    """The CONNECT announces max(1 MiB, max_payload_bytes + 64 KiB): Mosquitto drops a
    larger message for this client instead of sending what the agent would refuse anyway;
    the connection and the stream go on."""
    mosquitto = broker()
    settings = ingest_settings(mosquitto.port, "max-packet-agent", max_payload_bytes=1024)
    huge = json.dumps({"ts": 1, "value": 2, "seq": 3, "unit": "x" * (1 << 20)}).encode()
    with IngestBuffer.open(BufferSettings(tmp_path / "buffer.db")) as buffer:
        ingest = MqttIngest(settings=settings, buffer=buffer)
        async with running(ingest):
            await asyncio.to_thread(
                publish_all,
                mosquitto.port,
                [(TOPIC, json_payload(0, 200)), (TOPIC, huge), (TOPIC, json_payload(1, 200))],
            )
            await until(lambda: ingest.counters.acked >= 2, 20, "the two small messages")
            await asyncio.sleep(0.3)
        stats = buffer.stats()
    assert stats.samples == 2
    assert ingest.counters.received == 2
    assert ingest.counters.reconnects == 0
    assert ingest.counters.last_error is None


READ_SAMPLES = """
import sqlite3, sys
with sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True) as db:
    print(db.execute("SELECT count(*) FROM samples").fetchone()[0])
"""
OPEN_AND_CLOSE = """
import sys
from pathlib import Path
from fedgate_agent.ingest.buffer import BufferSettings, IngestBuffer
IngestBuffer.open(BufferSettings(Path(sys.argv[1]))).close()
"""


def samples_seen_by_another_process(path: Path) -> int:
    """What `fedgate-agent status`, the operator's sqlite3 shell or a backup would see."""
    done = subprocess.run(
        [sys.executable, "-c", READ_SAMPLES, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


def publish_bursts(port: int, topics: int, bursts: int, period_s: float) -> int:
    """``topics`` messages (one per topic) every ``period_s``, like the bridge polling a
    plant; returns how many the broker acknowledged (all, or it raises)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bursts-{port}")
    client.max_inflight_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = []
    started = time.monotonic()
    try:
        for burst in range(bursts):
            for topic in range(topics):
                payload = json_payload(burst, 120)
                infos.append(client.publish(f"plant/line1/T{topic}", payload, qos=1))
            time.sleep(max(0.0, started + (burst + 1) * period_s - time.monotonic()))
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return len(infos)


async def test_the_tail_of_a_burst_is_committed_and_visible_to_other_processes(
    tmp_path: Path, broker: Callable[..., Mosquitto]
) -> None:
    """Regression (tests/integration/test_live_site.py lost the last 2-3 readings of every
    topic): bursts of 53 messages every 50 ms, then silence. Within 2 s of the broker's last
    PUBACK to the publisher, every message is committed, and another process reading the
    file sees them all — also after a third process opened the buffer for writing and
    closed it mid-stream (`fedgate-agent windows` and `import` do), with the buffer open
    twice in the ingest's process as `fedgate-agent run` has it (status + writer)."""
    mosquitto = broker()
    path = tmp_path / "buffer.db"
    with (
        IngestBuffer.open(BufferSettings(path)) as status_view,
        IngestBuffer.open(BufferSettings(path)) as writer,
    ):
        ingest = MqttIngest(settings=ingest_settings(mosquitto.port, "tail-agent"), buffer=writer)
        async with running(ingest):
            publishing = asyncio.create_task(
                asyncio.to_thread(publish_bursts, mosquitto.port, 53, 20, 0.05)
            )
            await committed_more(ingest, 53 * 5)
            await asyncio.to_thread(
                subprocess.run, [sys.executable, "-c", OPEN_AND_CLOSE, str(path)], check=True
            )
            total = await publishing
            stopped = time.monotonic()
            await until(lambda: ingest.counters.committed >= total, 2, "every message committed")
            await until(lambda: ingest.counters.acked >= total, 1, "every message acknowledged")
            seen = await asyncio.to_thread(samples_seen_by_another_process, path)
            while seen < total and time.monotonic() - stopped < 2:
                await asyncio.sleep(0.1)
                seen = await asyncio.to_thread(samples_seen_by_another_process, path)
            assert status_view.stats().samples == total
            assert seen == total, f"another process sees {seen} of {total} committed samples"
    assert ingest.counters.duplicates == 0
