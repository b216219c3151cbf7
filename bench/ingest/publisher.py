"""An independent QoS 1 publisher process: ``seq`` start..start+count-1, ≈1 KB JSON each.

    .venv/bin/python -m bench.ingest.publisher --port 1883 --topic plant/line1/XMEAS_1 \\
        --count 100000 [--rate 8000] [--client-id pub-1 --persistent]

paho-mqtt with automatic reconnection; with ``--persistent`` the session survives the
broker restarting (clean start off, session expiry), and every message not yet acknowledged
by the broker is sent again after a reconnect. At most ``--window`` messages are
unacknowledged at a time. Exits 0 once the broker acknowledged every message; prints one
JSON line (published, seconds, reconnects) on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

BASE_TS = 1_700_000_000.0


def json_payload(seq: int, size: int = 1024) -> bytes:
    """A valid ingest payload of about ``size`` bytes (padded with a ``unit`` string)."""
    body = {"ts": BASE_TS + seq / 1000, "value": (seq % 1000) * 0.25, "seq": seq, "unit": ""}
    bare = len(json.dumps(body, separators=(",", ":")))
    body["unit"] = "u" * max(0, size - bare)
    return json.dumps(body, separators=(",", ":")).encode()


class _Progress:
    def __init__(self, window: int) -> None:
        self.window = threading.Semaphore(window)
        self.acked = 0
        self.reconnects = 0
        self.connects = 0
        self.done = threading.Event()
        self.target = 0

    def on_publish(self, *_: Any) -> None:
        self.acked += 1
        self.window.release()
        if self.acked >= self.target:
            self.done.set()

    def on_connect(self, *_: Any) -> None:
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1


def publish(
    *,
    host: str,
    port: int,
    topic: str,
    start: int,
    count: int,
    rate: float,
    client_id: str,
    persistent: bool,
    window: int,
    payload_bytes: int,
    timeout_s: float,
) -> dict[str, float]:
    progress = _Progress(window)
    progress.target = count
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    # Unlimited in-flight/queued on the client side: paho's in-flight limit walks every
    # pending message on each PUBACK (quadratic); the window semaphore bounds memory instead.
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.reconnect_delay_set(1, 1)
    client.on_publish = progress.on_publish
    client.on_connect = progress.on_connect
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600 if persistent else 0
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.connect(host, port, clean_start=not persistent, properties=properties)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    client.loop_start()
    started = time.monotonic()
    try:
        for index in range(count):
            if rate > 0:
                ahead = started + index / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            if not progress.window.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"broker stopped acknowledging after {progress.acked}")
            client.publish(topic, json_payload(start + index, payload_bytes), qos=1)
        if not progress.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"only {progress.acked} of {count} acknowledged")
    finally:
        client.disconnect()
        client.loop_stop()
    return {
        "published": count,
        "seconds": round(time.monotonic() - started, 3),
        "reconnects": progress.reconnects,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s; 0 = as fast")
    parser.add_argument("--client-id", default="fedgate-bench-publisher")
    parser.add_argument("--persistent", action="store_true")
    parser.add_argument("--window", type=int, default=2000)
    parser.add_argument("--payload-bytes", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    result = publish(
        host=args.host,
        port=args.port,
        topic=args.topic,
        start=args.start,
        count=args.count,
        rate=args.rate,
        client_id=args.client_id,
        persistent=args.persistent,
        window=args.window,
        payload_bytes=args.payload_bytes,
        timeout_s=args.timeout,
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
