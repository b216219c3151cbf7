"""MQTT ingestion: a QoS 1 message is acknowledged only after the batch holding it is committed.

Pipeline::

    broker ──TCP──▶ event loop: mqtt5.read ──▶ bounded inbound queue ──▶ writer thread
        ▲                                                                   │ decode batch
        └──────────── PUBACKs of the whole batch, one write ◀── commit (fsync) ┘

- The session is persistent (stable ``client_id``, clean start off, session expiry
  ``session_expiry_s``): messages the agent has not acknowledged — in its queue, in the
  batch being committed, or sent while it was down — are redelivered by the broker on the
  next connection, and ``UNIQUE(source, seq)`` in the buffer turns redeliveries of committed
  ones into counted duplicates. Hence kill -9 at any moment: nothing lost, nothing twice.
- An acknowledgement goes out on the connection that delivered the message and only while
  that connection is open. A later connection gets the message again (same session), so
  an ack never lands on a packet id the broker has meanwhile given to another message.
- Malformed payloads are recorded (``rejected_<reason>``) in the same transaction as the
  batch's samples and then acknowledged: refused once, never redelivered forever.
  Samples refused by a full ``reject_new`` buffer are counted and acknowledged likewise.
- Backpressure: when ``queue_max`` messages wait for the writer the reader stops reading
  the socket (the broker holds the rest) until the queue is half empty; each stop counts as
  a ``backpressure_waits``. Nothing is dropped by the agent.
- Group commit: the writer takes up to ``batch_max`` messages, waiting at most
  ``batch_wait_s`` for a batch to fill, so one fsync covers many messages; whatever is
  queued when that wait ends is committed, so the tail of a burst is never left waiting for
  the next one.

MQTT 5 only. Packets are written and parsed by the `mqtt5`_ library (a sans-IO MQTT 5 codec
written in Rust, by the maintainer of aiomqtt); this module is the driver around it: the
socket, the session, batching, backpressure and when acknowledgements go out. The brokers
the agent targets (Mosquitto 2 and later) speak MQTT 5; MQTT 3.1.1 is not offered.
Why not a whole client such as paho-mqtt: with ``manual_ack=True`` it costs about 150 µs of
CPU per message (about 6,600 msg/s on one core before any decoding or storage;
bench/ingest/README.md), and the ack-after-commit needs the packet ids in our hands anyway.

What the broker sends is checked at the edge. ``mqtt5.read`` raises ``IndexError`` while a
packet is incomplete (we wait for more bytes) and ``ValueError`` for malformed bytes; a topic
that is not valid UTF-8 makes it panic (``pyo3_runtime.PanicException``, a BaseException).
Malformed bytes, a packet larger than the Maximum Packet Size we announced, a QoS 2 PUBLISH
(we subscribe at QoS 1), a topic alias (we allow none), a QoS 1 PUBLISH with packet id 0 and
any packet a subscriber never receives all become :class:`MqttProtocolError`: the connection
is dropped and the broker redelivers on the next one. Mosquitto validates topics and packets
on the publishing side, so against it none of these happen.

Messages larger than the Maximum Packet Size (``max(1 MiB, max_payload_bytes + 64 KiB)``) are
discarded by the broker (MQTT 5 §3.1.2.11.4; Mosquitto logs "Dropping too large outgoing
PUBLISH") and never reach the agent; smaller payloads above ``max_payload_bytes`` are
refused and counted as ``too_large``.

Broker settings a deployment needs (Mosquitto 2.0 names; measured with
``bench.ingest.run --broker-settings``, 20,000 messages of 1 KB, see bench/ingest/README.md):

- ``max_queued_messages 0`` (or more than the longest outage × message rate; leave
  ``max_queued_bytes`` unset). With Mosquitto's default of 1,000, a backlog published
  while the agent was down arrived as 1,000 of 20,000 messages — the rest silently dropped
  by the broker;
- ``max_inflight_messages 0``: the agent's Receive Maximum (``receive_maximum``, 65,535)
  bounds what is in flight while it is connected, so a burst arrives whole even with the
  broker's defaults (20,000 of 20,000), but a backlog queued while it was offline drained
  at 31,000–41,000 msg/s with the default 20 against 56,000–58,000 with 0;
- ``persistence true`` if the broker itself may restart while holding queued messages
  (tests/integration/test_ingest_mqtt.py restarts it mid-stream).

.. _mqtt5: https://github.com/empicano/mqtt5
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple, Protocol, cast

import mqtt5
from fedgate_common.atomic_files import atomic_write
from fedgate_common.backoff import Backoff
from fedgate_common.logs import log_event

from fedgate_agent.errors import ConfigError
from fedgate_agent.ingest.buffer import (
    REJECTED_PAYLOAD_BYTES,
    IngestBuffer,
    RejectedPayload,
    SampleRow,
)
from fedgate_agent.ingest.errors import IngestError, MalformedPayload, MqttProtocolError
from fedgate_agent.ingest.payloads import decode_json_row
from fedgate_agent.ingest.samples import tag_problem
from fedgate_agent.ingest.sparkplug import SparkplugAliases, decode_sparkplug_samples

__all__ = [
    "FORMATS",
    "IngestCounters",
    "MqttIngest",
    "MqttIngestSettings",
    "MqttSubscription",
    "topic_matches",
]

log = logging.getLogger("fedgate.agent.ingest.mqtt")

FORMATS = ("json", "sparkplug")
#: Beside the buffer: the Sparkplug names and data types births taught, for after a restart.
SPARKPLUG_BIRTHS_NAME: Final = "sparkplug-births.json"
_MAX_TRACKED_TOPICS = 10_000
_SUBSCRIBE_PACKET_ID = 1
_WRITE_RETRY = Backoff(initial_s=0.1, max_s=5.0)
_REFUSAL_LOG_EVERY_S = 60.0
_RECONNECT = Backoff(initial_s=0.2, max_s=10.0)
_COMPACT_AT = 1 << 16
_AT_MOST_ONCE = mqtt5.QoS.AT_MOST_ONCE
_AT_LEAST_ONCE = mqtt5.QoS.AT_LEAST_ONCE
_PINGREQ = mqtt5.PingReqPacket().write()
#: Normal disconnection: the broker keeps the session (and queues for it) for its expiry.
_DISCONNECT = mqtt5.DisconnectPacket().write()


def _topic_filter(pattern: str) -> mqtt5.TopicFilter:
    """A QoS 1 subscription that asks for retained messages only when it is new, so that
    resubscribing on every reconnect does not replay them."""
    return mqtt5.TopicFilter(
        pattern,
        max_qos=mqtt5.QoS.AT_LEAST_ONCE,
        retain_as_published=False,
        retain_handling=mqtt5.RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS,
    )


@dataclass(frozen=True)
class MqttSubscription:
    """One topic filter and how its messages become samples.

    ``format``: ``"json"`` (:mod:`.payloads`) or ``"sparkplug"`` (:mod:`.sparkplug`).
    JSON tag: ``tag`` when set, else the topic level ``tag_level`` (0-based, negative counts
    from the end: ``plant/line1/XMEAS_1`` with -1 → ``XMEAS_1``). Sparkplug: ``tag`` is the
    prefix put before every metric name.
    """

    topic_filter: str
    format: str = "json"
    tag: str = ""
    tag_level: int = -1

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(
                f"MQTT subscription {self.topic_filter!r}: format must be one of "
                f"{', '.join(FORMATS)}, not {self.format!r}"
            )
        problem = "" if self.topic_filter else "it is empty"
        if not problem:
            try:
                _topic_filter(self.topic_filter)
            except ValueError as exc:
                problem = str(exc)
        if problem:
            raise ConfigError(
                f"{self.topic_filter!r} is not an MQTT topic filter ({problem}): '+' must be "
                "a whole level, '#' the whole last level, at most 65,535 bytes"
            )
        if self.tag and (why := tag_problem(self.tag, slash=self.format == "sparkplug")):
            raise ConfigError(f"MQTT subscription {self.topic_filter!r}: tag {self.tag!r} {why}")


@dataclass(frozen=True)
class MqttIngestSettings:
    """Where to connect and how to batch (MQTT 5; see the module docstring)."""

    host: str
    port: int
    client_id: str
    subscriptions: tuple[MqttSubscription, ...]
    keepalive_s: int = 30
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None  # None: plain TCP
    batch_max: int = 2000
    batch_wait_s: float = 0.02
    queue_max: int = 20000
    max_payload_bytes: int = 65536
    session_expiry_s: int = 7 * 24 * 3600
    receive_maximum: int = 65535
    connect_timeout_s: float = 10.0
    backoff: Backoff = _RECONNECT

    def __post_init__(self) -> None:
        problems = []
        if not self.client_id:
            problems.append("set a stable MQTT client_id (the broker keeps the session by it)")
        if not self.subscriptions:
            problems.append("give at least one MQTT subscription")
        if self.batch_max < 1 or self.queue_max < 1:
            problems.append("batch_max and queue_max must be at least 1")
        if not 1 <= self.receive_maximum <= 0xFFFF:
            problems.append("receive_maximum must be 1..65535")
        if not 0 <= self.keepalive_s <= 0xFFFF:
            problems.append("keepalive_s must be 0..65535")
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            problems.append("session_expiry_s must be 0..4294967295")
        if not problems:
            try:
                self.connect_packet()
            except (ValueError, OverflowError) as exc:
                problems.append(f"the MQTT CONNECT cannot be built from these settings: {exc}")
        if problems:
            raise ConfigError(problems[0], problems=problems)

    @property
    def max_packet_bytes(self) -> int:
        """The Maximum Packet Size announced to the broker: room for a payload of
        ``max_payload_bytes`` (refused as ``too_large`` when larger) plus headers."""
        return max(1 << 20, self.max_payload_bytes + 0x10000)

    def connect_packet(self) -> bytes:
        """CONNECT resuming the session named by ``client_id`` (clean start off)."""
        return mqtt5.ConnectPacket(
            self.client_id,
            username=self.username,
            password=None if self.password is None else self.password.encode(),
            clean_start=False,
            keep_alive=self.keepalive_s,
            session_expiry_interval=self.session_expiry_s,
            receive_max=self.receive_maximum,
            max_packet_size=self.max_packet_bytes,
        ).write()

    def subscribe_packet(self) -> bytes:
        """SUBSCRIBE to every filter at QoS 1."""
        filters = [_topic_filter(s.topic_filter) for s in self.subscriptions]
        return mqtt5.SubscribePacket(_SUBSCRIBE_PACKET_ID, filters).write()


@dataclass
class IngestCounters:
    """Live counters of one :class:`MqttIngest` (since it was created).

    ``received``: messages read from the broker; ``committed``: messages whose batch was
    committed (stored, duplicate or refused), their acknowledgements then queued; ``acked``:
    acknowledgements written to a live connection; ``inserted``/``duplicates``/
    ``rejected_full``/``dropped_oldest``: samples, as the buffer counted them;
    ``malformed``: refused payloads by reason; ``received_by_topic``: messages per topic as
    the writer takes them (the first 10,000 topics); ``queue_depth``/``queue_high_water``:
    the inbound queue now and at its fullest; ``sessions_lost``: reconnections on which the
    broker no longer had our session (what it held for us is gone).
    """

    received: int = 0
    committed: int = 0
    acked: int = 0
    inserted: int = 0
    duplicates: int = 0
    rejected_full: int = 0
    dropped_oldest: int = 0
    batches: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    backpressure_waits: int = 0
    reconnects: int = 0
    sessions_lost: int = 0
    write_failures: int = 0
    queue_depth: int = 0
    queue_high_water: int = 0
    connected: bool = False
    last_error: str | None = None
    received_by_topic: dict[str, int] = field(default_factory=dict)

    def received_by_source(self) -> dict[str, int]:
        return {"mqtt:" + topic: n for topic, n in list(self.received_by_topic.items())}

    def snapshot(self) -> dict[str, object]:
        """A plain dict for status output and logs."""
        return {
            "received": self.received,
            "committed": self.committed,
            "acked": self.acked,
            "inserted": self.inserted,
            "duplicates": self.duplicates,
            "rejected_full": self.rejected_full,
            "dropped_oldest": self.dropped_oldest,
            "batches": self.batches,
            "malformed": dict(self.malformed),
            "backpressure_waits": self.backpressure_waits,
            "reconnects": self.reconnects,
            "sessions_lost": self.sessions_lost,
            "write_failures": self.write_failures,
            "queue_depth": self.queue_depth,
            "queue_high_water": self.queue_high_water,
            "connected": self.connected,
            "last_error": self.last_error,
            "received_by_source": self.received_by_source(),
        }


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching: ``+`` one level, ``#`` the rest (parent included); wildcards at
    the first level do not match ``$``-topics; ``$share/<group>/`` prefixes are ignored."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


@dataclass(frozen=True, slots=True)
class _Route:
    """What to do with messages on one topic (resolved once per topic, then cached)."""

    topic: str
    source: str
    format: str
    tag: str
    refusal: str | None = None


class _TopicRouter:
    def __init__(self, subscriptions: Sequence[MqttSubscription]) -> None:
        self._subscriptions = tuple(subscriptions)
        self._routes: dict[str, _Route] = {}

    def route(self, topic: str) -> _Route:
        route = self._routes.get(topic)
        if route is None:
            if len(self._routes) >= _MAX_TRACKED_TOPICS:
                self._routes.clear()
            route = self._routes[topic] = self._resolve(topic)
        return route

    def _resolve(self, topic: str) -> _Route:
        source = "mqtt:" + topic
        for subscription in self._subscriptions:
            if not topic_matches(subscription.topic_filter, topic):
                continue
            if subscription.format == "sparkplug" or subscription.tag:
                return _Route(topic, source, subscription.format, subscription.tag)
            levels = topic.split("/")
            try:
                tag = levels[subscription.tag_level]
            except IndexError:
                tag = ""
            if not tag:
                return _Route(topic, source, subscription.format, "", refusal="no_tag")
            if tag_problem(tag) is not None:  # a control character (a level has no '/')
                return _Route(topic, source, subscription.format, "", refusal="bad_tag")
            return _Route(topic, source, subscription.format, tag)
        # A subscription left in the broker's session by an earlier configuration.
        return _Route(topic, source, "json", "", refusal="unsubscribed_topic")


#: ``(connection, topic, payload, qos, packet id)``: one message waiting for the writer
#: (``packet id`` is 0 for QoS 0). A plain tuple: one object per message on the hot path.
_Inbound = tuple["_BrokerConnection", str, bytes, int, int]


class _Oversize(bytes):
    """The first bytes of a payload above ``max_payload_bytes``, queued in its place (for
    the ``rejected`` table); ``size`` is the whole payload's."""

    size: int

    @classmethod
    def of(cls, payload: bytes) -> _Oversize:
        head = cls(payload[:REJECTED_PAYLOAD_BYTES])
        head.size = len(payload)
        return head


