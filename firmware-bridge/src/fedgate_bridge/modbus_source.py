"""Poll one Modbus device (TCP, serial RTU, or RTU frames over TCP) into the outbox.

A poll reads every mapped tag (grouped by :func:`registers.plan_reads`) and stores the
readings in one outbox transaction. A poll that fails anywhere (connection refused, timeout,
Modbus exception answer, short answer) stores nothing and consumes no sequence number: the
source is then marked unavailable, the failure counted and logged (rate-limited), the
connection dropped and re-opened with backoff. When the device answers again, polling simply
resumes; the streams' numbers continue without a gap.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Final

from fedgate_common.backoff import Backoff
from fedgate_common.tasks import finish_then_cancel
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType

from fedgate_bridge.config import ModbusSourceConfig
from fedgate_bridge.counters import FailureLog, RefusalLog, SourceCounters
from fedgate_bridge.errors import BlockRefused, RegisterDecodeError, SourceUnavailable
from fedgate_bridge.outbox import AsyncOutbox, Reading
from fedgate_bridge.registers import ReadBlock, decode_block, plan_reads

__all__ = ["ModbusPoller"]

log = logging.getLogger("fedgate.bridge.modbus")

ModbusClient = AsyncModbusTcpClient | AsyncModbusSerialClient
_FAILURES: Final = (ModbusException, OSError, TimeoutError, RegisterDecodeError)


def default_backoff(poll_interval_s: float) -> Backoff:
    """Reconnect delays: start near the poll interval, never wait more than 30 s."""
    return Backoff(initial_s=min(max(poll_interval_s, 0.1), 1.0), max_s=30.0)


#: The Modbus function code of each kind of read (Modbus Application Protocol v1.1b3, 6).
FUNCTION_CODES: Final = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


class ModbusPoller:
    """Polls one ``[[modbus]]`` source forever; see the module docstring."""

    def __init__(
        self,
        *,
        config: ModbusSourceConfig,
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
        self._backoff = backoff or default_backoff(config.poll_interval_s)
        self._clock = clock
        self._blocks = plan_reads(config.registers)
        self._topics = {r.tag: f"{topic_prefix}/{config.name}/{r.tag}" for r in config.registers}
        self._failures = FailureLog(log, what="modbus source", source=config.name)
        self._refusals = RefusalLog(log, what="modbus value refused", source=config.name)
        self._ever_connected = False
        self._attempt = 0  # reconnect attempts since the device last answered
        # the last poll's reads answered with a Modbus exception, and what the device said
        self.refused: list[tuple[ReadBlock, str]] = []

    @property
    def blocks(self) -> list[ReadBlock]:
        """The read requests of one poll."""
        return list(self._blocks)

    def _new_client(self) -> ModbusClient:
        config = self.config
        # retries=0 and reconnect_delay=0: this class owns retrying and reconnecting.
        if config.transport == "rtu":
            return AsyncModbusSerialClient(
                config.serial_port,
                framer=FramerType.RTU,
                baudrate=config.baudrate,
                bytesize=config.bytesize,
                parity=config.parity,
                stopbits=config.stopbits,
                timeout=config.timeout_s,
                retries=0,
                reconnect_delay=0,
                name=config.name,
            )
        framer = FramerType.RTU if config.transport == "rtu-over-tcp" else FramerType.SOCKET
        return AsyncModbusTcpClient(
            config.host,
            port=config.port,
            framer=framer,
            timeout=config.timeout_s,
            retries=0,
            reconnect_delay=0,
            name=config.name,
        )

    def _where(self) -> str:
        config = self.config
        if config.transport == "rtu":
            return f"{config.serial_port} (unit {config.unit})"
        return f"{config.host}:{config.port} (unit {config.unit}, {config.transport})"

    async def _connect(self, client: ModbusClient) -> None:
        try:
            ok = await asyncio.wait_for(client.connect(), self.config.timeout_s + 1.0)
        except _FAILURES as exc:
            raise SourceUnavailable(
                f"cannot connect to {self._where()}: {exc}", source=self.config.name
            ) from None
        if not ok:
            raise SourceUnavailable(f"cannot connect to {self._where()}", source=self.config.name)

    async def _read_block(self, client: ModbusClient, block: ReadBlock) -> list[Any]:
        """The block's values; a server error, or an answer to another function, raises
        :class:`SourceUnavailable`."""
        unit = self.config.unit
        calls = {
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
        }
        request = calls[block.kind](block.address, count=block.count, device_id=unit)
        response = await asyncio.wait_for(request, self.config.timeout_s + 1.0)
        if response.isError():
            code = getattr(response, "exception_code", "?")
            raise BlockRefused(
                f"{self._where()} answered Modbus exception {code} to reading {block.count} "
                f"{block.kind} from {block.address} (tags "
                f"{', '.join(r.tag for r in block.registers)})",
                source=self.config.name,
            )
        if response.function_code != FUNCTION_CODES[block.kind]:
            # pymodbus does not check it: a server answering another read would have its
            # values published under this block's tags.
            raise SourceUnavailable(
                f"{self._where()} answered function {response.function_code} to a "
                f"{block.kind} read (function {FUNCTION_CODES[block.kind]})",
                source=self.config.name,
            )
        return list(response.bits if block.reads_bits else response.registers)

    async def read_once(self, client: ModbusClient) -> list[Reading]:
        """One poll: every mapped tag the device answers for, or :class:`SourceUnavailable`
        and nothing when the link fails. A block the device refuses with a Modbus exception
        (an address it does not have, busy) is left out and named in :attr:`refused`; the
        other blocks are read: one wrong register does not silence the device."""
        readings: list[Reading] = []
        non_finite = 0
        self.refused = []
        try:
            for block in self._blocks:
                try:
                    answer = await self._read_block(client, block)
                except BlockRefused as exc:
                    self.refused.append((block, str(exc)))
                    continue
                ts = self._clock()
                decoded = decode_block(block, answer)
                non_finite += len(decoded.refused)
                for refused in decoded.refused:
                    self._refusals.refused(refused.tag, "non_finite", str(refused))
                readings.extend(
                    Reading(topic=self._topics[r.tag], ts=ts, value=value, unit=r.unit)
                    for r, value in decoded.values
                )
        except SourceUnavailable:
            raise
        except _FAILURES as exc:
            text = str(exc) or type(exc).__name__
            raise SourceUnavailable(
                f"reading {self._where()} failed: {text}", source=self.config.name
            ) from None
        if non_finite:
            self.counters.non_finite += non_finite
        return readings

    async def _store(self, readings: list[Reading]) -> None:
        # Stored and counted, or neither: a stop between the two would count less than
        # the outbox holds.
        await finish_then_cancel(self._store_and_count(readings))

    async def _store_and_count(self, readings: list[Reading]) -> None:
        result = await self.outbox.append(readings)
        counters = self.counters
        counters.reads += 1
        counters.readings += result.stored
        counters.rejected += result.rejected_new
        counters.last_read_at = self._clock()
        if result.stored:
            self._on_stored()

    async def _poll(self, client: ModbusClient) -> None:
        """Poll at a fixed rate until a read fails (a slow read skips missed ticks)."""
        interval = self.config.poll_interval_s
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            readings = await self.read_once(client)
            if self.refused and len(self.refused) == len(self._blocks):
                # Nothing answered (a gateway whose device is gone, a wrong unit id answered
                # with an exception): the source is down, not "up with every tag skipped".
                raise SourceUnavailable(
                    f"every read refused: {self.refused[0][1]}", source=self.config.name
                )
            self._attempt = 0  # the device answers: the next outage starts a fresh backoff
            self._failures.success()  # the link: refused reads are the tags' business
            for block, refusal in self.refused:
                self.counters.blocks_refused += 1
                self.counters.last_error = refusal
                self.counters.last_error_at = self._clock()
                tags = ",".join(r.tag for r in block.registers)
                self._refusals.refused(tags, "read_refused", refusal)
            await self._store(readings)
            next_at += interval
            now = loop.time()
            if next_at < now:
                next_at = now
            await asyncio.sleep(next_at - now)

    async def run(self) -> None:
        """Connect, poll, reconnect with backoff after any failure; never returns."""
        while True:
            client = self._new_client()
            try:
                await self._connect(client)
                self.counters.connected = True
                if self._ever_connected:
                    self.counters.reconnects += 1
                self._ever_connected = True
                await self._poll(client)
            except SourceUnavailable as exc:
                self._failed(exc)
            finally:
                self.counters.connected = False
                client.close()
            await asyncio.sleep(self._backoff.delay(self._attempt, random.random()))
            self._attempt += 1

    def _failed(self, exc: SourceUnavailable) -> None:
        self.counters.errors += 1
        self.counters.last_error = str(exc)
        self.counters.last_error_at = self._clock()
        self._failures.failure(str(exc))
