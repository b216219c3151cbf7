"""Runs a :class:`~.tep_plant.TepPlant` against the wall clock and hands each sample out.

The plant itself has no clock; this driver owns it. Sample ``k`` is due ``k * period /
speed`` wall seconds after start. Each step runs in a worker thread (one sample is ~100
kernel steps), so the OPC-UA and Modbus servers on the event loop keep answering while the
plant computes, and the next sample is computed while the driver waits for its due time.
When the machine cannot keep up the driver publishes as fast as it can and reports the lag
in the hourly progress line instead of skipping samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fedgate_common.logs import log_event

from fedgate_bridge.simulator.tep_plant import PlantSample, TepPlant

__all__ = ["LivePlant", "RunSummary", "SampleSink"]

_logger = logging.getLogger("fedgate_bridge.simulate")

#: Tags shown in the hourly progress line.
PROGRESS_TAGS = {
    "reactor_pressure_kpa": "XMEAS_7",
    "reactor_level_pct": "XMEAS_8",
    "reactor_temp_c": "XMEAS_9",
    "product_flow_m3h": "XMEAS_17",
}


class SampleSink(Protocol):
    """Where samples go: the OPC-UA and Modbus servers."""

    async def publish(self, sample: PlantSample, *, wall_time: float) -> None: ...


@dataclass(frozen=True, slots=True)
class RunSummary:
    """How a run ended: ``samples`` published, simulated ``hours`` reached, worst ``lag_s``."""

    samples: int
    hours: float
    lag_s: float


class LivePlant:
    """Paces ``plant`` at ``speed`` simulated seconds per wall second into ``sinks``.

    ``hours``: stop after the sample at that simulated time (None: run until stopped).
    """

    def __init__(
        self,
        plant: TepPlant,
        *,
        speed: float,
        sinks: Sequence[SampleSink],
        hours: float | None = None,
    ) -> None:
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be > 0, got {speed}")
        self.plant = plant
        self.speed = speed
        self.sinks = tuple(sinks)
        self.hours = hours
        self.period_s = plant.sample_hours * 3600.0 / speed
        self.published = 0
        self._worst_lag_s = 0.0
        self._hour_lag_s = 0.0

    async def run(self, stop: asyncio.Event) -> RunSummary:
        """Publish samples until ``stop`` is set or ``hours`` is reached.

        Raises what :meth:`TepPlant.step` raises (:class:`~.tep_plant.PlantShutdown`,
        :class:`~fedgate_bridge.errors.SimulatorError`).
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        sample = self.plant.current
        await self._publish(sample)
        self._log_progress(sample)
        while not stop.is_set() and not self._finished(sample):
            sample = await asyncio.to_thread(self.plant.step)
            due = started + sample.index * self.period_s
            delay = due - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    break
            else:
                self._hour_lag_s = max(self._hour_lag_s, -delay)
                self._worst_lag_s = max(self._worst_lag_s, -delay)
            await self._publish(sample)
            if self._crossed_hour(sample):
                self._log_progress(sample)
        current = self.plant.current
        return RunSummary(samples=self.published, hours=current.time_h, lag_s=self._worst_lag_s)

    def _finished(self, sample: PlantSample) -> bool:
        return self.hours is not None and sample.time_h >= self.hours - 1e-9

    async def _publish(self, sample: PlantSample) -> None:
        wall_time = time.time()
        for sink in self.sinks:
            await sink.publish(sample, wall_time=wall_time)
        self.published += 1

    def _crossed_hour(self, sample: PlantSample) -> bool:
        previous = sample.time_h - self.plant.sample_hours
        return math.floor(sample.time_h + 1e-9) > math.floor(previous + 1e-9)

    def _log_progress(self, sample: PlantSample) -> None:
        fields: dict[str, object] = {
            "sim_hours": round(sample.time_h, 3),
            "sample": sample.index,
            "fault": sample.fault,
            "active_faults": ",".join(f"IDV{i}" for i in sample.active_faults) or "none",
        }
        for name, tag in PROGRESS_TAGS.items():
            fields[name] = round(sample.value(tag), 2)
        fields["lag_s"] = round(self._hour_lag_s, 3)
        self._hour_lag_s = 0.0
        log_event(_logger, logging.INFO, "plant hour", **fields)
