"""The MQTT ingest driver around the mqtt5 codec, without Mosquitto.

- what ``mqtt5.read`` raises (the driver maps it): IndexError while a packet is incomplete,
  ValueError when malformed, a pyo3 panic for a topic that is not UTF-8;
- the broker byte stream: whatever the chunking, every complete packet is parsed before the
  reader waits for more bytes; backpressure leaves the rest buffered;
- against a scripted broker on a loopback socket (it speaks MQTT 5 through mqtt5): what the
  agent sends (CONNECT, SUBSCRIBE, PUBACK only after the commit), and that every protocol
  violation drops the connection with an MqttProtocolError, then the ingest reconnects;
- topic filters and settings validate themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiomqtt
import mqtt5
import pytest
from fedgate_agent.errors import ConfigError
from fedgate_agent.ingest.buffer import BufferSettings, IngestBuffer
from fedgate_agent.ingest.errors import MqttProtocolError
from fedgate_agent.ingest.mqtt_source import (
    SPARKPLUG_BIRTHS_NAME,
    MqttIngest,
    MqttIngestSettings,
    MqttSubscription,
    _BrokerStream,
    topic_matches,
)
from fedgate_agent.ingest.sparkplug import DATA_TYPES, sparkplug_payload_class
from fedgate_common.backoff import Backoff
from fedgate_common.tasks import cancel_until_done
from hypothesis import given
from hypothesis import strategies as st

QOS1 = mqtt5.QoS.AT_LEAST_ONCE
#: A PUBLISH whose topic is not UTF-8 (mqtt5 cannot build one).
NOT_UTF8_TOPIC = bytes([0x30, 5, 0, 2, 0xFF, 0xFE, 0])
#: mqtt5 reports the UnicodeDecodeError behind its panic through sys.unraisablehook.
PANIC_NOISE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def publish(
    topic: str, payload: bytes, *, mid: int | None = 7, qos: mqtt5.QoS | None = None, **extra: Any
) -> bytes:
    if qos is None:
        qos = QOS1 if mid else mqtt5.QoS.AT_MOST_ONCE
    return mqtt5.PublishPacket(topic, payload, qos=qos, packet_id=mid, **extra).write()


def sample(seq: int) -> bytes:
    return b'{"ts": %d, "value": 1.5, "seq": %d}' % (1_700_000_000 + seq, seq)


# -- the codec's contract ------------------------------------------------------------------


def test_mqtt5_read_raises_index_error_until_a_packet_is_complete() -> None:
    packet = publish("plant/line1/XMEAS_1", b"x" * 300)
    for cut in range(len(packet)):
        with pytest.raises(IndexError):
            mqtt5.read(memoryview(packet[:cut]))
    parsed, size = mqtt5.read(memoryview(packet + b"\xd0\x00"))
    assert size == len(packet)
    assert isinstance(parsed, mqtt5.PublishPacket)
    assert (parsed.topic, parsed.packet_id) == ("plant/line1/XMEAS_1", 7)


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x02\x00\x00",  # packet type 0
        b"\x30\xff\xff\xff\xff\x01",  # remaining length of five bytes
        b"\x30\x03\x00\x00\x00",  # empty topic without an alias
        b"\xd1\x00",  # PINGRESP with flags
    ],
)
def test_mqtt5_read_raises_value_error_for_malformed_bytes(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the library gives no finer class
        mqtt5.read(memoryview(data))


@PANIC_NOISE
def test_mqtt5_read_panics_on_a_topic_that_is_not_utf8() -> None:
    """A BaseException the driver must catch by name (pyo3_runtime is not importable)."""
    with pytest.raises(BaseException) as caught:  # noqa: PT011
        mqtt5.read(memoryview(NOT_UTF8_TOPIC))
    assert type(caught.value).__name__ == "PanicException"
    assert not isinstance(caught.value, Exception)


# -- the broker byte stream ----------------------------------------------------------------

OWNER = cast(Any, "connection")


def read_all(stream: _BrokerStream, room: int = 1000) -> tuple[list[tuple[Any, ...]], list[Any]]:
    sink: list[tuple[Any, ...]] = []
    result = stream.read_into(sink, OWNER, room)
    assert result.error is None
    assert result.added == len(sink)
    return sink, result.controls


@given(
    messages=st.lists(
        st.tuples(
            st.text(
                st.characters(codec="utf-8", exclude_characters="+#\x00"),
                min_size=1,
                max_size=30,
            ),
            st.binary(max_size=3000),
            st.sampled_from([None, 1, 65535]),
        ),
        min_size=1,
        max_size=8,
    ),
    cuts=st.lists(st.integers(0, 30_000), max_size=12),
)
def test_every_complete_packet_is_parsed_whatever_the_chunking(
    messages: list[tuple[str, bytes, int | None]], cuts: list[int]
) -> None:
    """After each chunk, what stays buffered is never a whole packet: the tail of a burst is
    not left waiting for bytes that will only come with the next burst."""
    packets = [b"\xd0\x00"] + [publish(t, p, mid=m) for t, p, m in messages]
    stream_bytes = b"".join(packets)
    ends = [sum(map(len, packets[: i + 1])) for i in range(len(packets))]
    stream = _BrokerStream(source="mqtt://test", max_packet_bytes=1 << 20)
    got: list[tuple[Any, ...]] = []
    controls: list[Any] = []
    previous = 0
    for cut in [*sorted({c % (len(stream_bytes) + 1) for c in cuts}), len(stream_bytes)]:
        stream.feed(stream_bytes[previous:cut])
        previous = cut
        sink, found = read_all(stream)
        got += sink
        controls += found
        complete = sum(1 for end in ends if end <= cut)
        assert len(got) + len(controls) == complete
    assert [type(c) for c in controls] == [mqtt5.PingRespPacket]
    assert got == [(OWNER, t, p, 1 if m else 0, m or 0) for t, p, m in messages]
    assert stream.buffered == 0


def test_a_full_queue_leaves_packets_buffered_until_the_reader_resumes() -> None:
    stream = _BrokerStream(source="mqtt://test", max_packet_bytes=1 << 20)
    stream.feed(b"".join(publish("t", b"%d" % n, mid=n + 1) for n in range(5)))
    first, _ = read_all(stream, room=2)
    assert [m[2] for m in first] == [b"0", b"1"]
    assert stream.buffered > 0
    stream.feed(publish("t", b"5", mid=6))
    rest, _ = read_all(stream)
    assert [m[2] for m in rest] == [b"2", b"3", b"4", b"5"]
    assert stream.buffered == 0


def test_only_the_head_of_a_payload_above_the_limit_is_queued() -> None:
    """A payload over ``max_payload_bytes`` (but within the packet size, up to 1 MiB) is
    refused later; queueing it whole let a stalled writer's queue fill memory."""
    stream = _BrokerStream(source="mqtt://test", max_packet_bytes=1 << 20, max_payload_bytes=100)
    stream.feed(publish("t", b"x" * 500_000, mid=1) + publish("t", b"y" * 100, mid=2))
    (big, small), _ = read_all(stream)
    assert len(big[2]) <= 256
    assert big[2].size == 500_000
    assert small[2] == b"y" * 100  # within the limit: as it came


