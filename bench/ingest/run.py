"""Durable MQTT ingest benchmark: drain rate of a QoS 1 backlog into the buffer, side by side
with ``mosquitto_sub`` writing the same backlog to a file, on the same broker, in one run.

    .venv/bin/python -m bench.ingest.run                 # 200,000 messages of 1 KB
    .venv/bin/python -m bench.ingest.run --count 50000 --no-paho
    .venv/bin/python -m bench.ingest.run --quick         # 3,000 messages, seconds
    .venv/bin/python -m bench.ingest.run --broker-settings   # Mosquitto's limits, MQTT 5

Steps: a private Mosquitto (tuned: unlimited queue and in-flight, no persistence) on a free
loopback port, pinned to CPU 0; a persistent QoS 1 session per consumer; N messages
published while every consumer is offline, so each session holds the same backlog; then,
one after the other, each consumer drains its backlog pinned to CPU 1:

- ``mosquitto_sub -q 1 -c -i <id> -C N -t <topic> > file`` (C, acks each message on arrival);
- ``paho manual_ack``: paho-mqtt 2 acknowledging from its loop, no decoding or storage
  (reference for what a paho-based ingest could reach; ``--no-paho`` leaves it out);
- ``fedgate ingest``: :class:`~fedgate_agent.ingest.mqtt_source.MqttIngest` (MQTT 5, the
  ``mqtt5`` codec) into a fresh :class:`~fedgate_agent.ingest.buffer.IngestBuffer` (WAL,
  ``synchronous=FULL``), acks after each commit, until N messages are committed — the
  buffer is then checked to hold N.

msg/s is N over the drain's wall time (process start to last message); CPU is the
consumer's user+system time (``wait4`` rusage for mosquitto_sub, ``getrusage`` inside the
Python consumers). Prints one table on stdout; see bench/ingest/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedgate_agent.ingest.buffer import IngestBuffer
from fedgate_common.text_table import format_table

from bench.ingest.preload import create_session, preload

MOSQUITTO = Path("/usr/sbin/mosquitto")
MOSQUITTO_SUB = Path("/usr/bin/mosquitto_sub")
TOPIC = "bench/line1/XMEAS_1"
FEDGATE_CLIENT = "bench-fedgate"
TARGET_RATE = 20_000
HEADERS = (
    "consumer",
    "messages",
    "seconds",
    "msg/s",
    "vs mosquitto_sub",
    "CPU s / 1000 msg",
    "commits (fsync)",
    "msg / commit",
)
BROKER_BASE = "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
TUNED = "max_queued_messages 0\nmax_inflight_messages 0\n"
#: Broker configurations measured by ``--broker-settings`` (added to BROKER_BASE).
BROKER_VARIANTS = {
    "mosquitto defaults": "",
    "max_queued_messages 0": "max_queued_messages 0\n",
    "max_queued_messages 0, max_inflight_messages 0": TUNED,
}
SETTINGS_HEADERS = (
    "broker config",
    "backlog delivered",
    "backlog msg/s",
    "burst delivered",
)


@dataclass(frozen=True)
class Drain:
    consumer: str
    messages: int
    seconds: float
    cpu_seconds: float
    commits: int | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cpus() -> tuple[int | None, int | None]:
    """(broker CPU, consumer CPU): two different cores when there are two."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[0], available[1]


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


