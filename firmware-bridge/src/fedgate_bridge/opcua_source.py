"""Read one OPC-UA server into the outbox, by subscription or by polling.

``mode = "subscribe"``: one subscription (publishing interval = ``poll_interval_s``) with a
data-change item per node; each notification is one reading, timestamped with the server's
SourceTimestamp when it sends one. Notifications go through a bounded queue to a task that
stores them in batches (one outbox transaction per batch); a full queue drops the newest
notification and counts it in ``errors``.

``mode = "poll"``: every ``poll_interval_s`` one Read request for all nodes; each node
whose status is Good gives one reading, timestamped when the answer arrived.

Numbers and booleans are published (booleans as 0.0 / 1.0); other values (strings, arrays,
nulls) are counted in ``non_numeric``, NaN / infinity in ``non_finite``; a node with a Bad
status or one that the server does not know is counted in ``errors``. Losing the connection
marks the source unavailable; it reconnects with backoff and subscribes again. No sequence
number is consumed for a value that was not stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Final

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.ua.uaerrors import UaError
from fedgate_common.backoff import Backoff
from fedgate_common.tasks import BackgroundTasks, finish_then_cancel

from fedgate_bridge.config import OpcuaNode, OpcuaSourceConfig, read_password
from fedgate_bridge.counters import FailureLog, RefusalLog, SourceCounters
from fedgate_bridge.errors import ConfigError, SourceUnavailable
from fedgate_bridge.outbox import AsyncOutbox, Reading
from fedgate_bridge.registers import publishable

__all__ = ["OpcuaReader", "numeric_value"]

log = logging.getLogger("fedgate.bridge.opcua")

REQUEST_TIMEOUT_S: Final = 4.0
QUEUE_SIZE: Final = 10_000
BATCH_SIZE: Final = 1_000
_FAILURES: Final = (OSError, TimeoutError, UaError, ConnectionError)


def numeric_value(value: object) -> float | None:
    """The value as a float if it is a number or a boolean, else None."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    return None


#: How far ahead of the gateway's clock a server's timestamp may be (the agent refuses
#: readings stamped later, as ``ts_in_future``).
MAX_CLOCK_AHEAD_S: Final = 3600.0
MAX_CLOCK_BEHIND_S: Final = 86400.0  # a live reading a day old: a clock that is not set


def reading_timestamp(data_value: ua.DataValue | None, arrival: float) -> float:
    """The value's SourceTimestamp, else its ServerTimestamp, else ``arrival``: the first
    that is set and plausible. OPC-UA's "not set" is DateTime 0 (the year 1601), a server's
    clock may be far ahead (the agent would refuse the reading), and a device whose clock
    was never set stamps every change alike, far in the past (every training window would
    find the tag missing); such a stamp is passed over for the next."""
    if data_value is not None:
        for stamp in (data_value.SourceTimestamp, data_value.ServerTimestamp):
            if stamp is None:
                continue
            try:
                seconds = stamp.timestamp()
            except (OverflowError, OSError, ValueError):
                continue
            if arrival - MAX_CLOCK_BEHIND_S < seconds <= arrival + MAX_CLOCK_AHEAD_S:
                return seconds
    return arrival


#: Values the server keeps per monitored item between two publishes.
SUBSCRIPTION_QUEUE_SIZE = 100