async def test_payloads_above_the_limit_are_refused_with_their_size(tmp_path: Path) -> None:
    messages = [publish("plant/line1/XMEAS_1", b"{" + b" " * 300_000, mid=1)]
    messages.append(publish("plant/line1/XMEAS_1", sample(2), mid=2))
    acked: list[int] = []

    async def script(side: BrokerSide) -> None:
        await side.handshake()
        side.send(b"".join(messages))
        acked.extend(await side.pubacks(len(messages)))

    async with scripted_broker(script) as (port, _), ingesting(tmp_path, port) as ingest:
        await until(lambda: len(acked) == 2, "both acknowledged")
        assert ingest.counters.malformed == {"too_large": 1}
        assert ingest.buffer.stats().samples == 1
    with sqlite3.connect(tmp_path / "buffer.db") as db:
        assert db.execute("SELECT reason, payload_bytes FROM rejected").fetchall() == [
            ("too_large", 300_001)
        ]


@PANIC_NOISE
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x02\x00\x00", "Invalid PacketType"),
        (publish("t", b"x", qos=mqtt5.QoS.EXACTLY_ONCE), "QoS 2"),
        (bytes([0x32, 6, 0, 1, ord("t"), 0, 0, 0]), "packet id 0"),
        (publish("t", b"x", topic_alias=3), "topic alias"),
        (NOT_UTF8_TOPIC, "undecodable"),
        (publish("t", b"x" * 5000)[:3000], "Maximum Packet Size"),
    ],
    ids=["malformed", "qos2", "packet-id-0", "topic-alias", "not-utf8", "too-large"],
)
def test_what_a_subscriber_never_accepts_is_a_protocol_error(data: bytes, message: str) -> None:
    stream = _BrokerStream(source="mqtt://broker:1883", max_packet_bytes=2000)
    stream.feed(publish("ok", b"1") + data)
    sink: list[tuple[Any, ...]] = []
    result = stream.read_into(sink, OWNER, 100)
    assert [m[1] for m in sink] == ["ok"]  # what came before is kept
    assert isinstance(result.error, MqttProtocolError)
    assert message in str(result.error)
    assert result.error.source == "mqtt://broker:1883"


