"""OPC-UA ingestion against a real asyncua server in a subprocess, into a real buffer.

The server (``opcua_test_server.py``) logs every value it writes. The test freezes it
(SIGSTOP: a dead link the watchdog must notice), restarts it, and then compares the buffer
with the log: everything written while a subscription existed is stored, exactly once;
the only values missing are those written before the first subscription and between the
restart and the resubscription, which OPC-UA subscriptions never deliver.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.ua.status_codes import StatusCodes
from fedgate_agent.ingest.buffer import BufferSettings, IngestBuffer
from fedgate_agent.ingest.errors import MalformedPayload, SourceError
from fedgate_agent.ingest.opcua_source import (
    OpcUaIngest,
    OpcUaIngestSettings,
    OpcUaNode,
    data_value_to_sample,
)
from fedgate_common.backoff import Backoff
from fedgate_common.tasks import cancel_until_done

from tests.net_support import free_port, port_open

SERVER = Path(__file__).with_name("opcua_test_server.py")
RATE_HZ = 50
MISSING_NODE = "ns=2;s=does.not.exist"


@dataclass
class ServerRuns:
    """Starts the test server on one port and log file; every start is a new run."""

    port: int
    log: Path
    shelf: Path
    process: subprocess.Popen[bytes] | None = None
    runs: int = 0

    async def start(self) -> None:
        self.runs += 1
        command = [sys.executable, str(SERVER), str(self.port), str(self.log)]
        command += [str(self.runs), str(RATE_HZ), str(self.shelf)]
        self.process = await asyncio.to_thread(
            subprocess.Popen, command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the OPC-UA test server exited"
            if port_open(self.port):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the OPC-UA test server did not listen on {self.port}")

    def signal(self, number: signal.Signals) -> None:
        assert self.process is not None
        os.kill(self.process.pid, number)

    async def stop(self) -> None:
        """SIGTERM: the server stops writing, lets subscribers catch up, then exits."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGCONT)
        self.process.terminate()
        await asyncio.to_thread(self.process.wait, 10)
        self.process = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerRuns]:
    runs = ServerRuns(port=free_port(), log=tmp_path / "written.csv", shelf=tmp_path / "aspace")
    yield runs
    if runs.process is not None:
        runs.process.send_signal(signal.SIGCONT)
        runs.process.kill()
        runs.process.wait(10)