class _InboundSink(Protocol):
    def append(self, item: _Inbound, /) -> None: ...


class _ReadResult(NamedTuple):
    added: int
    controls: list[mqtt5.Packet]
    error: MqttProtocolError | None


def _is_rust_panic(exc: BaseException) -> bool:
    """mqtt5 (pyo3) raises ``pyo3_runtime.PanicException`` — a BaseException that cannot be
    imported by name — for some undecodable input (a topic that is not UTF-8)."""
    return type(exc).__name__ == "PanicException"


class _BrokerStream:
    """The broker → agent byte stream, cut into packets by :func:`mqtt5.read`.

    :meth:`feed` appends what the socket gave; :meth:`read_into` parses complete packets
    until the bytes run out or the caller's room is used up. Unread bytes stay buffered
    (:attr:`buffered`), so the reader can stop for backpressure and resume later.
    """

    def __init__(
        self, *, source: str, max_packet_bytes: int, max_payload_bytes: int | None = None
    ) -> None:
        self._source = source
        self._max_packet = max_packet_bytes
        self._max_payload = max_payload_bytes
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= _COMPACT_AT and self._pos * 2 >= len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def read_into(self, sink: _InboundSink, owner: _BrokerConnection, room: int) -> _ReadResult:
        """Append up to ``room`` PUBLISH packets to ``sink`` as ``(owner, topic, payload,
        qos, packet id)``; return how many, the other packets met on the way, and the
        protocol error that stopped the reading, if any.

        Every complete packet in the buffer is parsed before this returns (unless ``room``
        ran out): a packet is never left waiting for bytes that belong to the next one.
        """
        controls: list[mqtt5.Packet] = []
        buf = self._buf
        pos = self._pos
        end = len(buf)
        added = 0
        error: MqttProtocolError | None = None
        read = mqtt5.read
        append = sink.append
        view = memoryview(buf)
        try:
            while pos < end and added < room:
                rest = view[pos:]
                try:
                    packet, size = read(rest)
                except IndexError:  # incomplete: wait for more bytes
                    if end - pos > self._max_packet:
                        error = self._error(
                            f"a packet of more than {self._max_packet} bytes (the Maximum "
                            "Packet Size we announced)"
                        )
                    break
                except ValueError as exc:
                    error = self._error(str(exc))
                    break
                except BaseException as exc:
                    if not _is_rust_panic(exc):
                        raise
                    error = self._error(f"undecodable packet ({exc})")
                    break
                finally:
                    rest.release()
                pos += size
                if isinstance(packet, mqtt5.PublishPacket):
                    # (mqtt5.QoS is not an int: QoS 0 is truthy and `>` is not defined)
                    if packet.qos == _AT_LEAST_ONCE:
                        qos = 1
                        mid = packet.packet_id or 0
                    elif packet.qos == _AT_MOST_ONCE:
                        qos = mid = 0
                    else:
                        qos, mid = int(packet.qos), -1
                    if mid < 0 or (qos and not mid):
                        error = self._error(
                            f"PUBLISH with QoS {qos} and packet id {packet.packet_id} "
                            "(subscribed at QoS 1)"
                        )
                        break
                    if packet.topic_alias is not None:
                        error = self._error("PUBLISH with a topic alias (none were allowed)")
                        break
                    payload = packet.payload
                    if self._max_payload is not None and len(payload) > self._max_payload:
                        # Queued whole, payloads up to the packet size (1 MiB) could fill
                        # memory while the writer waits: only the head goes on, to be refused.
                        payload = _Oversize.of(payload)
                    append((owner, packet.topic, payload, qos, mid))
                    added += 1
                else:
                    controls.append(packet)
        finally:
            view.release()
            self._pos = pos
        return _ReadResult(added, controls, error)

    def _error(self, message: str) -> MqttProtocolError:
        return MqttProtocolError(f"malformed MQTT from the broker: {message}", source=self._source)


