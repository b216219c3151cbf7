"""Fill persistent sessions with a backlog before a drain is timed.

:func:`create_session` registers a client's persistent session and QoS 1 subscription and
leaves; :func:`preload` then publishes N messages at full speed so the broker queues them
for every offline session. A raw-socket MQTT 5 publisher whose packets are written and read
by the ``mqtt5`` codec (pipelined PUBLISH, at most ``window`` unacknowledged, never more
than the broker's Receive Maximum) — paho's publisher manages a few thousand messages/s,
which would make preloading the slowest part of the benchmark. ``mosquitto_pub -l`` is not
used: at QoS 1 it silently skipped about two thirds of 100,000 lines here (mosquitto 2.0.11).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import TypeVar

import mqtt5

from bench.ingest.publisher import json_payload

_P = TypeVar("_P", bound=mqtt5.Packet)


class _PacketReader:
    """Packets from a blocking socket, cut by ``mqtt5.read``."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()

    def packets(self) -> list[mqtt5.Packet]:
        """At least one packet: what one ``recv`` completed."""
        while True:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("broker closed the connection")
            self._buf += data
            found: list[mqtt5.Packet] = []
            pos = 0
            with memoryview(self._buf) as view:
                while pos < len(self._buf):
                    rest = view[pos:]
                    try:
                        packet, size = mqtt5.read(rest)
                    except IndexError:
                        break
                    finally:
                        rest.release()
                    found.append(packet)
                    pos += size
            del self._buf[:pos]
            if found:
                return found


def _expect(reader: _PacketReader, kind: type[_P]) -> _P:
    (packet,) = reader.packets()
    if not isinstance(packet, kind):
        raise ConnectionError(f"expected {kind.__name__}, got {packet!r}")
    return packet


def create_session(host: str, port: int, client_id: str, topic: str) -> None:
    """Connect with clean start off, subscribe at QoS 1, disconnect: the broker now queues
    ``topic`` for ``client_id`` until it comes back (session expiry one hour)."""
    with socket.create_connection((host, port), timeout=10) as sock:
        reader = _PacketReader(sock)
        sock.sendall(
            mqtt5.ConnectPacket(
                client_id, clean_start=False, keep_alive=60, session_expiry_interval=3600
            ).write()
        )
        _expect(reader, mqtt5.ConnAckPacket)
        topic_filter = mqtt5.TopicFilter(topic, max_qos=mqtt5.QoS.AT_LEAST_ONCE)
        sock.sendall(mqtt5.SubscribePacket(1, [topic_filter]).write())
        _expect(reader, mqtt5.SubAckPacket)
        sock.sendall(mqtt5.DisconnectPacket().write())


def preload(
    host: str,
    port: int,
    topic: str,
    count: int,
    *,
    payload_bytes: int = 1024,
    window: int = 5000,
    chunk: int = 200,
) -> float:
    """Publish seq 0..count-1 at QoS 1; return the seconds until the broker acked them all."""
    acked = 0
    with socket.create_connection((host, port), timeout=30) as sock:
        reader = _PacketReader(sock)
        sock.sendall(
            mqtt5.ConnectPacket("fedgate-bench-preload", clean_start=True, keep_alive=60).write()
        )
        connack = _expect(reader, mqtt5.ConnAckPacket)
        window = min(window, connack.receive_max)
        chunk = min(chunk, window)
        released = threading.Semaphore(window)

        def count_pubacks() -> None:
            nonlocal acked
            while acked < count:
                try:
                    packets = reader.packets()
                except (ConnectionError, OSError):
                    return
                for packet in packets:
                    if isinstance(packet, mqtt5.PubAckPacket):
                        acked += 1
                        released.release()

        counter = threading.Thread(target=count_pubacks, daemon=True)
        started = time.monotonic()
        counter.start()
        batch: list[bytes] = []
        for seq in range(count):
            released.acquire()
            batch.append(
                mqtt5.PublishPacket(
                    topic,
                    json_payload(seq, payload_bytes),
                    qos=mqtt5.QoS.AT_LEAST_ONCE,
                    packet_id=seq % 65535 + 1,
                ).write()
            )
            if len(batch) >= chunk:
                sock.sendall(b"".join(batch))
                batch.clear()
        if batch:
            sock.sendall(b"".join(batch))
        counter.join(timeout=120)
        if acked < count:
            raise TimeoutError(f"the broker acknowledged {acked} of {count} messages")
        elapsed = time.monotonic() - started
        sock.sendall(mqtt5.DisconnectPacket().write())
    return elapsed
