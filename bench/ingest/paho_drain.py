"""Reference row: how fast paho-mqtt 2 alone drains a backlog with ``manual_ack=True``.

No decoding, no storage: on_message keeps the packet id, the network thread acknowledges
everything received so far every 10 ms (``client.ack`` from paho's own thread). This is the
ceiling an ingest built on paho's client could reach, and why the ingest drives the socket
itself around the ``mqtt5`` codec (:mod:`fedgate_agent.ingest.mqtt_source`). Prints one
JSON line like :mod:`bench.ingest.consumer`.

    .venv/bin/python -m bench.ingest.paho_drain --port 1883 --client-id paho-1 --until 200000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def drain(host: str, port: int, client_id: str, until: int, timeout_s: float) -> dict[str, Any]:
    mids: list[int] = []

    def on_message(_client: Any, _userdata: Any, message: Any) -> None:
        mids.append(message.mid)

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=True,
    )
    client.on_message = on_message
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 3600
    properties.ReceiveMaximum = 65535
    started = time.monotonic()
    cpu_started = _cpu_seconds()
    client.connect(host, port, clean_start=False, properties=properties)
    acked = 0
    deadline = started + timeout_s
    while acked < until and time.monotonic() < deadline:
        client.loop(0.01)
        for mid in mids[acked:]:
            client.ack(mid, 1)
        acked = len(mids)
    client.loop(0.01)
    seconds = time.monotonic() - started
    cpu = _cpu_seconds() - cpu_started
    client.disconnect()
    return {"committed": acked, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--until", type=int, required=True)
    parser.add_argument("--cpu", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    print(json.dumps(drain(args.host, args.port, args.client_id, args.until, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