class _BrokerConnection(asyncio.Protocol):
    """One TCP connection to the broker (event-loop side). Parses what arrives and feeds the
    inbound queue; stops reading while the queue is full."""

    def __init__(self, ingest: MqttIngest, loop: asyncio.AbstractEventLoop) -> None:
        self._ingest = ingest
        self.stream = _BrokerStream(
            source=ingest.broker,
            max_packet_bytes=ingest.settings.max_packet_bytes,
            max_payload_bytes=ingest.settings.max_payload_bytes,
        )
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[mqtt5.ConnAckPacket] = loop.create_future()
        self.suback: asyncio.Future[mqtt5.SubAckPacket] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.paused = False
        self.last_received = time.monotonic()
        self._error: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        self.stream.feed(data)
        self.pump()

    def pump(self) -> None:
        """Move parsed packets to the inbound queue until it is full or the bytes run out."""
        ingest = self._ingest
        inbound = ingest.inbound
        queue_max = ingest.settings.queue_max
        added, controls, error = self.stream.read_into(inbound, self, queue_max - len(inbound))
        for packet in controls:
            self._control(packet)
        if error is not None:
            self.fail(error)
        depth = len(inbound)
        if depth >= queue_max and self.stream.buffered:
            self._pause()
        else:
            self._resume()
        if added:
            counters = ingest.counters
            counters.received += added
            counters.queue_depth = depth
            if depth > counters.queue_high_water:
                counters.queue_high_water = depth
            ingest.wake_writer()

    def _pause(self) -> None:
        if self.transport is None:
            return
        if not self.paused:
            self.paused = True
            self.transport.pause_reading()
            self._ingest.counters.backpressure_waits += 1
        # (again when a resumed pump filled the queue from buffered bytes: the writer
        # forgets a connection once it asked it to resume)
        self._ingest.note_paused(self)

    def _resume(self) -> None:
        if self.paused and self.transport is not None and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()

    def _control(self, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.ConnAckPacket):
            if not self.connack.done():
                self.connack.set_result(packet)
        elif isinstance(packet, mqtt5.SubAckPacket):
            if not self.suback.done():
                self.suback.set_result(packet)
        elif isinstance(packet, mqtt5.DisconnectPacket):
            code = int(packet.reason_code)
            self.fail(
                MqttProtocolError(
                    f"broker disconnected us (reason 0x{code:02x} {packet.reason_code.name}"
                    f"{': ' + packet.reason_str if packet.reason_str else ''})",
                    source=self._ingest.broker,
                    reason_code=code,
                )
            )
        elif not isinstance(packet, mqtt5.PingRespPacket):
            self.fail(
                MqttProtocolError(
                    f"malformed MQTT from the broker: unexpected {type(packet).__name__}",
                    source=self._ingest.broker,
                )
            )

    def send(self, data: bytes) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    def fail(self, error: Exception) -> None:
        """Drop the connection now (no DISCONNECT): the broker will redeliver."""
        if self._error is None:
            self._error = error
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Leave politely: DISCONNECT keeps the session (and its queued messages)."""
        if self.send(_DISCONNECT) and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        error = self._error or exc
        for future in (self.connack, self.suback):
            if not future.done():
                future.set_exception(
                    error or ConnectionResetError("the broker closed the connection")
                )
                future.exception()  # retrieved: nobody may be waiting for it any more
        if not self.lost.done():
            if error is None:
                self.lost.set_result(None)
            else:
                self.lost.set_exception(error)
                self.lost.exception()


class MqttIngest:
    """Subscribe (QoS 1) and store every message in ``buffer``; :meth:`run` until cancelled.

    ``counters`` is live; ``connected`` is set while a subscribed connection is up.
    """

    def __init__(self, *, settings: MqttIngestSettings, buffer: IngestBuffer) -> None:
        self.settings = settings
        self.buffer = buffer
        self.broker = f"mqtt://{settings.host}:{settings.port}"
        self.counters = IngestCounters()
        self.connected = asyncio.Event()
        #: Parsed messages waiting for the writer thread (bounded by ``queue_max`` because
        #: the reader stops reading when it is full).
        self.inbound: deque[_Inbound] = deque()
        self._router = _TopicRouter(settings.subscriptions)
        self._births_path = buffer.settings.path.with_name(SPARKPLUG_BIRTHS_NAME)
        self._aliases = _load_births(self._births_path)
        self._births_saved = self._aliases.to_bytes()  # what the file holds
        self._refusals_logged: dict[str, float] = {}  # reason → when it was last logged
        self._wakeup = threading.Condition()
        self._stopping = False
        self._paused: _BrokerConnection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._current: _BrokerConnection | None = None
        self._had_session = False
        self._writer_error: BaseException | None = None
        self._pubacks: dict[int, bytes] = {}

    # -- event-loop side -------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, subscribe, ingest; reconnect with backoff after any loss; on cancellation
        leave with DISCONNECT and stop the writer thread (uncommitted messages stay
        unacknowledged and come back with the next session)."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        writer = threading.Thread(
            target=self._writer_main, name=f"mqtt-ingest-{self.settings.client_id}", daemon=True
        )
        writer.start()
        attempt = 0
        try:
            while True:
                established = False
                try:
                    established = await self._serve_connection()
                    self._note_loss(ConnectionResetError("the broker closed the connection"), 0)
                except (OSError, TimeoutError, MqttProtocolError) as exc:
                    self._note_loss(exc, attempt)
                if self._writer_error is not None:
                    raise IngestError(
                        f"the MQTT ingest writer failed: {self._writer_error}"
                    ) from self._writer_error
                if established:
                    attempt = 0
                await asyncio.sleep(self.settings.backoff.delay(attempt, random.random()))
                attempt += 1
        finally:
            with self._wakeup:
                self._stopping = True
                self._wakeup.notify_all()
            await asyncio.to_thread(writer.join)
            self.counters.queue_depth = len(self.inbound)

    async def _serve_connection(self) -> bool:
        """One connection's life; True once it was subscribed. Returns when it is lost."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        connection = _BrokerConnection(self, loop)
        await asyncio.wait_for(
            loop.create_connection(
                lambda: connection,
                settings.host,
                settings.port,
                ssl=settings.tls,
                server_hostname=settings.host if settings.tls else None,
            ),
            settings.connect_timeout_s,
        )
        self._current = connection
        keepalive: asyncio.Task[None] | None = None
        try:
            connection.send(settings.connect_packet())
            connack = await asyncio.wait_for(
                asyncio.shield(connection.connack), settings.connect_timeout_s
            )
            code = int(connack.reason_code)
            if code:  # 0: success (mqtt5's reason codes are not ints; compare their values)
                raise MqttProtocolError(
                    f"broker refused the connection (reason 0x{code:02x} "
                    f"{connack.reason_code.name}"
                    f"{': ' + connack.reason_str if connack.reason_str else ''})",
                    source=self.broker,
                    reason_code=code,
                )
            if self._had_session and not connack.session_present:
                self.counters.sessions_lost += 1
                log_event(
                    log,
                    logging.WARNING,
                    "broker lost our MQTT session: messages queued for us may be gone",
                    broker=self.broker,
                    client_id=settings.client_id,
                )
            filters = [s.topic_filter for s in settings.subscriptions]
            connection.send(settings.subscribe_packet())
            suback = await asyncio.wait_for(
                asyncio.shield(connection.suback), settings.connect_timeout_s
            )
            codes = [int(code) for code in suback.reason_codes]
            refused = [f for f, code in zip(filters, codes, strict=False) if code >= 0x80]
            if refused or len(codes) != len(filters):
                raise MqttProtocolError(
                    f"broker refused the subscriptions {refused or filters}",
                    source=self.broker,
                    reason_code=max(codes, default=None),
                )
            if self._had_session:
                self.counters.reconnects += 1
            self._had_session = True
            self.counters.connected = True
            self.connected.set()
            log_event(
                log,
                logging.INFO,
                "MQTT ingest subscribed",
                broker=self.broker,
                client_id=settings.client_id,
                session_present=connack.session_present,
                filters=",".join(filters),
            )
            keepalive = asyncio.create_task(
                self._keep_alive(connection, connack.server_keep_alive or settings.keepalive_s)
            )
            await asyncio.shield(connection.lost)
            return True
        finally:
            self.connected.clear()
            self.counters.connected = False
            if keepalive is not None:
                keepalive.cancel()
            connection.close()
            self._current = None

    async def _keep_alive(self, connection: _BrokerConnection, keepalive_s: int) -> None:
        """PINGREQ every half keep-alive; a broker silent for 1.5 keep-alives is gone (not
        checked while we pause reading: then its answers wait in the socket)."""
        if keepalive_s <= 0:
            return
        while True:
            await asyncio.sleep(keepalive_s / 2)
            silent = time.monotonic() - connection.last_received
            if not connection.paused and silent > keepalive_s * 1.5:
                connection.fail(
                    MqttProtocolError(
                        f"no packet from the broker for {silent:.0f} s", source=self.broker
                    )
                )
                return
            connection.send(_PINGREQ)

    def _note_loss(self, error: BaseException, attempt: int) -> None:
        self.counters.last_error = f"{type(error).__name__}: {error}"
        log_event(
            log,
            logging.WARNING,
            "MQTT ingest connection lost; reconnecting",
            broker=self.broker,
            error=self.counters.last_error,
            attempt=attempt,
        )

    def wake_writer(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    def note_paused(self, connection: _BrokerConnection) -> None:
        with self._wakeup:
            self._paused = connection
            self._wakeup.notify()

    def _send_acks(self, acks: list[tuple[_BrokerConnection, bytes, int]]) -> None:
        for connection, data, count in acks:
            if connection.send(data):
                self.counters.acked += count

    def _abort_current(self, error: Exception) -> None:
        if self._current is not None:
            self._current.fail(error)

    # -- writer thread ---------------------------------------------------------------------

    def _writer_main(self) -> None:
        try:
            while True:
                batch = self._take_batch()
                if batch is None:
                    return
                self._resume_if_drained()
                self._commit(batch)
        except BaseException as exc:  # a bug: stop ingesting loudly rather than stall
            self._writer_error = exc
            log.exception("MQTT ingest writer failed")
            self._call_in_loop(
                self._abort_current, IngestError(f"the MQTT ingest writer failed: {exc}")
            )

    def _take_batch(self) -> list[_Inbound] | None:
        """Up to ``batch_max`` queued messages: waits for the first one, then at most
        ``batch_wait_s`` for more, then takes whatever is queued."""
        settings = self.settings
        inbound = self.inbound
        with self._wakeup:
            while not inbound:
                if self._stopping:
                    return None
                self._resume_if_drained_locked()
                self._wakeup.wait(0.5)
            if len(inbound) < settings.batch_max and settings.batch_wait_s > 0:
                deadline = time.monotonic() + settings.batch_wait_s
                while len(inbound) < settings.batch_max and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wakeup.wait(remaining)
            if self._stopping:
                return None
        popleft = inbound.popleft
        batch = [popleft() for _ in range(min(len(inbound), settings.batch_max))]
        self.counters.queue_depth = len(inbound)
        return batch

    def _resume_if_drained(self) -> None:
        with self._wakeup:
            self._resume_if_drained_locked()

    def _resume_if_drained_locked(self) -> None:
        """Ask a paused reader to go on once the queue is at most half full."""
        paused = self._paused
        if paused is None or len(self.inbound) > self.settings.queue_max // 2:
            return
        self._paused = None
        self._call_in_loop(paused.pump)

    def _commit(self, batch: list[_Inbound]) -> None:
        rows, rejected, acks = self._decode(batch)
        if self._aliases.changed:  # on disk before the birth is acknowledged
            self._save_births()
        attempt = 0
        while True:
            try:
                result = self.buffer.insert_rows(rows, rejected=rejected)
                break
            except (sqlite3.Error, OSError, IngestError) as exc:
                self.counters.write_failures += 1
                self.counters.last_error = f"buffer write failed: {exc}"
                log_event(
                    log,
                    logging.ERROR,
                    "buffer write failed; messages stay unacknowledged, retrying",
                    error=str(exc),
                    attempt=attempt,
                )
                if self._stopping:
                    return
                time.sleep(_WRITE_RETRY.delay(attempt, random.random()))
                attempt += 1
        counters = self.counters
        counters.batches += 1
        counters.committed += len(batch)
        counters.inserted += result.inserted
        counters.duplicates += result.duplicates
        counters.rejected_full += result.rejected_full
        counters.dropped_oldest += result.dropped_oldest
        for item in rejected:
            counters.malformed[item.reason] = counters.malformed.get(item.reason, 0) + 1
        self._log_refusals(rejected)
        self._call_in_loop(
            self._send_acks,
            [(connection, self._pubacks_of(mids), len(mids)) for connection, mids in acks.items()],
        )

    def _log_refusals(self, rejected: list[RejectedPayload]) -> None:
        """Each reason's first refusal, then at most one line per reason a minute: a
        publisher sending garbage shows in the log, not only in the counters."""
        now = time.monotonic()
        for item in rejected:
            last = self._refusals_logged.get(item.reason)
            if last is not None and now - last < _REFUSAL_LOG_EVERY_S:
                continue
            self._refusals_logged[item.reason] = now
            log_event(
                log,
                logging.WARNING,
                "MQTT payload refused",
                reason=item.reason,
                source=item.source,
                refused_so_far=self.counters.malformed.get(item.reason, 0),
            )

    def _save_births(self) -> None:
        data = self._aliases.to_bytes()
        if data == self._births_saved:
            return  # a birth that repeated what was known (every reconnect sends one)
        try:
            atomic_write(self._births_path, data)
            self._births_saved = data
        except OSError as exc:  # a restart then refuses alias-only data until the next birth
            self._aliases.changed = True  # tried again with the next batch
            log_event(
                log,
                logging.ERROR,
                "Sparkplug births not saved",
                path=str(self._births_path),
                error=str(exc),
            )

    def _pubacks_of(self, mids: list[int]) -> bytes:
        """PUBACK (success) for each packet id, concatenated: one socket write per batch.
        Each packet id's PUBACK is built by mqtt5 once and kept (at most 65,535 of them)."""
        pubacks = self._pubacks
        parts = []
        for mid in mids:
            data = pubacks.get(mid)
            if data is None:
                data = pubacks[mid] = mqtt5.PubAckPacket(mid).write()
            parts.append(data)
        return b"".join(parts)

    def _decode(
        self, batch: list[_Inbound]
    ) -> tuple[list[SampleRow], list[RejectedPayload], dict[_BrokerConnection, list[int]]]:
        max_bytes = self.settings.max_payload_bytes
        route_of = self._router.route
        by_topic = self.counters.received_by_topic
        rows: list[SampleRow] = []
        rejected: list[RejectedPayload] = []
        acks: dict[_BrokerConnection, list[int]] = {}
        last_connection: _BrokerConnection | None = None
        mids: list[int] = []
        for connection, topic, payload, qos, mid in batch:
            if qos:
                if connection is not last_connection:
                    mids = acks.setdefault(connection, [])
                    last_connection = connection
                mids.append(mid)
            count = by_topic.get(topic)
            if count is not None:
                by_topic[topic] = count + 1
            elif len(by_topic) < _MAX_TRACKED_TOPICS:
                by_topic[topic] = 1
            route = route_of(topic)
            if route.refusal is not None:
                rejected.append(RejectedPayload(route.source, route.refusal, payload))
                continue
            size = payload.size if isinstance(payload, _Oversize) else len(payload)
            if size > max_bytes:
                rejected.append(RejectedPayload(route.source, "too_large", payload, size=size))
                continue
            try:
                if route.format == "json":
                    rows.append(
                        decode_json_row(route.source, payload, tag=route.tag, max_bytes=max_bytes)
                    )
                else:
                    refused: list[MalformedPayload] = []
                    rows.extend(
                        (s.source, s.seq, s.tag, s.ts, s.value)
                        for s in decode_sparkplug_samples(
                            route.topic,
                            payload,
                            tag_prefix=route.tag,
                            aliases=self._aliases,
                            max_bytes=max_bytes,
                            refused=refused,
                        )
                    )
                    rejected.extend(
                        RejectedPayload(route.source, r.reason, payload) for r in refused
                    )
            except MalformedPayload as exc:
                rejected.append(RejectedPayload(route.source, exc.reason, payload))
            except Exception as exc:  # a decoder fault must not stop the agent: count it
                log_event(
                    log,
                    logging.ERROR,
                    "MQTT payload not decoded",
                    source=route.source,
                    error=f"{type(exc).__name__}: {exc}",
                )
                rejected.append(RejectedPayload(route.source, "undecodable", payload))
        return rows, rejected, acks

    def _call_in_loop(self, callback: Callable[..., object], *args: object) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to ack to
            loop.call_soon_threadsafe(callback, *args)


def _load_births(path: Path) -> SparkplugAliases:
    """The Sparkplug names and data types saved by an earlier run; none when there is no
    file or it cannot be read (logged: alias-only data is then refused until births come)."""
    try:
        return SparkplugAliases.from_bytes(path.read_bytes())
    except FileNotFoundError:
        return SparkplugAliases()
    except (OSError, ValueError) as exc:
        log_event(log, logging.WARNING, "Sparkplug births not read", path=str(path), error=str(exc))
        return SparkplugAliases()