class OpcuaReader:
    """Reads one ``[[opcua]]`` source forever; see the module docstring."""

    def __init__(
        self,
        *,
        config: OpcuaSourceConfig,
        topic_prefix: str,
        outbox: AsyncOutbox,
        counters: SourceCounters,
        on_stored: Callable[[], None] = lambda: None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.counters = counters
        self._on_stored = on_stored
        self._backoff = backoff or Backoff(initial_s=1.0, max_s=30.0)
        self._clock = clock
        self._topics = {n.tag: f"{topic_prefix}/{config.name}/{n.tag}" for n in config.nodes}
        self._units = {n.tag: n.unit for n in config.nodes}
        self._failures = FailureLog(log, what="opcua source", source=config.name)
        self._refusals = RefusalLog(log, what="opcua value refused", source=config.name)
        self._ever_connected = False
        self._attempt = 0
        self._queue: asyncio.Queue[Reading] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._flushing = 0  # readings taken from the queue by flush() and not yet stored

    # ------------------------------------------------------------------ values

    def _reading(self, tag: str, value: object, ts: float) -> Reading | None:
        """A reading for ``tag``, or None (counted) if the value cannot be published."""
        number = numeric_value(value)
        if number is None:
            self.counters.non_numeric += 1
            self._refusals.refused(tag, "non_numeric", f"a value of type {type(value).__name__}")
            return None
        if not publishable(number):  # NaN, infinite, or beyond float32
            self.counters.non_finite += 1
            self._refusals.refused(tag, "non_finite", repr(number))
            return None
        return Reading(topic=self._topics[tag], ts=ts, value=number, unit=self._units[tag])

    async def _store(self, readings: list[Reading]) -> None:
        # Stored and counted, or neither: a stop between the two would count less than
        # the outbox holds.
        await finish_then_cancel(self._store_and_count(readings))

    async def _store_and_count(self, readings: list[Reading]) -> None:
        result = await self.outbox.append(readings)
        self.counters.readings += result.stored
        self.counters.rejected += result.rejected_new
        self.counters.last_read_at = self._clock()
        if result.stored:
            self._on_stored()

    def _check_answer_count(self, service: str, answered: int, asked: int) -> None:
        """A server that answers a request for n nodes with another number of results is
        broken: the source reconnects (counted), the bridge goes on."""
        if answered != asked:
            raise SourceUnavailable(
                f"{self.config.endpoint} answered {service} for {asked} nodes with "
                f"{answered} results",
                source=self.config.name,
            )

    def _node_failed(self, tag: str, status: object) -> None:
        why = str(getattr(status, "name", None) or status)  # StatusCode: its name
        self.counters.errors += 1
        self.counters.last_error = f"node {tag!r}: {why}"
        self.counters.last_error_at = self._clock()
        self._refusals.refused(tag, "node_error", why)

    # ------------------------------------------------------------------ connection

    def _new_client(self) -> Client:
        client = Client(self.config.endpoint, timeout=REQUEST_TIMEOUT_S)
        if self.config.username:
            client.set_user(self.config.username)
            try:
                password = read_password(self.config.password_file)
            except ConfigError as exc:  # gone or unreadable since the start: retried later
                raise SourceUnavailable(str(exc), source=self.config.name) from None
            if password is not None:
                client.set_password(password)
        return client

    async def run(self) -> None:
        """Connect, read, reconnect with backoff after any failure; never returns.

        In subscribe mode a second task stores the queued notifications; if storing fails
        (the outbox is unusable) both stop and the error propagates.
        """
        async with BackgroundTasks() as background:
            if self._subscribing:
                background.create_task(self._drain_notifications())
            await self._connect_forever()

    async def _connect_forever(self) -> None:
        while True:
            await self._session()
            await asyncio.sleep(self._backoff.delay(self._attempt, random.random()))
            self._attempt += 1

    @property
    def _subscribing(self) -> bool:
        return self.config.mode == "subscribe"

    async def _session(self) -> None:
        """One connection: until it is lost (logged, counted) or the task is cancelled."""
        try:
            client = self._new_client()
        except SourceUnavailable as exc:  # the password file went away: try again later
            self._failed(exc)
            return
        lost = asyncio.Event()

        async def connection_lost(exc: Exception) -> None:
            lost.set()

        client.connection_lost_callback = connection_lost
        try:
            try:
                await client.connect()
            except _FAILURES as exc:
                why = str(exc) or type(exc).__name__
                if "No matching endpoints" in why:  # the server offers no security mode None
                    why += (
                        " (the server requires signing or encryption; fedgate-bridge connects "
                        "with security mode None only: offer that endpoint on the server, on a "
                        "network only the bridge reaches)"
                    )
                raise SourceUnavailable(
                    f"cannot connect to {self.config.endpoint}: {why}", source=self.config.name
                ) from None
            self.counters.connected = True
            if self._ever_connected:
                self.counters.reconnects += 1
            self._ever_connected = True
            nodes = {tag: client.get_node(node.node_id) for tag, node in self._node_ids()}
            if self._subscribing:
                await self._subscribe(client, nodes, lost)
            else:
                await self._poll(client, nodes, lost)
        except SourceUnavailable as exc:
            self._failed(exc)
        finally:
            self.counters.connected = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 2.0)

    def _node_ids(self) -> list[tuple[str, OpcuaNode]]:
        return [(node.tag, node) for node in self.config.nodes]

    def _failed(self, exc: SourceUnavailable) -> None:
        self.counters.errors += 1
        self.counters.last_error = str(exc)
        self.counters.last_error_at = self._clock()
        self._failures.failure(str(exc))

    def _answering(self) -> None:
        self._attempt = 0
        self._failures.success()

    # ------------------------------------------------------------------ poll mode

    async def read_once(self, client: Client, nodes: dict[str, Node]) -> list[Reading]:
        """One Read request for every node; Bad nodes are counted, the rest returned."""
        try:
            values = await client.read_attributes(list(nodes.values()))
        except _FAILURES as exc:
            raise SourceUnavailable(
                f"reading {self.config.endpoint} failed: {str(exc) or type(exc).__name__}",
                source=self.config.name,
            ) from None
        self._check_answer_count("Read", len(values), len(nodes))
        now = self._clock()
        readings: list[Reading] = []
        for tag, data_value in zip(nodes, values, strict=True):
            status = data_value.StatusCode
            if status is not None and not status.is_good():
                self._node_failed(tag, status)
                continue
            value = data_value.Value.Value if data_value.Value is not None else None
            reading = self._reading(tag, value, now)
            if reading is not None:
                readings.append(reading)
        return readings

    async def _poll(self, client: Client, nodes: dict[str, Node], lost: asyncio.Event) -> None:
        interval = self.config.poll_interval_s
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not lost.is_set():
            readings = await self.read_once(client, nodes)
            self.counters.reads += 1
            self._answering()
            await self._store(readings)
            next_at = max(next_at + interval, loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), next_at - loop.time())
        raise SourceUnavailable(
            f"connection to {self.config.endpoint} lost", source=self.config.name
        )

    # ------------------------------------------------------------------ subscribe mode

    async def _subscribe(self, client: Client, nodes: dict[str, Node], lost: asyncio.Event) -> None:
        tags = {node.nodeid: tag for tag, node in nodes.items()}
        reader = self

        class Handler:
            """asyncua calls this for each notification; it only queues (never blocks)."""

            def datachange_notification(self, node: Node, val: Any, data: Any) -> None:
                tag = tags.get(node.nodeid)
                if tag is not None:
                    reader._notified(tag, val, data.monitored_item.Value)

            def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
                if not status.Status.is_good():
                    lost.set()

        try:
            subscription = await client.create_subscription(
                self.config.poll_interval_s * 1000.0, Handler()
            )
            # Trigger on the timestamp too: every sample the server produces is a reading,
            # also when its value repeats (a flat line is data, not silence). asyncua's
            # public subscribe_data_change takes no filter; _subscribe is its documented
            # low-level form (asyncua is pinned).
            handles = await subscription._subscribe(
                list(nodes.values()),
                mfilter=ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValueTimestamp),
                queuesize=SUBSCRIPTION_QUEUE_SIZE,
                sampling_interval=ua.Double(self.config.poll_interval_s * 1000.0),
            )
        except _FAILURES as exc:
            raise SourceUnavailable(
                f"subscribing at {self.config.endpoint} failed: {str(exc) or type(exc).__name__}",
                source=self.config.name,
            ) from None
        results = handles if isinstance(handles, list) else [handles]
        self._check_answer_count("CreateMonitoredItems", len(results), len(nodes))
        for tag, handle in zip(nodes, results, strict=True):
            if isinstance(handle, ua.StatusCode):
                self._node_failed(tag, handle)
                log.warning(
                    "opcua node cannot be subscribed",
                    extra={"fields": {"source": self.config.name, "tag": tag, "status": handle}},
                )
        self._answering()
        await lost.wait()
        raise SourceUnavailable(
            f"connection to {self.config.endpoint} lost", source=self.config.name
        )

    def _notified(self, tag: str, value: object, data_value: ua.DataValue | None) -> None:
        status = None if data_value is None else data_value.StatusCode
        if status is not None and not status.is_good():
            self._node_failed(tag, status)
            return
        self.counters.reads += 1
        reading = self._reading(tag, value, reading_timestamp(data_value, self._clock()))
        if reading is None:
            return
        try:
            self._queue.put_nowait(reading)
        except asyncio.QueueFull:
            self._node_failed(tag, "notification queue full; reading dropped")

    async def _drain_notifications(self) -> None:
        """Store queued notifications in batches, one transaction per batch."""
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH_SIZE and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._store(batch)

    async def flush(self) -> None:
        """Store what is still queued (called on shutdown, after :meth:`run` stopped)."""
        batch: list[Reading] = []
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        if batch:
            self._flushing = len(batch)
            await self._store(batch)
            self._flushing = 0

    @property
    def queued(self) -> int:
        """Readings received and not yet stored in the outbox."""
        return self._queue.qsize() + self._flushing