# -- a scripted broker on a loopback socket ------------------------------------------------

Script = Callable[["BrokerSide"], Awaitable[None]]


@dataclass
class BrokerSide:
    """One connection as the scripted broker sees it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: list[mqtt5.Packet] = field(default_factory=list)
    _buf: bytearray = field(default_factory=bytearray)

    async def next_packet(self) -> mqtt5.Packet:
        while True:
            try:
                packet, size = mqtt5.read(memoryview(bytes(self._buf)))
            except IndexError:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("the agent closed the connection") from None
                self._buf += data
                continue
            del self._buf[:size]
            self.received.append(packet)
            return packet

    async def handshake(self, *, session_present: bool = False) -> None:
        assert isinstance(await self.next_packet(), mqtt5.ConnectPacket)
        self.send(mqtt5.ConnAckPacket(session_present=session_present).write())
        subscribe = await self.next_packet()
        assert isinstance(subscribe, mqtt5.SubscribePacket)
        granted = [mqtt5.SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE] * len(subscribe.topic_filters)
        self.send(mqtt5.SubAckPacket(subscribe.packet_id, granted).write())

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def pubacks(self, count: int) -> list[int]:
        mids: list[int] = []
        while len(mids) < count:
            packet = await self.next_packet()
            if isinstance(packet, mqtt5.PubAckPacket):
                mids.append(packet.packet_id)
        return mids


@contextlib.asynccontextmanager
async def scripted_broker(*scripts: Script) -> AsyncIterator[tuple[int, list[BrokerSide]]]:
    """Connection n runs ``scripts[n]`` (the last one repeats), then waits for the agent."""
    sides: list[BrokerSide] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        side = BrokerSide(reader, writer)
        sides.append(side)
        script = scripts[min(len(sides), len(scripts)) - 1]
        with contextlib.suppress(ConnectionError):
            await script(side)
            while True:
                await side.next_packet()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, sides
    finally:
        server.close()
        for side in sides:
            side.writer.close()
        await server.wait_closed()


def settings(port: int, **overrides: Any) -> MqttIngestSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "client_id": "unit-agent",
        "subscriptions": (MqttSubscription("plant/+/+"),),
        "backoff": Backoff(initial_s=0.01, max_s=0.05),
        "keepalive_s": 20,
        "batch_wait_s": 0.005,
    }
    values.update(overrides)
    return MqttIngestSettings(**values)


@contextlib.asynccontextmanager
async def ingesting(tmp_path: Path, port: int, **overrides: Any) -> AsyncIterator[MqttIngest]:
    with IngestBuffer.open(BufferSettings(tmp_path / "buffer.db")) as buffer:
        ingest = MqttIngest(settings=settings(port, **overrides), buffer=buffer)
        task = asyncio.create_task(ingest.run())
        try:
            yield ingest
            assert not task.done(), "the ingest stopped on its own"
        finally:
            await cancel_until_done([task])


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_the_agent_speaks_mqtt5_and_acks_only_committed_messages(tmp_path: Path) -> None:
    acked: list[int] = []
    burst = [publish(f"plant/line1/T{n}", sample(n), mid=100 + n) for n in range(53)]

    async def script(side: BrokerSide) -> None:
        await side.handshake()
        side.send(b"".join(burst) + publish("plant/line1/Q0", sample(99), mid=None))
        acked.extend(await side.pubacks(len(burst)))

    async with scripted_broker(script) as (port, sides), ingesting(tmp_path, port) as ingest:
        await until(lambda: len(acked) == len(burst), "53 PUBACKs")
        assert ingest.counters.committed >= len(burst)  # committed, then acknowledged
        await until(lambda: ingest.counters.committed == len(burst) + 1, "the QoS 0 message")
        assert ingest.buffer.stats().samples == len(burst) + 1
        assert ingest.counters.acked == len(burst)  # nothing to acknowledge at QoS 0
    assert sorted(acked) == [100 + n for n in range(53)]
    connect, subscribe = sides[0].received[:2]
    assert isinstance(connect, mqtt5.ConnectPacket)
    assert connect.client_id == "unit-agent"
    assert connect.clean_start is False  # resume the session: redeliveries after a crash
    assert connect.session_expiry_interval == 7 * 24 * 3600
    assert connect.receive_max == 65535
    assert connect.max_packet_size == 1 << 20
    assert connect.keep_alive == 20
    assert isinstance(subscribe, mqtt5.SubscribePacket)
    (topic_filter,) = subscribe.topic_filters
    assert topic_filter.pattern == "plant/+/+"
    assert topic_filter.max_qos == QOS1
    assert topic_filter.retain_handling == mqtt5.RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS


async def test_the_last_burst_is_committed_without_waiting_for_more(tmp_path: Path) -> None:
    """A burst, then silence: everything is committed and acknowledged within the batch wait,
    not when (if ever) the next burst arrives."""
    done = asyncio.Event()

    async def script(side: BrokerSide) -> None:
        await side.handshake()
        for burst in range(5):
            side.send(
                b"".join(
                    publish(f"plant/a/T{n}", sample(burst), mid=1 + burst * 53 + n)
                    for n in range(53)
                )
            )
            await asyncio.sleep(0.05)
        await side.pubacks(5 * 53)
        done.set()

    async with (
        scripted_broker(script) as (port, _),
        ingesting(tmp_path, port, batch_wait_s=0.02) as ingest,
    ):
        await asyncio.wait_for(done.wait(), 2.0)
        assert ingest.counters.committed == ingest.counters.acked == 5 * 53
        assert ingest.counters.queue_depth == 0


BAD_PACKETS = {
    "malformed": (b"\x00\x02\x00\x00", "malformed MQTT"),
    "qos2": (publish("plant/a/b", sample(1), qos=mqtt5.QoS.EXACTLY_ONCE), "QoS 2"),
    "topic-alias": (publish("plant/a/b", sample(1), topic_alias=1), "topic alias"),
    "not-utf8-topic": (NOT_UTF8_TOPIC, "undecodable"),
    "puback": (mqtt5.PubAckPacket(5).write(), "unexpected PubAckPacket"),
    "disconnect": (
        mqtt5.DisconnectPacket(
            reason_code=mqtt5.DisconnectReasonCode.SESSION_TAKEN_OVER, reason_str="moved"
        ).write(),
        "SESSION_TAKEN_OVER: moved",
    ),
}


@PANIC_NOISE
@pytest.mark.parametrize("case", list(BAD_PACKETS))
async def test_a_protocol_violation_drops_the_connection_and_the_ingest_reconnects(
    tmp_path: Path, case: str
) -> None:
    bad, message = BAD_PACKETS[case]
    acked: list[int] = []

    async def first(side: BrokerSide) -> None:
        await side.handshake()
        side.send(bad)

    async def second(side: BrokerSide) -> None:
        await side.handshake(session_present=True)
        side.send(publish("plant/line1/XMEAS_1", sample(1), mid=9))
        acked.extend(await side.pubacks(1))

    async with scripted_broker(first, second) as (port, sides), ingesting(tmp_path, port) as ingest:
        await until(lambda: acked == [9], "the message of the second connection")
        assert len(sides) == 2
        assert ingest.counters.reconnects == 1
        assert ingest.counters.sessions_lost == 0
        assert ingest.counters.last_error is not None
        assert "MqttProtocolError" in ingest.counters.last_error
        assert message in ingest.counters.last_error
        assert ingest.buffer.stats().samples == 1


async def test_tags_with_control_characters_are_refused_and_counted_the_rest_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tag taken from a topic level, or a Sparkplug metric name, with a control character
    is a ``bad_tag`` rejection (acknowledged, not redelivered); the other messages, and the
    other metrics of the same Sparkplug message, are stored."""
    metrics = sparkplug_payload_class()()
    metrics.timestamp = 1_700_000_000_000
    metrics.metrics.add(name="Pump/Speed", double_value=2.5)
    metrics.metrics.add(name="Pump\x1b[2J", double_value=3.5)
    messages = [
        publish("plant/line1/XMEAS_1", sample(1), mid=1),
        publish("plant/line1/XMEAS\x00", sample(2), mid=2),
        publish("plant/line1/X\nMEAS_2", sample(3), mid=3),
        publish("plant/line1/\x1b[31mXMEAS_3", sample(4), mid=4),
        publish("spBv1.0/g/NDATA/edge1", metrics.SerializeToString(), mid=5),
        publish("plant/line1/XMEAS_4", sample(6), mid=6),
    ]
    acked: list[int] = []

    async def script(side: BrokerSide) -> None:
        await side.handshake()
        side.send(b"".join(messages))
        acked.extend(await side.pubacks(len(messages)))

    subscriptions = (
        MqttSubscription("plant/+/+"),
        MqttSubscription("spBv1.0/g/#", format="sparkplug"),
    )
    async with (
        scripted_broker(script) as (port, _),
        ingesting(tmp_path, port, subscriptions=subscriptions) as ingest,
    ):
        await until(lambda: len(acked) == len(messages), "every message acknowledged")
        assert ingest.counters.malformed == {"bad_tag": 4}
        assert ingest.buffer.tags() == ["Pump/Speed", "XMEAS_1", "XMEAS_4"]
        assert ingest.buffer.stats().counters["rejected_bad_tag"] == 4
    logged = [r for r in caplog.records if r.getMessage() == "MQTT payload refused"]
    assert len(logged) == 1  # four refusals of one reason: one line, then one a minute
    assert logged[0].__dict__["fields"]["reason"] == "bad_tag"


