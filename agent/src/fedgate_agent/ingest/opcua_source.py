"""OPC-UA ingestion: subscribe to node ids of one server, store every data change.

One :class:`OpcUaIngest` serves one endpoint. It connects with asyncua, creates one
subscription with a monitored item per node (with a server-side queue, so changes faster
than the publishing interval are queued rather than coalesced), turns every data change
into a :class:`~fedgate_agent.ingest.samples.Sample` and inserts batches into the buffer
from a worker thread.

Identity and deduplication: a sample's ``source`` is ``opcua:<endpoint>#<node id>`` and its
``seq`` the value's SourceTimestamp (else ServerTimestamp) in integer microseconds. After a
reconnect the server sends each node's current value again with its original timestamp;
the buffer's ``UNIQUE(source, seq)`` recognises it and stores nothing twice.

Reconnection: asyncua's watchdog probes the server every ``watchdog_interval_s`` and reports
a dead connection (closed socket, or a probe that times out) through
``connection_lost_callback``. The session is then torn down and an outer loop connects a
fresh client with capped exponential backoff (:class:`fedgate_common.backoff.Backoff`) and
subscribes again. Values a server produced while no subscription existed (between its
restart and the resubscription) are never delivered by OPC-UA subscriptions; everything
delivered is stored.

Bad input is counted, not stored: values with a Bad status code, non-numeric or non-finite
values, values without any timestamp. A node id the server does not know is logged as a
:class:`~fedgate_agent.ingest.errors.SourceError` and counted; the other nodes keep flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from fedgate_common.backoff import Backoff
from fedgate_common.logs import log_event

from fedgate_agent.ingest.errors import MalformedPayload, SourceError
from fedgate_agent.ingest.historian import CountingSink
from fedgate_agent.ingest.samples import (
    MAX_SEQ,
    Sample,
    tag_problem,
    too_far_ahead,
    too_far_behind,
)

__all__ = [
    "OpcUaCounters",
    "OpcUaIngest",
    "OpcUaIngestSettings",
    "OpcUaNode",
    "data_value_to_sample",
    "opcua_source_name",
]

log = logging.getLogger("fedgate.agent.ingest.opcua")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# StatusCode bits (OPC-UA Part 4, 7.39): InfoType "DataValue" and its Overflow flag, set by
# a server whose monitored-item queue discarded values.
_INFO_TYPE_MASK = 0x0C00
_INFO_TYPE_DATA_VALUE = 0x0400
_OVERFLOW_BIT = 0x0080
_DISCONNECT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class OpcUaNode:
    """A node to subscribe to (``ns=2;s=Reactor.Pressure``) and the tag it is stored as."""

    node_id: str
    tag: str


@dataclass(frozen=True)
class OpcUaIngestSettings:
    """One OPC-UA endpoint and what to read from it.

    ``endpoint``: ``opc.tcp://host:port/path`` (no credentials in the URL; use
    ``username`` / ``password``). ``sampling_interval_ms``: requested per monitored item, 0
    = the server's fastest. ``queue_size``: server-side queue per monitored item, so
    changes between two publishes are all delivered. ``publishing_interval_ms``: how often
    the server sends notifications. ``batch_wait_s`` / ``max_batch``: samples are inserted
    in batches of up to ``max_batch``, at most ``batch_wait_s`` after the first one arrived.
    ``max_pending``: bound of the in-memory queue between the subscription and the buffer
    (overflow is counted as ``dropped_overflow``). ``watchdog_interval_s``: how often the
    connection is probed. ``request_timeout_s``: per OPC-UA request. ``backoff``: delays
    between reconnect attempts.
    """

    endpoint: str
    nodes: tuple[OpcUaNode, ...]
    sampling_interval_ms: float = 0.0
    queue_size: int = 100
    publishing_interval_ms: float = 100.0
    batch_wait_s: float = 0.2
    max_batch: int = 5_000
    max_pending: int = 100_000
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    watchdog_interval_s: float = 1.0
    request_timeout_s: float = 4.0
    backoff: Backoff = field(default_factory=lambda: Backoff(initial_s=0.5, max_s=30.0))

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        problems = self.problems()
        if problems:
            raise SourceError(
                f"OPC-UA source {self.endpoint}: " + "; ".join(problems), source=self.endpoint
            )

    def problems(self) -> list[str]:
        """Everything wrong with these settings, each phrased as what to fix."""
        problems: list[str] = []
        url = urlsplit(self.endpoint)
        if url.scheme != "opc.tcp" or not url.hostname:
            problems.append("endpoint must look like opc.tcp://host:4840/path")
        if url.username or url.password:
            problems.append("put credentials in username / password, not in the endpoint URL")
        if not self.nodes:
            problems.append("nodes is empty; list the node ids to subscribe to")
        parsed: list[ua.NodeId] = []
        for node in self.nodes:
            try:
                parsed.append(ua.NodeId.from_string(node.node_id))
            except Exception:  # asyncua raises several types for malformed ids
                problems.append(f"node id {node.node_id!r} is not an OPC-UA node id (ns=2;s=Name)")
            if (why := tag_problem(node.tag)) is not None:
                problems.append(f"node {node.node_id!r}: tag {node.tag!r} {why}")
        if len(set(parsed)) != len(parsed):  # "ns=2;i=5" and "ns=2;i=05" are one node
            problems.append("a node is listed twice (perhaps spelled two ways)")
        tags = [n.tag for n in self.nodes]
        if len(set(tags)) != len(tags):
            problems.append("two nodes map to the same tag")
        if not self.sampling_interval_ms >= 0:
            problems.append("sampling_interval_ms must be >= 0 (0 = the server's fastest)")
        if self.queue_size < 1:
            problems.append("queue_size must be at least 1")
        if not self.publishing_interval_ms > 0:
            problems.append("publishing_interval_ms must be > 0")
        if not self.batch_wait_s >= 0:
            problems.append("batch_wait_s must be >= 0")
        if self.max_batch < 1 or self.max_pending < self.max_batch:
            problems.append("need 1 <= max_batch <= max_pending")
        if not self.watchdog_interval_s > 0 or not self.request_timeout_s > 0:
            problems.append("watchdog_interval_s and request_timeout_s must be > 0")
        if self.password is not None and self.username is None:
            problems.append("password given without username")
        return problems


@dataclass
class OpcUaCounters:
    """What an :class:`OpcUaIngest` has done so far (read them any time; never reset).

    ``received``: data changes received; ``stored`` / ``duplicates``: newly stored /
    already in the buffer; ``bad_quality`` / ``not_numeric`` / ``not_finite`` /
    ``no_timestamp`` / ``ts_in_past`` / ``ts_in_future``: data changes skipped;
    ``server_overflows``: values the server flagged as having overflowed its queue;
    ``dropped_overflow``: samples dropped because the in-memory queue was full;
    ``rejected_full``: refused by a full buffer; ``store_errors``: failed inserts
    (retried); ``connects`` / ``reconnects``: sessions established (first / later ones);
    ``node_errors``: node subscriptions refused; ``failed_nodes``: node id → the server's
    status; ``per_node_received``: node id → data changes.
    """

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    bad_quality: int = 0
    not_numeric: int = 0
    not_finite: int = 0
    no_timestamp: int = 0
    ts_in_past: int = 0
    ts_in_future: int = 0
    server_overflows: int = 0
    dropped_overflow: int = 0
    rejected_full: int = 0
    store_errors: int = 0
    connects: int = 0
    reconnects: int = 0
    node_errors: int = 0
    connected: bool = False
    last_error: str | None = None
    failed_nodes: dict[str, str] = field(default_factory=dict)
    per_node_received: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> dict[str, object]:
        """A copy for status pages and logs."""
        return {
            **{k: v for k, v in vars(self).items() if not isinstance(v, dict)},
            "failed_nodes": dict(self.failed_nodes),
            "per_node_received": dict(self.per_node_received),
        }


def opcua_source_name(endpoint: str, node_id: str) -> str:
    """The buffer ``source`` of a node: one stream per node of one server."""
    return f"opcua:{endpoint}#{node_id}"


def _micros(moment: datetime | None) -> int | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # asyncua's timestamps are UTC
        moment = moment.replace(tzinfo=UTC)
    micros = (moment - _EPOCH) // _MICROSECOND
    # 0 encodes "no timestamp" (it decodes to 1601-01-01); treat it and pre-1970 as absent.
    return micros if 0 < micros <= MAX_SEQ else None


def _numeric(value: Any) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            raise MalformedPayload("integer too large for a float", reason="not_finite") from None
        if not math.isfinite(number):
            raise MalformedPayload(f"value {value!r} is not finite", reason="not_finite")
        return number
    raise MalformedPayload(
        f"value of type {type(value).__name__} is not numeric", reason="not_numeric"
    )


def data_value_to_sample(endpoint: str, node: OpcUaNode, data_value: ua.DataValue) -> Sample:
    """The sample for one data change; :class:`MalformedPayload` (``reason``
    ``bad_quality``, ``not_numeric``, ``not_finite``, ``no_timestamp``, ``ts_in_past`` or
    ``ts_in_future``)
    when it is skipped."""
    status = data_value.StatusCode
    if status is not None and not status.is_good():  # Bad or Uncertain: as the bridge does
        raise MalformedPayload(f"status {status.name}", reason="bad_quality")
    variant = data_value.Value
    value = _numeric(None if variant is None else variant.Value)
    stamps = [
        m
        for m in (_micros(data_value.SourceTimestamp), _micros(data_value.ServerTimestamp))
        if m is not None
    ]
    if not stamps:
        raise MalformedPayload("neither source nor server timestamp", reason="no_timestamp")
    # The source's stamp, unless its clock is a day or more behind (a PLC whose clock was
    # never set stamps every change alike, and windows would find it missing at every grid
    # point) or over an hour ahead: then the server's, as the bridge does.
    plausible = [m for m in stamps if not too_far_behind(m / 1e6) and not too_far_ahead(m / 1e6)]
    if not plausible:
        if all(too_far_ahead(m / 1e6) for m in stamps):
            raise MalformedPayload("stamped ahead of this gateway's clock", reason="ts_in_future")
        raise MalformedPayload(
            "stamped a day or more behind this gateway's clock", reason="ts_in_past"
        )
    micros = plausible[0]
    return Sample(
        source=opcua_source_name(endpoint, node.node_id),
        seq=micros,
        tag=node.tag,
        ts=micros / 1e6,
        value=value,
    )


class _SubscriptionHandler:
    """asyncua's callback target: hands every data change to the ingest, never blocks."""

    def __init__(self, ingest: OpcUaIngest, nodes: dict[ua.NodeId, OpcUaNode]) -> None:
        self._ingest = ingest
        self._nodes = nodes

    def datachange_notification(self, node: Node, val: Any, data: Any) -> None:
        configured = self._nodes.get(node.nodeid)
        if configured is not None:
            self._ingest.on_data_change(configured, data.monitored_item.Value)

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        self._ingest.on_status_change(status)


