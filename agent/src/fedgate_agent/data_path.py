"""The data path inside ``fedgate-agent run``: the buffer, the live sources, their status,
and training windows cut from the buffer.

:class:`DataPath` opens the buffer (quarantining a corrupted file), runs one
:class:`~fedgate_agent.ingest.mqtt_source.MqttIngest` for all ``[[mqtt_source]]`` filters
and one :class:`~fedgate_agent.ingest.opcua_source.OpcUaIngest` per ``[[opcua_source]]``,
and every few seconds turns their counters into :class:`~fedgate_agent.state.IngestStatus`
for ``status.json``. Each source writes through its own buffer connection (SQLite in WAL
mode serialises the writers), so no connection is shared between threads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import msgspec
from fedgate_common.logs import log_event
from fedgate_common.model_spec import ModelSpec
from fedgate_common.tasks import BackgroundTasks

from fedgate_agent.broker_login import ingest_login, read_password
from fedgate_agent.config import AgentConfig
from fedgate_agent.data_settings import buffer_settings, buffer_status, window_spec
from fedgate_agent.errors import ConfigError
from fedgate_agent.ingest.buffer import IngestBuffer
from fedgate_agent.ingest.errors import IngestError
from fedgate_agent.ingest.mqtt_source import MqttIngest, MqttIngestSettings, MqttSubscription
from fedgate_agent.ingest.opcua_source import OpcUaIngest, OpcUaIngestSettings, OpcUaNode
from fedgate_agent.ingest.windows import build_windows
from fedgate_agent.local_dataset import LocalDataset
from fedgate_agent.state import IngestStatus, SourceStatus

__all__ = ["DataPath"]

log = logging.getLogger("fedgate.agent.ingest")

STATUS_INTERVAL_S = 5.0


class _Rate:
    """Messages per second of one counter between two status snapshots."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, key: str, count: int, now: float) -> float:
        before = self._last.get(key)
        self._last[key] = (now, count)
        if before is None or now <= before[0]:
            return 0.0
        return max(0.0, (count - before[1]) / (now - before[0]))


