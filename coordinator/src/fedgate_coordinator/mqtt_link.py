"""The coordinator's MQTT connection: reconnects with backoff, QoS 1, bounded queues.

MQTT 5 is tried first when ``protocol="auto"``; a broker that refuses it (for example an
MQTT 3.1.1-only embedded broker) gets 3.1.1 from then on.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence

import aiomqtt
import msgspec
from fedgate_common.backoff import Backoff
from fedgate_common.logs import log_event
from fedgate_common.mqtt_tls import client_tls_context
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("fedgate.coordinator.mqtt")

# CONNACK codes meaning "this protocol version is not spoken here" (3.1.1 rc 1, MQTT 5 rc 132).
_UNSUPPORTED_PROTOCOL = {1, 132}
SESSION_EXPIRY_S = 300


class MqttSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where and how to connect. ``password_file`` holds the password (first line), so
    that the secret stays out of the configuration file; ``tls_ca_file`` turns TLS on and
    names the CA that signed the broker's certificate (``tls_cert_file`` / ``tls_key_file``:
    an optional client certificate)."""

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "auto"  # auto | 5 | 3.1.1
    keepalive_s: int = 30
    queue_size: int = 1000
    client_id: str = ""
    username: str = ""
    password_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""


def read_password(path: str) -> str | None:
    """The first line of ``path`` ("" path: no password); OSError when it cannot be read."""
    if not path:
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.readline().rstrip("\r\n")


class InboundMessage(msgspec.Struct, frozen=True):
    topic: str
    payload: bytes


