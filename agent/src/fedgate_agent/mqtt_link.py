"""The agent's MQTT connection: reconnects with backoff, QoS 1, bounded queues.

MQTT 5 is tried first when ``protocol="auto"``; a broker that refuses it (for example an
MQTT 3.1.1-only embedded broker) gets 3.1.1 from then on.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

import aiomqtt
import msgspec
from fedgate_common.backoff import Backoff
from fedgate_common.logs import log_event
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedgate_agent.broker_login import cloud_login
from fedgate_agent.config import BrokerConfig

log = logging.getLogger("fedgate.agent.mqtt")

# CONNACK codes meaning "this protocol version is not spoken here" (3.1.1 rc 1, MQTT 5 rc 132).
_UNSUPPORTED_PROTOCOL = {1, 132}
SESSION_EXPIRY_S = 300


class InboundMessage(msgspec.Struct, frozen=True):
    topic: str
    payload: bytes


class MqttLink:
    """One reconnecting broker connection; inbound messages go to a bounded queue."""

    def __init__(
        self,
        *,
        settings: BrokerConfig,
        client_id: str,
        subscriptions: Sequence[str],
        backoff: Backoff | None = None,
    ) -> None:
        self.settings = settings
        self._login = cloud_login(settings)  # ConfigError here, before any network IO
        self.client_id = client_id
        self.subscriptions = tuple(subscriptions)
        self.inbound: asyncio.Queue[InboundMessage] = asyncio.Queue(maxsize=settings.queue_size)
        self.connected = asyncio.Event()
        self._backoff = backoff or Backoff()
        self._client: aiomqtt.Client | None = None
        self._use_v5 = settings.protocol in ("auto", "5")
        self.bytes_published = 0
        self._connected_once = False

    def _make_client(self) -> aiomqtt.Client:
        common = {
            "hostname": self.settings.host,
            "port": self.settings.port,
            "identifier": self.client_id,
            "keepalive": self.settings.keepalive_s,
            "max_queued_incoming_messages": self.settings.queue_size,
            "logger": log,
            "username": self._login.username,
            "password": self._login.password,
            "tls_context": self._login.tls,
        }
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
        attempt = 0
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
        """Publish with QoS 1, waiting for a connection; retried once after a reconnect."""
        for _ in range(2):
            await self.connected.wait()
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