class DataPath:
    """Buffer plus live sources of one agent; :meth:`run` until cancelled."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.settings = buffer_settings(config)
        self.buffer = IngestBuffer.open(self.settings)  # quarantines a corrupted file
        if self.buffer.quarantined is not None:
            log_event(
                log,
                logging.ERROR,
                "corrupted buffer moved aside; a new buffer was started",
                quarantined=str(self.buffer.quarantined),
            )
        self._mqtt: MqttIngest | None = None
        self._opcua: list[OpcUaIngest] = []
        self._writers: list[IngestBuffer] = []
        self._rate = _Rate()
        self.status = IngestStatus(buffer=buffer_status(self.buffer))
        try:
            self._build_sources()  # every settings problem surfaces here, before network IO
        except IngestError as exc:
            self.close()
            raise ConfigError(f"data path: {exc}") from None
        except ConfigError:
            self.close()
            raise

    @property
    def has_sources(self) -> bool:
        return bool(self.config.mqtt_source or self.config.opcua_source)

    def _writer(self) -> IngestBuffer:
        writer = IngestBuffer.open(self.settings)
        self._writers.append(writer)
        return writer

    def _build_sources(self) -> None:
        config = self.config
        if config.mqtt_source:
            login = ingest_login(config)
            settings = MqttIngestSettings(
                host=config.ingest.mqtt_host or config.broker.host,
                port=config.ingest.mqtt_port or config.broker.port,
                client_id=f"fedgate-ingest-{config.deployment}-{config.cloud}-{config.agent_id}",
                subscriptions=tuple(
                    MqttSubscription(
                        topic_filter=s.topic, format=s.format, tag=s.tag, tag_level=s.tag_level
                    )
                    for s in config.mqtt_source
                ),
                keepalive_s=config.broker.keepalive_s,
                username=login.username,
                password=login.password,
                tls=login.tls,
                batch_max=config.ingest.batch_max,
                queue_max=config.ingest.queue_max,
                max_payload_bytes=config.ingest.max_payload_bytes,
            )
            self._mqtt = MqttIngest(settings=settings, buffer=self._writer())
        for source in config.opcua_source:
            opcua = OpcUaIngestSettings(
                endpoint=source.endpoint,
                nodes=tuple(OpcUaNode(node_id=n, tag=t) for t, n in source.tags.items()),
                sampling_interval_ms=source.sampling_interval_ms,
                username=source.username or None,
                password=read_password(source.password_file, "OPC-UA"),
            )
            self._opcua.append(OpcUaIngest(settings=opcua, sink=self._writer()))

    async def run(self, on_status: Callable[[], None] | None = None) -> None:
        """Run every source until cancelled, refreshing :attr:`status` every few seconds."""
        try:
            async with BackgroundTasks() as background:
                if self._mqtt is not None:
                    background.create_task(self._mqtt.run())
                for opcua in self._opcua:
                    background.create_task(opcua.run())
                while True:
                    self.refresh_status()
                    if on_status is not None:
                        on_status()
                    await asyncio.sleep(STATUS_INTERVAL_S)
        finally:
            for writer in self._writers:
                writer.close()
            self._writers.clear()

    def refresh_status(self, now: float | None = None) -> IngestStatus:
        """Counters of every source and of the buffer, with rates since the last call."""
        now = time.time() if now is None else now
        sources: list[SourceStatus] = []
        try:
            buffer = buffer_status(self.buffer)
        except IngestError as exc:  # damaged while running: the agent goes on and says so
            if self.status.buffer.error is None:
                log_event(log, logging.ERROR, "buffer unreadable", error=str(exc))
            buffer = msgspec.structs.replace(self.status.buffer, error=str(exc))
        newest = buffer.newest_ts
        if self._mqtt is not None:
            c = self._mqtt.counters
            name = f"mqtt://{self._mqtt.settings.host}:{self._mqtt.settings.port}"
            sources.append(
                SourceStatus(
                    name=name,
                    kind="mqtt",
                    connected=bool(c.connected),
                    received=c.received,
                    rate_per_s=round(self._rate(name, c.received, now), 1),
                    stored=c.inserted,
                    duplicates=c.duplicates,
                    rejected=dict(c.malformed),
                    backpressure_waits=c.backpressure_waits,
                    queue_depth=c.queue_depth,
                    reconnects=c.reconnects,
                    last_error=c.last_error,
                )
            )
        for opcua in self._opcua:
            o = opcua.counters
            name = opcua.settings.endpoint
            skipped = {
                "bad_quality": o.bad_quality,
                "not_numeric": o.not_numeric,
                "not_finite": o.not_finite,
                "no_timestamp": o.no_timestamp,
                "ts_in_past": o.ts_in_past,
                "ts_in_future": o.ts_in_future,
                "dropped_overflow": o.dropped_overflow,
                "node_errors": o.node_errors,
                "server_overflows": o.server_overflows,
            }
            sources.append(
                SourceStatus(
                    name=name,
                    kind="opcua",
                    connected=o.connected,
                    received=o.received,
                    rate_per_s=round(self._rate(name, o.received, now), 1),
                    stored=o.stored,
                    duplicates=o.duplicates,
                    rejected={k: v for k, v in skipped.items() if v},
                    backpressure_waits=0,
                    queue_depth=opcua.queue_depth,
                    reconnects=o.reconnects,
                    last_error=o.last_error,
                )
            )
        self.status = IngestStatus(
            buffer=buffer,
            sources=sources,
            lag_s=None if newest is None else round(max(0.0, now - newest), 3),
        )
        return self.status

    def training_dataset(self, model: ModelSpec) -> LocalDataset:
        """Training windows cut from the buffer as it is now (it grows between rounds)."""
        data = build_windows(self.buffer, window_spec(self.config, model))
        log_event(
            log,
            logging.INFO,
            "training windows",
            train=len(data.train),
            test=len(data.test),
            dropped=sum(data.dropped_windows.values()),
        )
        return data.train

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        self.buffer.close()