def _admitting_queue(
    admit: Callable[[str, bool], bool],
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """aiomqtt's incoming queue (its ``queue_type``), refusing what ``admit`` refuses
    before the message takes a slot. aiomqtt fills it from paho's message callback.

    ``admit(topic, full)`` is told whether the queue holds its ``maxsize`` already; what it
    admits then is queued all the same (aiomqtt would discard it), so the caller, not the
    queue, decides which messages may pass a full queue."""

    class AdmittingQueue(asyncio.Queue[aiomqtt.Message]):
        def __init__(self, maxsize: int = 0) -> None:
            super().__init__()  # unbounded: admit keeps it to ``maxsize`` but for what it must take
            self._bound = maxsize

        def put_nowait(self, item: aiomqtt.Message) -> None:
            full = 0 < self._bound <= self.qsize()
            if admit(str(item.topic), full):
                super().put_nowait(item)

    return AdmittingQueue


class MqttLink:
    """One reconnecting broker connection; inbound messages go to a bounded queue.

    ``admit(topic, full)``, if given, runs for each message as the MQTT client receives
    it, before the message takes a place in the client's queue: a message it refuses is
    gone at once. So a sender flooding the link is dropped at receive speed, and with the
    queue full only what ``admit`` still takes gets in (without ``admit``, aiomqtt
    discards what arrives while its queue is full).
    """

    def __init__(
        self,
        *,
        settings: MqttSettings,
        subscriptions: Sequence[str],
        backoff: Backoff | None = None,
        admit: Callable[[str, bool], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.subscriptions = tuple(subscriptions)
        # Loaded once, here: a file that does not load is a BrokerTlsInvalid now (a config
        # error at start-up), not a connect that fails and is retried for ever.
        self._tls = (
            client_tls_context(
                ca_file=settings.tls_ca_file,
                cert_file=settings.tls_cert_file,
                key_file=settings.tls_key_file,
                what=f"MQTT link to {settings.host}:{settings.port}",
            )
            if settings.tls_ca_file
            else None
        )
        self._queue_type = None if admit is None else _admitting_queue(admit)
        self.inbound: asyncio.Queue[InboundMessage] = asyncio.Queue(maxsize=settings.queue_size)
        self.connected = asyncio.Event()
        self._backoff = backoff or Backoff()
        self._client: aiomqtt.Client | None = None
        self._use_v5 = settings.protocol in ("auto", "5")
        self.bytes_published = 0
        self._connected_once = False
        self._stopped = False  # run() has ended: nobody will reconnect, publish must not wait

    def _make_client(self) -> aiomqtt.Client:
        settings = self.settings
        common = {
            "hostname": settings.host,
            "port": settings.port,
            "identifier": settings.client_id or None,
            "keepalive": settings.keepalive_s,
            "max_queued_incoming_messages": settings.queue_size,
            "logger": log,
            "username": settings.username or None,
            "password": read_password(settings.password_file),
        }
        if self._queue_type is not None:
            common["queue_type"] = self._queue_type
        if self._tls is not None:
            common["tls_context"] = self._tls
        # The first connection of this process starts a clean session; reconnections resume
        # it, so QoS 1 messages sent while the link was down are delivered afterwards.
        fresh = not self._connected_once
        if self._use_v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
            return aiomqtt.Client(
                protocol=aiomqtt.ProtocolVersion.V5,
                properties=properties,
                clean_start=fresh,
                **common,  # type: ignore[arg-type]
            )
        return aiomqtt.Client(protocol=aiomqtt.ProtocolVersion.V311, clean_session=fresh, **common)  # type: ignore[arg-type]

    async def run(self) -> None:
        """Connect, subscribe and pump messages forever; reconnect after any broker error."""
        self._stopped = False
        try:
            await self._serve(0)
        finally:
            self._stopped = True

    async def _serve(self, attempt: int) -> None:
        while True:
            try:
                async with self._make_client() as client:
                    for topic_filter in self.subscriptions:
                        await client.subscribe(topic_filter, qos=1)
                    self._client = client
                    self._connected_once = True
                    self.connected.set()
                    log_event(
                        log,
                        logging.INFO,
                        "connected to broker",
                        host=self.settings.host,
                        port=self.settings.port,
                        mqtt5=self._use_v5,
                    )
                    attempt = 0
                    async for message in client.messages:
                        payload = message.payload
                        if not isinstance(payload, bytes | bytearray):
                            payload = str(payload).encode()
                        await self.inbound.put(InboundMessage(str(message.topic), bytes(payload)))
            except aiomqtt.MqttError as exc:
                if self._switch_protocol(exc):
                    continue
                self._lost(exc, attempt)
            finally:
                self._client = None
                self.connected.clear()
            await asyncio.sleep(self._backoff.delay(attempt, random.random()))
            attempt += 1

    def _switch_protocol(self, exc: aiomqtt.MqttError) -> bool:
        """With ``protocol = "auto"``, move to MQTT 3.1.1 when the broker refuses MQTT 5.

        Brokers refuse either with a CONNACK code or by closing the connection; until an
        MQTT 5 session has succeeded once, a failed attempt alternates the version.
        """
        if self.settings.protocol != "auto" or self._connected_once:
            return False
        self._use_v5 = not self._use_v5
        log_event(
            log, logging.INFO, "trying another MQTT version", mqtt5=self._use_v5, error=str(exc)
        )
        # An explicit refusal is retried at once; a closed connection waits for the backoff.
        return isinstance(exc, aiomqtt.MqttCodeError) and (
            _reason_value(exc.rc) in _UNSUPPORTED_PROTOCOL
        )

    def _lost(self, exc: Exception, attempt: int) -> None:
        log_event(
            log,
            logging.WARNING,
            "broker connection lost; reconnecting",
            error=str(exc),
            attempt=attempt,
        )

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish with QoS 1, waiting for a connection; retried once after a reconnect.

        Raises :class:`aiomqtt.MqttError` once :meth:`run` has ended, instead of waiting
        for a connection that cannot come (a stop that raced with a publish).
        """
        for _ in range(2):
            while not self.connected.is_set():
                if self._stopped:
                    raise aiomqtt.MqttError(f"link to {self.settings.host} is stopped")
                await asyncio.sleep(0.05)
            client = self._client
            if client is None:
                continue
            try:
                await client.publish(topic, payload, qos=1, retain=retain)
            except aiomqtt.MqttError as exc:
                log_event(log, logging.WARNING, "publish failed", topic=topic, error=str(exc))
                await asyncio.sleep(0.1)
                continue
            self.bytes_published += len(payload)
            return
        raise aiomqtt.MqttError(f"could not publish to {topic}")


def _reason_value(rc: object) -> int | None:
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None
