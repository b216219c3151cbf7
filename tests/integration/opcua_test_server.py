"""A small OPC-UA server for the ingestion tests, run as a subprocess so it can be restarted.

Usage: ``python opcua_test_server.py PORT LOG_FILE RUN RATE_HZ [SHELF_FILE]``

Serves ``ns=2;s=counter`` and ``ns=2;s=wave`` (Double) at ``opc.tcp://127.0.0.1:PORT/fedgate/``
and writes both ``RATE_HZ`` times a second with explicit, strictly increasing source
timestamps (SHELF_FILE caches the standard address space: a restart takes about a second
instead of five). Every value is appended to LOG_FILE (``node_id,timestamp_us,value``) right after
it was written, so the test knows exactly what the server produced. Values are unique
across runs (``RUN * 1e6 + i``).

Signals: SIGUSR1 pauses writing, SIGUSR2 resumes, SIGTERM stops gracefully: no new values,
then half a second for subscribers to receive the last ones, then the server stops.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import sys
import time
from datetime import UTC, timedelta
from pathlib import Path

from asyncua import ua
from asyncua.server.server import Server

NODES = ("counter", "wave")
NAMESPACE = "urn:fedgate:ingest-test"
ENDPOINT_PATH = "/fedgate/"


async def serve(port: int, log_path: str, run: int, rate_hz: float, shelf: Path | None) -> None:
    server = Server()
    await server.init(shelf)
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}{ENDPOINT_PATH}")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    index = await server.register_namespace(NAMESPACE)
    folder = await server.nodes.objects.add_folder(
        ua.NodeId.from_string(f"ns={index};s=plant"), "plant"
    )
    variables = [
        await folder.add_variable(
            ua.NodeId.from_string(f"ns={index};s={name}"),
            name,
            ua.Variant(0.0, ua.VariantType.Double),
        )
        for name in NODES
    ]
    stop = asyncio.Event()
    running = asyncio.Event()
    running.set()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, running.clear)
    loop.add_signal_handler(signal.SIGUSR2, running.set)
    epoch = ua.DateTime(1970, 1, 1, tzinfo=UTC)
    last_us = 0
    count = 0
    async with server:
        print("ready", flush=True)
        with open(log_path, "a", encoding="utf-8") as log:  # noqa: ASYNC230 (a test log)
            while not stop.is_set():
                await running.wait()
                count += 1
                for name, variable in zip(NODES, variables, strict=True):
                    last_us = max(time.time_ns() // 1000, last_us + 1)
                    value = (
                        run * 1_000_000
                        + count
                        + (0.5 + 0.25 * math.sin(count / 10) if name == "wave" else 0)
                    )
                    stamp = epoch + timedelta(microseconds=last_us)
                    await variable.write_value(
                        ua.DataValue(
                            ua.Variant(value, ua.VariantType.Double),
                            SourceTimestamp=stamp,
                            ServerTimestamp=stamp,
                        )
                    )
                    log.write(f"ns={index};s={name},{last_us},{value!r}\n")
                log.flush()
                await asyncio.sleep(1 / rate_hz)
        await asyncio.sleep(0.5)  # let subscribers receive the last values


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    shelf_file = Path(sys.argv[5]) if len(sys.argv) > 5 else None
    if shelf_file is not None and Path(f"{shelf_file}.dat").is_file():
        shelf_file.touch()  # asyncua looks for the shelf under its own name; dbm.dumb adds suffixes
    asyncio.run(
        serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), shelf_file)
    )