class OpcUaIngest:
    """Subscribe to ``settings.nodes`` and store every data change in ``sink``.

    ``sink`` is the :class:`~fedgate_agent.ingest.buffer.IngestBuffer` (its ``insert`` runs
    in a worker thread). Run :meth:`run` as a task; cancel it to stop (samples received
    so far are inserted before it returns). :attr:`counters` says what happened.
    """

    def __init__(self, *, settings: OpcUaIngestSettings, sink: CountingSink) -> None:
        self.settings = settings
        self.counters = OpcUaCounters(
            per_node_received={node.node_id: 0 for node in settings.nodes}
        )
        self._sink = sink
        self._pending: asyncio.Queue[Sample] = asyncio.Queue(maxsize=settings.max_pending)
        self._lost: asyncio.Event | None = None
        self._lost_reason = ""

    @property
    def queue_depth(self) -> int:
        """Samples received and not yet handed to the buffer."""
        return self._pending.qsize()

    # --- callbacks from asyncua (event loop thread, must not block) ---------------------

    def on_data_change(self, node: OpcUaNode, data_value: ua.DataValue) -> None:
        counters = self.counters
        counters.received += 1
        counters.per_node_received[node.node_id] = (
            counters.per_node_received.get(node.node_id, 0) + 1
        )
        status = data_value.StatusCode
        if status is not None and (
            status.value & _INFO_TYPE_MASK == _INFO_TYPE_DATA_VALUE and status.value & _OVERFLOW_BIT
        ):
            counters.server_overflows += 1
        try:
            sample = data_value_to_sample(self.settings.endpoint, node, data_value)
        except MalformedPayload as skipped:
            setattr(counters, skipped.reason, getattr(counters, skipped.reason) + 1)
            return
        try:
            self._pending.put_nowait(sample)
        except asyncio.QueueFull:
            counters.dropped_overflow += 1
            if counters.dropped_overflow % 1000 == 1:
                log_event(
                    log,
                    logging.WARNING,
                    "OPC-UA samples dropped: the buffer does not keep up",
                    endpoint=self.settings.endpoint,
                    dropped=counters.dropped_overflow,
                )

    def on_status_change(self, status: ua.StatusChangeNotification) -> None:
        code = status.Status
        if code is not None and not code.is_good():
            self._connection_lost(f"subscription status {code.name}")

    def _connection_lost(self, reason: str) -> None:
        self._lost_reason = reason
        if self._lost is not None:
            self._lost.set()

    # --- the two long-running loops ------------------------------------------------------

    async def run(self) -> None:
        """Ingest until cancelled: keep a subscription alive and store what it delivers.

        The connection loop runs in this task and the store loop beside it; on
        cancellation the session is closed first, then the store loop inserts what is
        still queued, so nothing received is left behind.
        """
        async with asyncio.TaskGroup() as group:
            group.create_task(self._store_loop(), name="opcua-store")
            await self._connect_loop()

    async def _connect_loop(self) -> None:
        attempt = 0
        while True:
            try:
                await self._session()
            except Exception as exc:  # any failure of the session means: reconnect
                self.counters.last_error = f"{type(exc).__name__}: {exc}"
            if self.counters.connected:
                attempt = 0
            self.counters.connected = False
            delay = self.settings.backoff.delay(attempt, random.random())
            log_event(
                log,
                logging.WARNING,
                "OPC-UA connection lost or refused; reconnecting",
                endpoint=self.settings.endpoint,
                error=self.counters.last_error,
                attempt=attempt,
                delay_s=round(delay, 3),
            )
            attempt += 1
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One connection: connect, subscribe, wait until the connection dies."""
        settings = self.settings
        client = Client(
            url=settings.endpoint,
            timeout=settings.request_timeout_s,
            watchdog_intervall=settings.watchdog_interval_s,
        )
        if settings.username is not None:
            client.set_user(settings.username)
            if settings.password is not None:
                client.set_password(settings.password)
        self._lost = lost = asyncio.Event()
        self._lost_reason = ""

        async def on_connection_lost(exc: Exception) -> None:
            self._connection_lost(f"connection lost: {type(exc).__name__}: {exc}")

        client.connection_lost_callback = on_connection_lost
        try:
            await client.connect()
            await self._subscribe(client)
            self.counters.connected = True
            if self.counters.connects:
                self.counters.reconnects += 1
            self.counters.connects += 1
            log_event(
                log,
                logging.INFO,
                "OPC-UA subscribed",
                endpoint=settings.endpoint,
                nodes=len(settings.nodes) - len(self.counters.failed_nodes),
                failed_nodes=len(self.counters.failed_nodes),
                reconnects=self.counters.reconnects,
            )
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), settings.watchdog_interval_s)
                if not lost.is_set():
                    await client.check_connection()  # raises once asyncua gave up the link
            raise ConnectionError(self._lost_reason or "connection lost")
        finally:
            self._lost = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), _DISCONNECT_TIMEOUT_S)

    async def _subscribe(self, client: Client) -> None:
        settings = self.settings
        by_id = {ua.NodeId.from_string(node.node_id): node for node in settings.nodes}
        handler = _SubscriptionHandler(self, by_id)
        subscription = await client.create_subscription(settings.publishing_interval_ms, handler)
        # Trigger on the timestamp too: a sensor that reports the same value again has
        # still produced a sample (and a flat line must not look like missing data).
        # asyncua's public subscribe_data_change takes no filter; _subscribe is its
        # documented low-level form (asyncua is pinned).
        results: Sequence[int | ua.StatusCode] = await subscription._subscribe(
            [client.get_node(node_id) for node_id in by_id],
            mfilter=ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp),
            queuesize=settings.queue_size,
            sampling_interval=ua.Duration(settings.sampling_interval_ms),
        )
        self.counters.failed_nodes.clear()
        for node, result in zip(settings.nodes, results, strict=True):
            if isinstance(result, ua.StatusCode):
                error = SourceError(
                    f"OPC-UA node {node.node_id} (tag {node.tag}) cannot be subscribed: "
                    f"{result.name}; check the node id on {settings.endpoint}",
                    source=opcua_source_name(settings.endpoint, node.node_id),
                )
                self.counters.node_errors += 1
                self.counters.failed_nodes[node.node_id] = result.name
                log_event(
                    log,
                    logging.ERROR,
                    str(error),
                    endpoint=settings.endpoint,
                    node_id=node.node_id,
                    status=result.name,
                )
        if len(self.counters.failed_nodes) == len(settings.nodes):
            raise SourceError(
                f"none of the {len(settings.nodes)} nodes could be subscribed on "
                f"{settings.endpoint}: {self.counters.failed_nodes}",
                source=settings.endpoint,
            )

    async def _store_loop(self) -> None:
        try:
            while True:
                await self._store(await self._next_batch())
        finally:
            # Cancelled (shutdown): what was received would never be delivered again.
            rest = self._drain(self.settings.max_pending)
            if rest:
                await self._store(rest, retry=False)

    async def _next_batch(self) -> list[Sample]:
        batch = [await self._pending.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.batch_wait_s
        while len(batch) < self.settings.max_batch:
            batch.extend(self._drain(self.settings.max_batch - len(batch)))
            remaining = deadline - loop.time()
            if remaining <= 0 or len(batch) >= self.settings.max_batch:
                break
            try:
                batch.append(await asyncio.wait_for(self._pending.get(), remaining))
            except TimeoutError:
                break
        return batch

    def _drain(self, limit: int) -> list[Sample]:
        items: list[Sample] = []
        while len(items) < limit:
            try:
                items.append(self._pending.get_nowait())
            except asyncio.QueueEmpty:
                break
        return items

    async def _store(self, batch: list[Sample], *, retry: bool = True) -> None:
        """Insert ``batch`` in a worker thread; on failure retry with backoff (the batch is
        kept; new samples wait in the bounded queue)."""
        attempt = 0
        while True:
            insert = asyncio.ensure_future(asyncio.to_thread(self._sink.insert, batch))
            try:
                # shield: a cancelled task still lets the transaction finish and be counted.
                result = await asyncio.shield(insert)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    self._count(await insert)
                raise
            except Exception as exc:
                self.counters.store_errors += 1
                self.counters.last_error = f"store failed: {type(exc).__name__}: {exc}"
                log_event(
                    log,
                    logging.ERROR,
                    "OPC-UA samples could not be stored; retrying",
                    endpoint=self.settings.endpoint,
                    samples=len(batch),
                    error=str(exc),
                )
                if not retry:
                    return
                await asyncio.sleep(self.settings.backoff.delay(attempt, random.random()))
                attempt += 1
                continue
            self._count(result)
            return

    def _count(self, result: Any) -> None:
        self.counters.stored += result.inserted
        self.counters.duplicates += result.duplicates
        self.counters.rejected_full += result.rejected_full
