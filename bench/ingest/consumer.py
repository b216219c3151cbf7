"""The fedgate MQTT ingest as a process of its own: a buffer file and one subscription.

    .venv/bin/python -m bench.ingest.consumer --port 1883 --client-id agent-1 \\
        --topic 'plant/+/+' --buffer /tmp/buffer.db [--until 200000] [--cpu 1]

Runs until SIGTERM/SIGINT (then leaves with DISCONNECT), with ``--until N`` until N
messages are committed, with ``--idle-exit S`` until nothing was committed for S seconds
(seconds then end at the last commit); then prints one JSON line: committed, seconds from the first
connection attempt to the N-th commit, CPU seconds of this process over that time, commits
(one fsync each), duplicates. ``--ready-file`` is created once the subscription is up. The
integration tests SIGKILL this process at random moments (tests/integration).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fedgate_agent.ingest.buffer import BufferSettings, CapPolicy, IngestBuffer
from fedgate_agent.ingest.mqtt_source import MqttIngest, MqttIngestSettings, MqttSubscription
from fedgate_common.logs import configure_logging


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def consume(args: argparse.Namespace) -> dict[str, object]:
    settings = MqttIngestSettings(
        host=args.host,
        port=args.port,
        client_id=args.client_id,
        subscriptions=(MqttSubscription(args.topic, format=args.format, tag=args.tag),),
        batch_max=args.batch_max,
        batch_wait_s=args.batch_wait,
        queue_max=args.queue_max,
    )
    buffer = IngestBuffer.open(
        BufferSettings(Path(args.buffer), max_samples=args.max_samples, policy=args.policy)
    )
    ingest = MqttIngest(settings=settings, buffer=buffer)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    cpu_started = _cpu_seconds()
    task = asyncio.create_task(ingest.run())
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    finished_at = cpu_at = None
    try:
        if args.ready_file:
            await ingest.connected.wait()
            Path(args.ready_file).write_bytes(b"")  # noqa: ASYNC240 - one tiny file, once
        last_progress, last_committed = time.monotonic(), 0
        while not task.done():
            committed = ingest.counters.committed
            if args.until and committed >= args.until:
                finished_at, cpu_at = time.monotonic(), _cpu_seconds()
                break
            if committed != last_committed:
                last_progress, last_committed = time.monotonic(), committed
            elif args.idle_exit and time.monotonic() - last_progress > args.idle_exit:
                finished_at, cpu_at = last_progress, _cpu_seconds()
                break
            await asyncio.sleep(0.005)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        buffer.close()
    counters = ingest.counters
    return {
        "committed": counters.committed,
        "seconds": round((finished_at or time.monotonic()) - started, 3),
        "cpu_seconds": round((cpu_at or _cpu_seconds()) - cpu_started, 3),
        "commits": counters.batches,
        "duplicates": counters.duplicates,
        "backpressure_waits": counters.backpressure_waits,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--format", default="json")
    parser.add_argument("--tag", default="")
    parser.add_argument("--buffer", required=True)
    parser.add_argument("--max-samples", type=int, default=5_000_000)
    parser.add_argument("--policy", type=CapPolicy, default=CapPolicy.REJECT_NEW)
    parser.add_argument("--batch-max", type=int, default=2000)
    parser.add_argument("--batch-wait", type=float, default=0.02)
    parser.add_argument("--queue-max", type=int, default=20000)
    parser.add_argument("--until", type=int, default=0)
    parser.add_argument(
        "--idle-exit", type=float, default=0.0, help="stop after this many s without a commit"
    )
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    parser.add_argument("--ready-file", default="")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    configure_logging(args.log_level)
    result = asyncio.run(consume(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