@contextlib.contextmanager
def mosquitto(directory: Path, cpu: int | None, settings: str = TUNED) -> Iterator[int]:
    port = free_port()
    conf = directory / f"mosquitto-{port}.conf"
    conf.write_text(BROKER_BASE.format(port=port) + settings)
    process = subprocess.Popen(
        [str(MOSQUITTO), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: _pin(cpu),
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {process.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto does not listen on {port}")
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def _mosquitto_sub(port: int) -> list[str]:
    """``mosquitto_sub`` (MQTT 3.1.1, its default) resuming the persistent session
    ``bench-mosquitto-sub`` at QoS 1."""
    command = [str(MOSQUITTO_SUB), "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-c"]
    return [*command, "-i", "bench-mosquitto-sub", "-t", TOPIC]


def create_mosquitto_sub_session(port: int) -> None:
    """The session is registered by mosquitto_sub itself (``-E``: exit once subscribed), so
    that it is drained by the client and protocol version that made it."""
    subprocess.run([*_mosquitto_sub(port), "-E"], check=True, timeout=30)


def drain_mosquitto_sub(port: int, count: int, out: Path, cpu: int | None) -> Drain:
    started = time.monotonic()
    command = [*_mosquitto_sub(port), "-C", str(count)]
    with out.open("wb") as file:
        process = subprocess.Popen(
            command,
            stdout=file,
            preexec_fn=lambda: _pin(cpu),
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"mosquitto_sub exited with {process.returncode}")
    lines = sum(1 for _ in out.open("rb"))
    if lines != count:
        raise RuntimeError(f"mosquitto_sub wrote {lines} of {count} messages")
    return Drain("mosquitto_sub -q 1 > file", count, seconds, usage.ru_utime + usage.ru_stime)


def _start_python_consumer(module: str, args: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def _consumer_result(process: subprocess.Popen[str], timeout_s: float) -> dict[str, float]:
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    if process.returncode != 0:
        raise RuntimeError(f"{process.args!r} failed: {stderr[-2000:]}")
    result: dict[str, float] = json.loads(stdout.strip().splitlines()[-1])
    return result


def _python_consumer(module: str, args: Sequence[str], timeout_s: float) -> dict[str, float]:
    return _consumer_result(_start_python_consumer(module, args), timeout_s)


def drain_paho(port: int, count: int, cpu: int | None, timeout_s: float) -> Drain:
    args = ["--port", str(port), "--client-id", "bench-paho", "--until", str(count)]
    if cpu is not None:
        args += ["--cpu", str(cpu)]
    result = _python_consumer("bench.ingest.paho_drain", args, timeout_s)
    if result["committed"] < count:
        raise RuntimeError(f"paho drained {result['committed']} of {count} in {timeout_s} s")
    return Drain("paho manual_ack, no storage", count, result["seconds"], result["cpu_seconds"])


def drain_fedgate(
    port: int,
    count: int,
    buffer: Path,
    cpu: int | None,
    timeout_s: float,
    *,
    batch_max: int,
    idle_exit_s: float = 0.0,
    live_publish: Callable[[], object] | None = None,
) -> Drain:
    """Drain with the fedgate consumer; with ``idle_exit_s`` it may stop short of ``count``
    (then ``messages`` says how many arrived). With ``live_publish`` the consumer is
    subscribed first and the messages are published while it runs."""
    args = ["--port", str(port), "--client-id", FEDGATE_CLIENT, "--topic", TOPIC]
    args += ["--buffer", str(buffer), "--until", str(count)]
    args += ["--batch-max", str(batch_max), "--queue-max", str(max(20_000, 4 * batch_max))]
    args += ["--idle-exit", str(idle_exit_s)]
    if cpu is not None:
        args += ["--cpu", str(cpu)]
    ready = buffer.with_suffix(".subscribed")
    if live_publish is not None:
        args += ["--ready-file", str(ready)]
    process = _start_python_consumer("bench.ingest.consumer", args)
    if live_publish is not None:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the consumer did not subscribe: {_consumer_result(process, 5)}"
                )
            time.sleep(0.02)
        live_publish()
    result = _consumer_result(process, timeout_s)
    with IngestBuffer.open_read_only(buffer) as stored:
        samples = stored.stats().samples
    if samples != result["committed"] or (not idle_exit_s and samples != count):
        raise RuntimeError(f"the buffer holds {samples} samples, expected {count}")
    return Drain(
        "fedgate ingest, MQTT 5",
        samples,
        result["seconds"],
        result["cpu_seconds"],
        int(result["commits"]),
    )


def measure_broker_settings(count: int, timeout_s: float) -> list[list[object]]:
    """How Mosquitto's queue and in-flight limits shape what the ingest receives, for each
    configuration: ``count`` messages published while the ingest is offline (a backlog),
    and ``count`` published at full speed while it is subscribed (a burst). Each drain
    stops 3 s after its last commit."""
    broker_cpu, consumer_cpu = _cpus()
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="fedgate-bench-ingest-") as tmp:
        directory = Path(tmp)
        for name, settings in BROKER_VARIANTS.items():
            with mosquitto(directory, broker_cpu, settings) as port:
                create_session("127.0.0.1", port, FEDGATE_CLIENT, TOPIC)
                preload("127.0.0.1", port, TOPIC, count)
                backlog = drain_fedgate(
                    port,
                    count,
                    directory / f"backlog-{port}.db",
                    consumer_cpu,
                    timeout_s,
                    batch_max=2000,
                    idle_exit_s=3.0,
                )
                burst = drain_fedgate(
                    port,
                    count,
                    directory / f"burst-{port}.db",
                    consumer_cpu,
                    timeout_s,
                    batch_max=2000,
                    idle_exit_s=3.0,
                    live_publish=functools.partial(preload, "127.0.0.1", port, TOPIC, count),
                )
            rows.append([name, backlog.messages, round(backlog.rate), burst.messages])
            print(f"{name}: {rows[-1][1:]}", file=sys.stderr)
    return rows


def table_row(drain: Drain, reference: Drain) -> list[object]:
    commits = drain.commits
    return [
        drain.consumer,
        drain.messages,
        round(drain.seconds, 2),
        round(drain.rate),
        f"{drain.rate / reference.rate:.2f}",
        round(drain.cpu_seconds / drain.messages * 1000, 4),
        commits,
        None if not commits else round(drain.messages / commits),
    ]


def run(
    *,
    count: int,
    payload_bytes: int,
    with_paho: bool,
    batch_max: int,
    timeout_s: float,
) -> list[Drain]:
    if not MOSQUITTO.exists() or not MOSQUITTO_SUB.exists():
        raise FileNotFoundError("needs mosquitto and mosquitto_sub (apt install mosquitto-clients)")
    broker_cpu, consumer_cpu = _cpus()
    with tempfile.TemporaryDirectory(prefix="fedgate-bench-ingest-") as tmp:
        directory = Path(tmp)
        with mosquitto(directory, broker_cpu) as port:
            create_mosquitto_sub_session(port)
            if with_paho:
                create_session("127.0.0.1", port, "bench-paho", TOPIC)
            create_session("127.0.0.1", port, FEDGATE_CLIENT, TOPIC)
            seconds = preload("127.0.0.1", port, TOPIC, count, payload_bytes=payload_bytes)
            print(f"preloaded {count} messages in {seconds:.1f} s", file=sys.stderr)
            drains = [drain_mosquitto_sub(port, count, directory / "sub.out", consumer_cpu)]
            print(f"{drains[-1].consumer}: {drains[-1].rate:.0f} msg/s", file=sys.stderr)
            if with_paho:
                drains.append(drain_paho(port, count, consumer_cpu, timeout_s))
                print(f"{drains[-1].consumer}: {drains[-1].rate:.0f} msg/s", file=sys.stderr)
            drains.append(
                drain_fedgate(
                    port,
                    count,
                    directory / "buffer.db",
                    consumer_cpu,
                    timeout_s,
                    batch_max=batch_max,
                )
            )
            print(f"{drains[-1].consumer}: {drains[-1].rate:.0f} msg/s", file=sys.stderr)
    return drains


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--payload-bytes", type=int, default=1024)
    parser.add_argument("--batch-max", type=int, default=2000)
    parser.add_argument("--no-paho", action="store_true", help="leave out the paho row")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--quick", action="store_true", help="3,000 messages: a smoke run")
    parser.add_argument(
        "--broker-settings",
        action="store_true",
        help="instead: what Mosquitto's queue/in-flight limits deliver (20,000 messages)",
    )
    args = parser.parse_args(argv)
    if args.broker_settings:
        rows = measure_broker_settings(
            20_000 if args.count == 200_000 else args.count, args.timeout
        )
        print(format_table(SETTINGS_HEADERS, rows))
        return 0
    count = 3000 if args.quick else args.count
    drains = run(
        count=count,
        payload_bytes=args.payload_bytes,
        with_paho=not args.no_paho,
        batch_max=args.batch_max,
        timeout_s=args.timeout,
    )
    reference = drains[0]
    print(format_table(HEADERS, [table_row(d, reference) for d in drains]))
    fedgate = next(d for d in drains if d.commits is not None)
    print(
        f"\ntarget: >= {TARGET_RATE} msg/s and >= 0.5 x mosquitto_sub; "
        f"fedgate: {fedgate.rate:.0f} msg/s, {fedgate.rate / reference.rate:.2f} x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