async def test_sparkplug_births_are_remembered_across_a_restart_of_the_agent(
    tmp_path: Path,
) -> None:
    """Through the machine's Mosquitto: the NBIRTH reaches the agent, the agent restarts,
    then alias-only data without data types comes. The restarted agent used to store an
    Int32 of -1 as 4294967295 under ``alias:2``."""
    group = f"g{secrets.token_hex(4)}"
    subscriptions = (MqttSubscription(f"spBv1.0/{group}/#", format="sparkplug"),)
    birth = sparkplug_payload_class()()
    birth.timestamp = 1_700_000_000_000
    birth.metrics.add(name="Valve/Pos", alias=2, datatype=DATA_TYPES["Int32"], int_value=7)
    data = sparkplug_payload_class()()
    data.timestamp = 1_700_000_001_000
    data.metrics.add(alias=2, int_value=0xFFFFFFFF)
    async with aiomqtt.Client("127.0.0.1", 1883) as plant:
        for message_type, payload in (("NBIRTH", birth), ("NDATA", data)):
            async with ingesting(
                tmp_path, 1883, subscriptions=subscriptions, client_id=f"agent-{group}"
            ) as ingest:
                await until(lambda: ingest.connected.is_set(), "subscribed")
                await plant.publish(
                    f"spBv1.0/{group}/{message_type}/edge1", payload.SerializeToString(), qos=1
                )
                await until(lambda: ingest.counters.committed == 1, f"{message_type} stored")
                assert ingest.counters.malformed == {}
    assert (tmp_path / SPARKPLUG_BIRTHS_NAME).exists()
    with IngestBuffer.open(BufferSettings(tmp_path / "buffer.db")) as buffer:
        assert buffer.tags() == ["Valve/Pos"]
        _, values = buffer.read_series(["Valve/Pos"])["Valve/Pos"]
    assert values.tolist() == [7.0, -1.0]


