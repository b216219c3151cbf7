"""The bridge: every source, the outbox and the publisher, under one asyncio.TaskGroup.

Sources (Modbus pollers, OPC-UA readers) store readings in the outbox; the publisher sends
the outbox to the broker. ``status.json`` in the state directory is rewritten every few
seconds (and once more at exit) with the counters ``fedgate-bridge status`` shows.

Stopping (the ``stop`` event, set on SIGTERM / SIGINT): sources stop first, so nothing new
is produced; the publisher then gets ``flush_timeout_s`` to have everything acknowledged;
whatever is still unacknowledged stays in the outbox for the next start. An unexpected error
in any task stops all of them and propagates (the service manager restarts the bridge).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Final

import msgspec
from fedgate_common.backoff import Backoff
from fedgate_common.logs import log_event
from fedgate_common.tasks import cancel_until_done

from fedgate_bridge import __version__
from fedgate_bridge.config import BridgeConfig, client_id_of, read_password
from fedgate_bridge.counters import OutboxHealth, PublisherCounters, SourceCounters
from fedgate_bridge.errors import OutboxError
from fedgate_bridge.modbus_source import ModbusPoller
from fedgate_bridge.opcua_source import OpcuaReader
from fedgate_bridge.outbox import AsyncOutbox, OutboxSummary
from fedgate_bridge.publisher import MqttPublisher

__all__ = ["Bridge", "BridgeStatus", "read_status", "write_status"]

log = logging.getLogger("fedgate.bridge")

STATUS_FORMAT: Final = 1


class BridgeStatus(msgspec.Struct, kw_only=True):
    """What ``status.json`` holds."""

    format: int = STATUS_FORMAT
    version: str = __version__
    pid: int
    state: str  # "running" | "stopped"
    started_at: float  # Unix seconds
    updated_at: float
    outbox: OutboxSummary
    outbox_health: OutboxHealth = msgspec.field(default_factory=OutboxHealth)
    publisher: PublisherCounters
    sources: list[SourceCounters]


def write_status(path: Path, status: BridgeStatus) -> None:
    """Replace ``path`` atomically (temporary file + rename): readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(msgspec.json.format(msgspec.json.encode(status)))
    os.replace(temporary, path)


def read_status(path: Path) -> BridgeStatus | None:
    """The last status written to ``path``; None if there is none (never ran, unreadable)."""
    try:
        return msgspec.json.decode(path.read_bytes(), type=BridgeStatus)
    except (OSError, msgspec.DecodeError):
        return None


Source = ModbusPoller | OpcuaReader


class Bridge:
    """Runs one bridge configuration until ``stop`` is set."""

    def __init__(
        self,
        config: BridgeConfig,
        *,
        source_backoff: Backoff | None = None,
        broker_backoff: Backoff | None = None,
        status_interval_s: float = 2.0,
        flush_timeout_s: float = 5.0,
    ) -> None:
        self.config = config
        self._source_backoff = source_backoff
        self._broker_backoff = broker_backoff
        self._status_interval_s = status_interval_s
        self._flush_timeout_s = flush_timeout_s
        self.publisher_counters = PublisherCounters()
        self.outbox_health = OutboxHealth()
        self.source_counters = [
            SourceCounters(name=source.name, kind="modbus") for source in config.modbus
        ] + [SourceCounters(name=source.name, kind="opcua") for source in config.opcua]
        self.started_at = time.time()
        self.running = asyncio.Event()  # set once the outbox is open and tasks started
        self._outbox: AsyncOutbox | None = None

    def _sources(self, outbox: AsyncOutbox, publisher: MqttPublisher) -> list[Source]:
        config = self.config
        counters = iter(self.source_counters)
        sources: list[Source] = [
            ModbusPoller(
                config=source,
                topic_prefix=config.topic_prefix,
                outbox=outbox,
                counters=next(counters),
                on_stored=publisher.notify,
                backoff=self._source_backoff,
            )
            for source in config.modbus
        ]
        sources.extend(
            OpcuaReader(
                config=source,
                topic_prefix=config.topic_prefix,
                outbox=outbox,
                counters=next(counters),
                on_stored=publisher.notify,
                backoff=self._source_backoff,
            )
            for source in config.opcua
        )
        return sources

    async def status(self, *, state: str = "running") -> BridgeStatus:
        """The current counters (reads the outbox's depth and totals)."""
        if self._outbox is None:
            outbox = OutboxSummary(
                depth=0, oldest_id=None, streams=0, dropped_oldest=0, rejected_new=0
            )
        else:
            outbox = await self._outbox.summary()
        return BridgeStatus(
            pid=os.getpid(),
            state=state,
            started_at=self.started_at,
            updated_at=time.time(),
            outbox=outbox,
            outbox_health=self.outbox_health,
            publisher=self.publisher_counters,
            sources=self.source_counters,
        )

    async def _write_status_forever(self) -> None:
        while True:
            try:
                write_status(self.config.status_path, await self.status())
            except (OSError, OutboxError) as exc:
                log_event(log, logging.WARNING, "cannot write status file", error=str(exc))
            await asyncio.sleep(self._status_interval_s)

    async def _flush_sources(self, sources: list[Source]) -> None:
        """Store what OPC-UA readers still queue, giving up after ``flush_timeout_s`` (an
        outbox that cannot be written must not hold the stop up; the loss is logged)."""
        for source in sources:
            if not isinstance(source, OpcuaReader):
                continue
            try:
                await asyncio.wait_for(source.flush(), self._flush_timeout_s)
            except TimeoutError:
                log_event(
                    log,
                    logging.ERROR,
                    "readings not stored at stop: the outbox cannot be written",
                    source=source.config.name,
                    lost=source.queued,
                )

    async def run(self, stop: asyncio.Event) -> None:
        """Bridge until ``stop`` is set, then flush and return (see the module docstring).

        Raises :class:`ConfigError` (unreadable password file) or :class:`OutboxError`
        before any network IO.
        """
        config = self.config
        password = read_password(config.broker.password_file)
        outbox = await AsyncOutbox.open(
            config.outbox_path,
            max_messages=config.outbox.max_messages,
            policy=config.outbox.policy,
            health=self.outbox_health,
        )
        self._outbox = outbox
        async with outbox:
            publisher = MqttPublisher(
                settings=config.broker,
                client_id=client_id_of(config),
                password=password,
                outbox=outbox,
                counters=self.publisher_counters,
                backoff=self._broker_backoff,
            )
            sources = self._sources(outbox, publisher)
            log_event(
                log,
                logging.INFO,
                "bridge starting",
                sources=len(sources),
                outbox=outbox.depth,
                broker=f"{config.broker.host}:{config.broker.port}",
            )
            async with asyncio.TaskGroup() as group:
                publishing = group.create_task(publisher.run(), name="publisher")
                reporting = group.create_task(self._write_status_forever(), name="status")
                reading = [
                    group.create_task(source.run(), name=f"source {source.config.name}")
                    for source in sources
                ]
                self.running.set()
                await stop.wait()
                await cancel_until_done(reading)
                await self._flush_sources(sources)
                flushed = await publisher.drain(self._flush_timeout_s)
                await cancel_until_done([publishing, reporting])
            final = await self.status(state="stopped")
            with contextlib.suppress(OSError):
                write_status(config.status_path, final)
            log_event(
                log,
                logging.INFO,
                "bridge stopped",
                flushed=flushed,
                outbox=final.outbox.depth,
                published=self.publisher_counters.acked,
            )
        self._outbox = None