async def wait_until(condition: Callable[[], bool], what: str, limit_s: float = 20) -> float:
    """Poll ``condition``; returns how long it took to become true."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > limit_s:
            raise AssertionError(f"timed out after {limit_s} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def read_log(path: Path) -> dict[str, list[tuple[int, int, float]]]:
    """node id → [(run, timestamp µs, value)] in the order written."""
    written: dict[str, list[tuple[int, int, float]]] = {}
    for line in path.read_text().splitlines():
        node_id, micros, value = line.split(",")
        written.setdefault(node_id, []).append(
            (int(float(value)) // 1_000_000, int(micros), float(value))
        )
    return written


async def test_server_freeze_and_restart_lose_nothing_that_was_delivered(
    tmp_path: Path, server: ServerRuns
) -> None:
    await server.start()
    endpoint = f"opc.tcp://127.0.0.1:{server.port}/fedgate/"
    nodes = (
        OpcUaNode("ns=2;s=counter", "COUNTER"),
        OpcUaNode("ns=2;s=wave", "WAVE"),
        OpcUaNode(MISSING_NODE, "NOT_THERE"),
    )
    settings = OpcUaIngestSettings(
        endpoint=endpoint,
        nodes=nodes,
        publishing_interval_ms=50,
        batch_wait_s=0.05,
        watchdog_interval_s=0.5,
        request_timeout_s=1.0,
        backoff=Backoff(initial_s=0.05, max_s=0.3),
    )
    with IngestBuffer.open(BufferSettings(path=tmp_path / "buffer.db")) as buffer:
        ingest = OpcUaIngest(settings=settings, sink=buffer)
        counters = ingest.counters
        task = asyncio.create_task(ingest.run())
        try:
            await wait_until(lambda: counters.stored >= 50, "the first samples")

            # A frozen server (a dead link that does not close the socket). It pauses its
            # writes first, so nothing it writes can be stuck in an unsent publish.
            server.signal(signal.SIGUSR1)
            await asyncio.sleep(0.3)
            server.signal(signal.SIGSTOP)
            detected = await wait_until(lambda: not counters.connected, "the watchdog")
            await asyncio.sleep(0.5)
            server.signal(signal.SIGCONT)
            await wait_until(lambda: counters.reconnects == 1 and counters.connected, "reconnect")
            # Both nodes' current values come again with their timestamps: duplicates.
            await wait_until(lambda: counters.duplicates >= 2, "re-sent values")
            server.signal(signal.SIGUSR2)
            stored = counters.stored
            await wait_until(lambda: counters.stored >= stored + 50, "samples after the freeze")

            # A restart: stopped, down for half a second, started again.
            await server.stop()
            await wait_until(lambda: not counters.connected, "the server's shutdown")
            await asyncio.sleep(0.5)
            await server.start()
            restarted = time.monotonic()
            await wait_until(lambda: counters.reconnects == 2 and counters.connected, "resubscribe")
            resubscribed = time.monotonic() - restarted
            stored = counters.stored
            await wait_until(lambda: counters.stored >= stored + 50, "samples after the restart")
            await server.stop()
            await wait_until(lambda: not counters.connected, "the final shutdown")
            await asyncio.sleep(0.2)
        finally:
            await cancel_until_done([task])

        assert ingest.queue_depth == 0  # what was received was handed to the buffer
        written = read_log(server.log)
        series = buffer.read_series(["COUNTER", "WAVE"])

    gap_values = 0
    gap_seconds = 0.0
    for node, tag in zip(nodes[:2], ("COUNTER", "WAVE"), strict=True):
        ts, values = series[tag]
        stored_pairs = [
            (round(t * 1e6), v) for t, v in zip(ts.tolist(), values.tolist(), strict=True)
        ]
        stored_set = set(stored_pairs)
        log = written[node.node_id]
        assert len(stored_set) == len(stored_pairs), "a value was stored twice"
        assert stored_set <= {(micros, value) for _, micros, value in log}, (
            "stored values not written"
        )
        for run in (1, 2):
            produced = [(micros, value) for r, micros, value in log if r == run]
            first = next(i for i, pair in enumerate(produced) if pair in stored_set)
            # From the first delivered value on, every value the server produced is stored,
            # across the freeze (run 1) and up to the server's shutdown.
            assert produced[first:] == [p for p in produced[first:] if p in stored_set]
            lost = produced[:first]
            if run == 2 and lost:
                gap_values = max(gap_values, len(lost))
                gap_seconds = max(gap_seconds, (produced[first][0] - lost[0][0]) / 1e6)
    # What OPC-UA never delivers: values written after the restart, before resubscribing.
    assert gap_seconds <= resubscribed + 0.5
    print(
        f"\nfreeze detected in {detected:.2f} s; restart: resubscribed {resubscribed:.2f} s after "
        f"the server listened; gap {gap_values} values ({gap_seconds:.2f} s) per node, never "
        f"delivered; duplicates recognised: {counters.duplicates}"
    )

    assert counters.reconnects == 2
    assert counters.failed_nodes == {MISSING_NODE: "BadNodeIdUnknown"}
    assert counters.node_errors == 3  # once per session, the others kept flowing
    assert counters.per_node_received[MISSING_NODE] == 0
    assert counters.dropped_overflow == counters.bad_quality == counters.store_errors == 0
    assert counters.stored == sum(len(series[tag][0]) for tag in ("COUNTER", "WAVE"))


def test_data_changes_become_samples_keyed_by_source_timestamp() -> None:
    node = OpcUaNode("ns=2;s=x", "X")
    moment = ua.DateTime.fromtimestamp(int(time.time()) - 60, UTC).replace(microsecond=123456)
    micros = int(moment.timestamp()) * 1_000_000 + 123_456
    value = ua.DataValue(ua.Variant(2.5, ua.VariantType.Double), SourceTimestamp=moment)
    sample = data_value_to_sample("opc.tcp://h:4840/", node, value)
    assert sample.source == "opcua:opc.tcp://h:4840/#ns=2;s=x"
    assert sample.seq == micros
    assert sample.ts == pytest.approx(micros / 1e6)
    assert (sample.tag, sample.value) == ("X", 2.5)
    # No source timestamp: the server's; booleans are 0 / 1.
    flag = ua.DataValue(ua.Variant(True, ua.VariantType.Boolean), ServerTimestamp=moment)
    assert data_value_to_sample("e", node, flag).value == 1.0
    # A device clock that was never set (every change stamped alike, decades back), or one
    # over an hour ahead: the server's stamp instead (as the bridge takes it), and without
    # one the change is refused.
    unset = ua.DateTime(2001, 1, 1, tzinfo=UTC)
    ahead = ua.DateTime.fromtimestamp(time.time() + 7200, UTC)
    for stamp, reason in ((unset, "ts_in_past"), (ahead, "ts_in_future")):
        reading = ua.Variant(3.0, ua.VariantType.Double)
        both = ua.DataValue(reading, SourceTimestamp=stamp, ServerTimestamp=moment)
        assert data_value_to_sample("e", node, both).seq == micros
        with pytest.raises(MalformedPayload) as refused:
            data_value_to_sample("e", node, ua.DataValue(reading, SourceTimestamp=stamp))
        assert refused.value.reason == reason


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (ua.DataValue(ua.Variant("on", ua.VariantType.String)), "not_numeric"),
        (ua.DataValue(ua.Variant(math.nan, ua.VariantType.Double)), "not_finite"),
        (
            ua.DataValue(
                ua.Variant(1.0, ua.VariantType.Double),
                StatusCode=ua.StatusCode(ua.UInt32(StatusCodes.BadSensorFailure)),
            ),
            "bad_quality",
        ),
        (
            ua.DataValue(
                ua.Variant(1.0, ua.VariantType.Double),
                StatusCode=ua.StatusCode(ua.UInt32(StatusCodes.UncertainSensorNotAccurate)),
            ),
            "bad_quality",
        ),
        (ua.DataValue(ua.Variant(1.0, ua.VariantType.Double)), "no_timestamp"),
    ],
)
def test_unusable_data_changes_are_refused_with_a_reason(value: ua.DataValue, reason: str) -> None:
    if reason != "no_timestamp":
        value.SourceTimestamp = ua.DateTime.fromtimestamp(time.time() - 60, UTC)
    with pytest.raises(MalformedPayload) as caught:
        data_value_to_sample("e", OpcUaNode("ns=2;s=x", "X"), value)
    assert caught.value.reason == reason


def test_settings_refuse_what_cannot_work() -> None:
    with pytest.raises(SourceError) as caught:
        OpcUaIngestSettings(
            endpoint="opc.tcp://user:secret@127.0.0.1:4840/",
            nodes=(
                OpcUaNode("not a node id", "A"),
                OpcUaNode("ns=2;s=b", "A"),
                OpcUaNode("ns=2;s=c", "C\n"),
            ),
            queue_size=0,
        )
    message = str(caught.value)
    for expected in (
        "credentials",
        "not an OPC-UA node id",
        "same tag",
        "queue_size",
        "node 'ns=2;s=c': tag 'C\\n' contains the control character U+000A",
    ):
        assert expected in message