async def test_a_refused_connection_is_retried(tmp_path: Path) -> None:
    async def refuse(side: BrokerSide) -> None:
        await side.next_packet()
        side.send(mqtt5.ConnAckPacket(reason_code=mqtt5.ConnAckReasonCode.NOT_AUTHORIZED).write())

    async with scripted_broker(refuse) as (port, sides), ingesting(tmp_path, port) as ingest:
        await until(lambda: len(sides) >= 3, "three attempts")
        assert ingest.counters.last_error is not None
        assert "0x87 NOT_AUTHORIZED" in ingest.counters.last_error
        assert not ingest.connected.is_set()


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("plant/+/XMEAS_1", "plant/line1/XMEAS_1", True),
        ("plant/+/XMEAS_1", "plant/line1/XMEAS_2", False),
        ("plant/#", "plant", True),
        ("plant/#", "plant/a/b/c", True),
        ("plant/+", "plant/a/b", False),
        ("plant/+", "plant", False),
        ("#", "$SYS/broker/uptime", False),
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("$share/agents/plant/+", "plant/a", True),
        ("a/b", "a/b", True),
        ("a/b", "a/b/", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


@pytest.mark.parametrize("topic_filter", ["", "a/#/b", "a/b#", "a+/b", "a/+b", "a" * 70_000])
def test_invalid_topic_filters_are_configuration_errors(topic_filter: str) -> None:
    with pytest.raises(ConfigError, match="topic filter"):
        MqttSubscription(topic_filter)


def test_valid_topic_filters() -> None:
    for topic_filter in ("#", "+", "a/+/c", "a/b/#", "$share/g/a/+"):
        assert MqttSubscription(topic_filter).topic_filter == topic_filter
    with pytest.raises(ConfigError, match="format"):
        MqttSubscription("a", format="xml")


def test_a_subscriptions_tag_is_a_usable_tag_name() -> None:
    for tag in ("X\x00", "X\n", "\x1b[2J", "line/3"):
        with pytest.raises(ConfigError, match=re.escape(f"tag {tag!r}")):
            MqttSubscription("plant/+", tag=tag)
    assert MqttSubscription("spBv1.0/g/#", format="sparkplug", tag="line3/").tag == "line3/"
    with pytest.raises(ConfigError, match="control character U\\+0007"):
        MqttSubscription("spBv1.0/g/#", format="sparkplug", tag="\x07")


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"client_id": ""}, "client_id"),
        ({"client_id": "a" * 70_000}, "CONNECT cannot be built"),
        ({"keepalive_s": 70_000}, "keepalive_s"),
        ({"receive_maximum": 0}, "receive_maximum"),
        ({"session_expiry_s": 2**32}, "session_expiry_s"),
        ({"subscriptions": ()}, "subscription"),
    ],
)
def test_settings_validate_themselves(overrides: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        settings(1883, **overrides)


def test_the_maximum_packet_size_leaves_room_for_the_largest_accepted_payload() -> None:
    assert settings(1883).max_packet_bytes == 1 << 20
    assert settings(1883, max_payload_bytes=4 << 20).max_packet_bytes == (4 << 20) + 0x10000
