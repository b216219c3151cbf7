"""Publish the outbox to MQTT: QoS 1, oldest first, a row deleted only after its PUBACK.

Each connection is a fresh paho-mqtt client with a clean session: the outbox, not the
client library, is the record of what still has to be delivered. After every (re)connect
the publisher starts again at the oldest row, so a message whose PUBACK was lost with the
connection is sent again; the agent deduplicates on (topic, seq). At most
``broker.max_inflight`` messages await their PUBACK at any time. When messages are in
flight and no PUBACK at all arrives for ``broker.ack_timeout_s``, the connection is ended
and everything unacknowledged goes again.

With MQTT 5 (the default) every PUBACK carries a reason code:

* success (below 0x80, "no matching subscribers" included): the row is deleted;
* a refusal that repeating cannot cure (:data:`PERMANENT_REFUSALS`: not authorized,
  topic name invalid, payload format invalid): the row is *parked* in the outbox with the
  broker's reason, counted and logged; the next start of the bridge sends it again. After
  "not authorized" or "topic name invalid" the topic's later rows are parked without being
  sent for :data:`TOPIC_BLOCK_S` (doubling up to :data:`TOPIC_BLOCK_MAX_S`): Mosquitto with
  ``max_queued_messages 0`` closes the connection after each such refusal, and every
  denied reading would cost a reconnect. Then the topic is tried again, with its next
  reading or, when none comes, with its oldest parked row; once the broker accepts it (an
  ACL fixed and reloaded), its parked rows go back to waiting and are sent;
* any other refusal (quota exceeded, unspecified error, ...): the row stays, the
  connection is closed and the publisher reconnects with backoff.

With MQTT 3.1.1 a broker cannot refuse a publish: Mosquitto acknowledges one its ACL
denies and drops it, so the row is deleted and the reading lost (docs/operations.md).

A row that was the oldest unacknowledged one each time the broker closed the connection
before sending any PUBACK, :data:`POISON_AFTER` connections in a row, is parked too (a
payload above the broker's size limit does that): one row must not stop every other.
After such a close the next connection sends one message at a time until a PUBACK comes:
a broker that closes with the rest of a window unread resets the connection, and the reset
can discard its last answer, so a denied row looked like a poisoned one.

Reconnects back off exponentially; the backoff starts again only after a connection stayed
up for :data:`STABLE_AFTER_S`, so a broker that accepts each login and then drops the
connection is not hammered. A connection closed after a topic's refusal reconnects at
once: it is expected, and that topic is held back for a while.

paho-mqtt runs on the asyncio loop through its external-loop hooks (``on_socket_open``,
``loop_read`` / ``loop_write`` / ``loop_misc``). Only the blocking TCP connect runs in a
worker thread, so an unreachable broker never stalls polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Final

import msgspec
import paho.mqtt.client as mqtt
from fedgate_common.backoff import Backoff
from fedgate_common.logs import log_event
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from fedgate_bridge.config import BrokerSettings, tls_context
from fedgate_bridge.counters import FailureLog, PublisherCounters
from fedgate_bridge.outbox import AsyncOutbox, OutboxMessage

__all__ = ["BrokerUnavailable", "MqttPublisher"]

log = logging.getLogger("fedgate.bridge.publisher")

CONNECT_TIMEOUT_S: Final = 10.0
MISC_INTERVAL_S: Final = 1.0  # paho keepalive bookkeeping
KEEPALIVE_LOST: Final = "keepalive timeout"  # our own verdict, not the broker closing
STABLE_AFTER_S: Final = 10.0  # a connection this old resets the reconnect backoff
# MQTT 5 PUBACK reason codes after which sending the same message again cannot succeed.
PERMANENT_REFUSALS: Final = frozenset({0x87, 0x90, 0x99})
# Of those, the ones that hold for every message on the topic (ACL, topic name).
TOPIC_REFUSALS: Final = frozenset({0x87, 0x90})
# Their names, as parked rows record them: only those rows go back when a topic is accepted
# again (a payload the broker cannot take, or a poisoned row, stays parked).
TOPIC_REFUSAL_NAMES: Final = frozenset(
    str(ReasonCode(PacketTypes.PUBACK, identifier=code)) for code in TOPIC_REFUSALS
)
# A refused topic is not sent for this long, then tried again (doubling up to the max):
# an ACL fixed and reloaded without restarting the bridge is picked up by itself.
TOPIC_BLOCK_S: Final = 60.0
TOPIC_BLOCK_MAX_S: Final = 900.0
# A row that was the oldest unacknowledged one each time the broker closed the connection
# before any PUBACK, this many connections in a row, is parked (too large for the broker,
# for example): one poisoned row must not stop every topic behind it.
POISON_AFTER: Final = 5


class BrokerUnavailable(ConnectionError):
    """One connection attempt or connection failed; the publisher retries with backoff.

    Internal to this module: it never leaves :meth:`MqttPublisher.run`.
    """


class _Session:
    """One paho client driven by the asyncio loop, from CONNECT until it is lost or closed."""

    def __init__(
        self,
        *,
        settings: BrokerSettings,
        client_id: str,
        password: str | None,
        on_ack: Callable[[int, ReasonCode], None],
        wake: asyncio.Event,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._settings = settings
        self._on_ack = on_ack
        self._wake = wake
        self.connack: asyncio.Future[None] = self._loop.create_future()
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._closed = False
        self._misc: asyncio.Task[None] | None = None
        self._v5 = settings.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            # MQTT 5 has no clean session: open() asks for a clean start instead.
            clean_session=None if self._v5 else True,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        if settings.username:
            client.username_pw_set(settings.username, password)
        context = tls_context(settings)  # checked when the configuration was loaded
        if context is not None:
            client.tls_set_context(context)
        client.max_inflight_messages_set(settings.max_inflight)
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self.client = client

    # paho callbacks. on_socket_open and on_socket_register_write also run in the connect
    # thread; there they only schedule work on the loop. On the loop they act at once: a
    # socket must leave the selector before paho closes it.

    def _on_loop(self, action: Any, *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            action(*args)
        else:
            self._loop.call_soon_threadsafe(action, *args)

    def _on_socket_open(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock)

    def _watch(self, sock: Any) -> None:
        if sock.fileno() < 0:
            return
        if self._closed:  # closed while the connect thread was still connecting
            with contextlib.suppress(OSError):
                sock.close()
            return
        self._loop.add_reader(sock, self._read)
        self._misc = self._loop.create_task(self._misc_loop())

    def _on_socket_close(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._unwatch, sock)

    def _unwatch(self, sock: Any) -> None:
        if sock.fileno() >= 0:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if self._misc is not None:
            self._misc.cancel()
        self._mark_lost("socket closed")

    def _on_register_write(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._want_write, sock)

    def _want_write(self, sock: Any) -> None:
        if not self._closed and id(self.client.socket()) == id(sock):  # still the live socket
            self._loop.add_writer(sock, self._write)

    def _on_unregister_write(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._drop_writer, sock)

    def _drop_writer(self, sock: Any) -> None:
        if sock.fileno() >= 0:
            self._loop.remove_writer(sock)

    def _read(self) -> None:
        rc = self.client.loop_read()
        sock = self.client.socket()
        # TLS: bytes already decrypted inside the SSL object do not wake the selector.
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket):
            if not sock.pending():
                break
            rc = self.client.loop_read()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._mark_lost(f"read: {mqtt.error_string(rc)}")

    def _write(self) -> None:
        rc = self.client.loop_write()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._mark_lost(f"write: {mqtt.error_string(rc)}")

    async def _misc_loop(self) -> None:
        """Keepalive pings and their timeout: paho needs a call about once a second."""
        while True:
            await asyncio.sleep(MISC_INTERVAL_S)
            if self.client.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._mark_lost(KEEPALIVE_LOST)
                return

    def _on_connect(
        self, client: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode, _p: Any
    ) -> None:
        if self.connack.done():
            return
        if reason.is_failure:
            self.connack.set_exception(BrokerUnavailable(f"broker refused: {reason}"))
        else:
            self.connack.set_result(None)

    def _on_disconnect(
        self, client: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode, _p: Any
    ) -> None:
        # The broker's reason (MQTT 5 DISCONNECT, e.g. "Session taken over") says more
        # than the socket closing, which paho reports first.
        self._mark_lost(f"disconnected: {reason}")
        said_why = reason.is_failure and reason.value != 0x80  # 0x80: paho's "connection lost"
        if said_why and self.lost_reason == "socket closed":
            self.lost_reason = f"disconnected: {reason}"

    def _on_publish(
        self, client: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any
    ) -> None:
        self._on_ack(mid, reason)
        self._wake.set()

    def _mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()
            self._wake.set()
        if not self.connack.done():
            self.connack.set_exception(BrokerUnavailable(reason))

    # lifecycle

    async def open(self) -> None:
        """TCP connect (worker thread), CONNECT, wait for a successful CONNACK."""
        settings = self._settings
        connect = self.client.connect
        if self._v5:
            connect = partial(connect, clean_start=True)
        try:
            await asyncio.to_thread(connect, settings.host, settings.port, settings.keepalive_s)
        except (OSError, ValueError) as exc:
            where = f"{settings.host}:{settings.port}"
            raise BrokerUnavailable(f"cannot connect to {where}: {exc}") from None
        try:
            await asyncio.wait_for(asyncio.shield(self.connack), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise BrokerUnavailable(f"no CONNACK within {CONNECT_TIMEOUT_S:g} s") from None

    def publish(self, topic: str, payload: bytes) -> int:
        """Queue one QoS 1 message; returns its packet id."""
        info = self.client.publish(topic, payload, qos=1, retain=False)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._mark_lost(f"publish: {mqtt.error_string(info.rc)}")
            raise BrokerUnavailable(f"publish failed: {mqtt.error_string(info.rc)}")
        return int(info.mid)

    def close(self) -> None:
        """Disconnect politely if possible and release the socket; idempotent."""
        if self._closed:
            return
        self._closed = True
        sock = self.client.socket()
        with contextlib.suppress(Exception):
            if self.connack.done() and not self.lost.is_set():
                self.client.disconnect()
                self.client.loop_write()
        if sock is not None and sock.fileno() >= 0:  # paho closes it after DISCONNECT
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            with contextlib.suppress(OSError):
                sock.close()
        if self._misc is not None:
            self._misc.cancel()
        if not self.connack.done():
            self.connack.cancel()
        self.lost.set()


class _Block(msgspec.Struct, frozen=True):
    """A topic the broker refused: its rows are parked unsent until ``until``."""

    reason: str
    until: float  # time.monotonic()
    wait_s: float
    tried: bool = False  # the block ran out and one parked row went back to try the topic


class _Sent(msgspec.Struct, frozen=True):
    """One message awaiting its PUBACK."""

    row: int  # outbox row id
    topic: str


class MqttPublisher:
    """Sends the outbox to the broker forever; see the module docstring."""

    def __init__(
        self,
        *,
        settings: BrokerSettings,
        client_id: str,
        outbox: AsyncOutbox,
        counters: PublisherCounters,
        password: str | None = None,
        backoff: Backoff | None = None,
        topic_block_s: float = TOPIC_BLOCK_S,
    ) -> None:
        self.settings = settings
        self._topic_block_s = topic_block_s
        self.client_id = client_id
        self.outbox = outbox
        self.counters = counters
        self._password = password
        self._backoff = backoff or Backoff(initial_s=0.5, max_s=30.0)
        self._wake = asyncio.Event()
        self._inflight: dict[int, _Sent] = {}  # packet id → what it carries, oldest first
        self._acked: list[int] = []  # row ids whose PUBACK arrived, not yet deleted
        self._refused: list[tuple[int, str]] = []  # (row id, reason) refused for good
        self._retry_reason = ""  # a refusal that a new connection may cure
        self._blocked: dict[str, _Block] = {}  # topics the broker refused, not sent for now
        self._unblocked: list[str] = []  # accepted again: their parked rows go back
        self._rewind = False  # parked rows came back: read the outbox from its start
        self._requeued: set[int] = set()  # rows back from parking, not yet sent again
        self._new_refusal = False  # this connection brought a refusal for a new topic
        self._acks_this_session = 0  # PUBACKs of any kind on the current connection
        self._last_progress = 0.0  # monotonic: last PUBACK, or first send into an empty window
        self._suspect: tuple[int, int] | None = None  # (row id, connections it ended)
        self._one_at_a_time = False  # the broker closed the last connection, no PUBACK
        self._highest_sent = 0  # highest row id ever sent by this process
        self._failures = FailureLog(
            log, what="broker connection", host=settings.host, port=settings.port
        )
        self._refusals = FailureLog(log, what="delivery", host=settings.host)

    def notify(self) -> None:
        """New rows are in the outbox."""
        self._wake.set()

    @property
    def idle(self) -> bool:
        """Nothing waits in the outbox and nothing awaits a PUBACK or its outbox update."""
        return (
            self.outbox.depth == 0 and not self._inflight and not self._acked and not self._refused
        )

    async def drain(self, timeout_s: float) -> bool:
        """Wait until :attr:`idle` (everything acknowledged), at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.idle:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def _ack(self, mid: int, reason: ReasonCode) -> None:
        sent = self._inflight.pop(mid, None)
        if sent is None:
            return
        self._acks_this_session += 1
        self._one_at_a_time = False
        self._last_progress = time.monotonic()
        if not reason.is_failure:
            self._acked.append(sent.row)
            self.counters.acked += 1  # counted at the PUBACK; the row's delete follows
            if self._blocked.pop(sent.topic, None) is not None:
                self._unblocked.append(sent.topic)  # the broker takes the topic again
            return
        self.counters.refused += 1
        if reason.value in PERMANENT_REFUSALS:
            if reason.value in TOPIC_REFUSALS:
                # Mosquitto may close the connection after such a refusal: the topic's
                # other rows are parked unsent for a while, then the topic is tried again.
                self._block(sent.topic, str(reason))
            self._park(sent.row, sent.topic, str(reason))
        else:
            self._retry_reason = f"broker refused a message on {sent.topic}: {reason}"
            self._note_refusal(
                sent.topic, str(reason), "kept in the outbox; reconnecting to send it again"
            )

    def _block(self, topic: str, reason: str) -> None:
        previous = self._blocked.get(topic)
        if previous is not None and time.monotonic() < previous.until:
            return  # a refusal of a row sent before the block began
        wait = (
            self._topic_block_s if previous is None else min(previous.wait_s * 2, TOPIC_BLOCK_MAX_S)
        )
        self._blocked[topic] = _Block(reason, time.monotonic() + wait, wait)
        self._new_refusal = True

    def _park(self, row: int, topic: str, reason: str) -> None:
        self._refused.append((row, reason))
        self.counters.parked += 1
        again = (
            "once the broker takes the topic"
            if reason in TOPIC_REFUSAL_NAMES
            else "at the next start"
        )
        self._note_refusal(topic, reason, f"parked in the outbox; sent again {again}")

    def _note_refusal(self, topic: str, reason: str, outcome: str) -> None:
        self.counters.last_refusal = f"{topic}: {reason}"
        self.counters.last_refusal_at = time.time()
        self._refusals.failure(reason, topic=topic, outcome=outcome)

    async def _settle(self) -> None:
        """Delete acknowledged rows and park refused ones in the outbox."""
        if self._acked:
            rows, self._acked = self._acked, []
            await self.outbox.remove(rows)
        if self._refused:
            refused, self._refused = self._refused, []
            await self.outbox.park(refused)
        while self._unblocked:
            topic = self._unblocked.pop()
            await self._bring_back(topic, limit=None)
        now = time.monotonic()
        for topic, block in list(self._blocked.items()):
            if self._blocked.get(topic) is not block:
                continue  # accepted, or refused anew, while an earlier topic was brought back
            if now >= block.until and not block.tried:
                # The block ran out: the topic's oldest parked row goes to try it, so a topic
                # that produces no new reading is tried too.
                self._blocked[topic] = msgspec.structs.replace(block, tried=True)
                await self._bring_back(topic, limit=1)
        self.counters.inflight = len(self._inflight)

    async def _bring_back(self, topic: str, *, limit: int | None) -> None:
        back = await self.outbox.requeue(topic, TOPIC_REFUSAL_NAMES, limit=limit)
        if back:
            self._requeued.update(back)
            self._rewind = True

    async def run(self) -> None:
        """Connect, publish, reconnect with backoff after any failure; never returns."""
        attempt = 0
        while True:
            session = _Session(
                settings=self.settings,
                client_id=self.client_id,
                password=self._password,
                on_ack=self._ack,
                wake=self._wake,
            )
            connected_at: float | None = None
            self._new_refusal = False
            self._acks_this_session = 0
            head: _Sent | None = None
            try:
                await session.open()
                connected_at = time.monotonic()
                self._connected()
                await self._pump(session)
            except BrokerUnavailable as exc:
                self._failed(str(exc))
            finally:
                was_connected = self.counters.connected
                ours = session.lost_reason in ("", KEEPALIVE_LOST)  # not the broker's doing
                if not ours and self._inflight:
                    head = next(iter(self._inflight.values()))
                session.close()
                self._lost_connection(was_connected)
            self._watch_for_poison(head)
            await self._settle()
            if connected_at is not None and time.monotonic() - connected_at >= STABLE_AFTER_S:
                attempt = 0  # it worked for a while: this outage starts a fresh backoff
            if self._new_refusal:
                attempt = 0  # an expected disconnect: that topic is not sent again
            await asyncio.sleep(self._backoff.delay(attempt, random.random()))
            attempt += 1

    def _connected(self) -> None:
        self.counters.connected = True
        self.counters.connects += 1
        self._failures.success()
        log_event(
            log,
            logging.INFO,
            "connected to broker",
            host=self.settings.host,
            port=self.settings.port,
            client_id=self.client_id,
            protocol=self.settings.protocol,
            outbox=self.outbox.depth,
        )

    def _failed(self, error: str) -> None:
        self.counters.last_error = error
        self.counters.last_error_at = time.time()
        if not self.counters.connected:
            self.counters.connect_failures += 1
        self._failures.failure(error)

    def _lost_connection(self, was_connected: bool) -> None:
        if was_connected:
            self.counters.disconnects += 1
        self.counters.connected = False
        # Whatever awaited a PUBACK goes again on the next connection.
        self._inflight.clear()
        self._retry_reason = ""
        self.counters.inflight = 0

    def _watch_for_poison(self, head: _Sent | None) -> None:
        """Park the oldest unacknowledged row once the broker has closed :data:`POISON_AFTER`
        connections in a row, each without a single PUBACK, with that row oldest in flight."""
        if head is None or self._acks_this_session:
            self._suspect = None
            return
        # The broker may have answered the head and closed the connection with the rest of
        # the window unread: a reset then discards its answer on the way. One message at a
        # time until a PUBACK arrives lets the answer (or the close) name the row.
        self._one_at_a_time = True
        ended = 1 if self._suspect is None or self._suspect[0] != head.row else self._suspect[1] + 1
        self._suspect = (head.row, ended)
        if ended >= POISON_AFTER:
            self._suspect = None
            reason = f"the broker closed the connection each time it was sent ({ended} times)"
            self._park(head.row, head.topic, reason)

    def _check_inflight(self) -> None:
        """End the connection when the broker refused a message for now, or when messages
        are in flight and no PUBACK at all came for ``ack_timeout_s`` (a slow link that
        acknowledges steadily is not cut off however deep its window)."""
        if self._retry_reason:
            raise BrokerUnavailable(self._retry_reason)
        if self._inflight:
            waited = time.monotonic() - self._last_progress
            if waited > self.settings.ack_timeout_s:
                raise BrokerUnavailable(
                    f"no PUBACK within {self.settings.ack_timeout_s} s "
                    f"({len(self._inflight)} messages unacknowledged)"
                )

    async def _pump(self, session: _Session) -> None:
        """Publish oldest first, at most ``max_inflight`` unacknowledged, until lost."""
        cursor = 0  # highest row id sent on this connection
        sent_before = self._highest_sent  # rows up to here were sent on earlier connections
        while not session.lost.is_set():
            self._wake.clear()
            self._check_inflight()
            await self._settle()
            if self._rewind:  # requeued rows sit below the cursor
                self._rewind = False
                cursor = 0
            limit = 1 if self._one_at_a_time else self.settings.max_inflight
            room = limit - len(self._inflight)
            rows = await self.outbox.pending(after_id=cursor, limit=room) if room > 0 else []
            # Rows already on their way: in flight, or answered and not yet settled (no await
            # from here to the end of the loop, so no PUBACK moves them in between).
            in_flight = {sent.row for sent in self._inflight.values()}
            in_flight.update(self._acked, (row for row, _ in self._refused))
            now = time.monotonic()
            for row in rows:
                if session.lost.is_set():
                    break
                cursor = row.id
                if row.id in in_flight:
                    continue
                block = self._blocked.get(row.topic)
                if block is not None and now < block.until:
                    self._park(row.id, row.topic, block.reason)
                else:
                    self._send(session, row, resent=row.id <= sent_before)
            self.counters.inflight = len(self._inflight)
            if not rows or len(self._inflight) >= limit:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
        raise BrokerUnavailable(f"connection lost ({session.lost_reason})")

    def _send(self, session: _Session, row: OutboxMessage, *, resent: bool) -> None:
        mid = session.publish(row.topic, row.payload)
        if not self._inflight:
            self._last_progress = time.monotonic()  # the wait for a PUBACK starts now
        self._inflight[mid] = _Sent(row.id, row.topic)
        self.counters.sent += 1
        if row.id in self._requeued:
            self._requeued.discard(row.id)  # held back or refused before: not a resend
        elif resent:
            self.counters.resent += 1
        self._highest_sent = max(self._highest_sent, row.id)
