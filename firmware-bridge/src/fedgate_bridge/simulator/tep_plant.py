"""The Tennessee Eastman plant under closed-loop control, stepped one sample at a time.

No IO and no clock: :class:`TepPlant` advances simulated time only when :meth:`TepPlant.step`
is called, so the same seed and fault schedule always give the same samples, however fast
or slow the caller paces them (the live driver and the servers live elsewhere).

What runs inside is tep-studio's modified TEP kernel (Bathelt, Ricker & Jelali revision of
Downs & Vogel) with Ricker's decentralised PI controller, stepped at the controller's own
sample time (1.8 s). The kernel's single random generator drives both the measurement
noise and the random disturbances; :func:`kernel_seed` maps ``--seed`` onto it. Disturbance
activations are *scaled* (structure flag bit 7), so an IDV's magnitude in (0, 1] takes
effect instead of being rounded to on/off.

tep-studio is the optional ``fedgate-bridge[sim]`` extra: it is imported when a plant is
built, never at module import, so the bridge itself runs without it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from fedgate_bridge.errors import ConfigError, SimulatorError
from fedgate_bridge.simulator.register_map import FAULT_TAG, TAGS

__all__ = [
    "CONTROL_SECONDS",
    "N_DISTURBANCES",
    "PLANT_MODES",
    "FaultSchedule",
    "FaultSpec",
    "PlantSample",
    "PlantShutdown",
    "TepPlant",
    "kernel_seed",
    "load_tep_studio",
    "parse_fault_spec",
]

#: Ricker's controller sample time, the step the plant is advanced by (0.0005 h).
CONTROL_SECONDS = 1.8
#: IDV 1..28 of the modified kernel (IDV 1-20 are the classic Downs & Vogel set).
N_DISTURBANCES = 28
#: tep-studio's operating modes; mode1 is the base case.
PLANT_MODES = ("mode1", "mode2", "mode3", "mode4", "mode5", "mode6")

# Kernel structure flags: 0x0F are tep-studio's defaults (extra monitoring outputs),
# 0x80 scales disturbances by their activation value instead of thresholding it at 0.5.
_KERNEL_FLAGS = 0x0F | 0x80
# Decisions on simulated time tolerate the float drift of summed control steps.
_TIME_EPS_H = 1e-6
_FAULT_SPEC = re.compile(r"(?i)\s*(?:idv[_(]?)?0*(\d+)\)?\s*(?::([^:]*))?(?::([^:]*))?")
_INSTALL_HINT = "pip install 'fedgate-bridge[sim]' (adds tep-studio and numpy)"


class PlantShutdown(SimulatorError):
    """The simulated plant tripped (a TEP safety shutdown, e.g. low stripper level).

    ``time_h`` is the simulated time of the trip, ``reason`` the kernel's message.
    """

    def __init__(self, message: str, *, time_h: float, reason: str) -> None:
        super().__init__(message)
        self.time_h = time_h
        self.reason = reason


def load_tep_studio() -> ModuleType:
    """Import tep-studio, or say how to install it."""
    try:
        import tep_studio
    except ImportError as exc:
        raise SimulatorError(
            f"the plant simulator needs tep-studio, which is not installed: {_INSTALL_HINT}"
        ) from exc
    module: ModuleType = tep_studio
    return module


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One disturbance: IDV ``idv`` switched on at ``start_h`` simulated hours with
    ``magnitude`` in (0, 1] (1.0 is the published disturbance)."""

    idv: int
    start_h: float = 0.0
    magnitude: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.idv <= N_DISTURBANCES:
            problems.append(f"IDV{self.idv}: the plant has IDV 1..{N_DISTURBANCES}")
        if not (math.isfinite(self.start_h) and self.start_h >= 0.0):
            problems.append(f"IDV{self.idv}: START must be hours >= 0, got {self.start_h}")
        if not (math.isfinite(self.magnitude) and 0.0 < self.magnitude <= 1.0):
            problems.append(f"IDV{self.idv}: MAGNITUDE must be in (0, 1], got {self.magnitude}")
        if problems:
            raise ConfigError("; ".join(problems), problems=problems)

    def __str__(self) -> str:
        return f"IDV{self.idv}:{self.start_h:g}:{self.magnitude:g}"


def parse_fault_spec(text: str) -> FaultSpec:
    """Parse ``IDV[:START[:MAGNITUDE]]``: ``IDV6``, ``6:1``, ``idv_13:0.5:0.8``.

    START is in simulated hours (default 0), MAGNITUDE in (0, 1] (default 1).
    """
    match = _FAULT_SPEC.fullmatch(text)
    if match is None:
        raise ConfigError(
            f"bad fault {text!r}: write IDV[:START[:MAGNITUDE]], e.g. IDV6:1.0:1.0 "
            "(IDV 1..28, START in simulated hours, MAGNITUDE in (0, 1])"
        )
    idv_text, start_text, magnitude_text = match.groups()
    try:
        start = float(start_text) if start_text not in (None, "") else 0.0
        magnitude = float(magnitude_text) if magnitude_text not in (None, "") else 1.0
    except ValueError:
        raise ConfigError(
            f"bad fault {text!r}: START and MAGNITUDE must be numbers, e.g. IDV6:1.0:0.5"
        ) from None
    return FaultSpec(idv=int(idv_text), start_h=start, magnitude=magnitude)


@dataclass(frozen=True, slots=True)
class FaultSchedule:
    """Which disturbances are on at a simulated time.

    A fault is on from its ``start_h`` for the rest of the run (latched, as in the TEP
    data sets). When one IDV is listed several times, the entry started last sets its
    magnitude. The label is the lowest active IDV number, 0 when none is active.
    """

    faults: tuple[FaultSpec, ...] = ()

    def _started(self, time_h: float) -> dict[int, FaultSpec]:
        started: dict[int, FaultSpec] = {}
        for fault in sorted(self.faults, key=lambda f: f.start_h):
            if fault.start_h <= time_h + _TIME_EPS_H:
                started[fault.idv] = fault
        return started

    def active(self, time_h: float) -> tuple[int, ...]:
        """Active IDV numbers at ``time_h``, ascending."""
        return tuple(sorted(self._started(time_h)))

    def label(self, time_h: float) -> int:
        """The FAULT tag at ``time_h``: the lowest active IDV, 0 without one."""
        active = self.active(time_h)
        return active[0] if active else 0

    def activation(self, time_h: float) -> tuple[float, ...]:
        """The kernel's 28-element IDV activation vector at ``time_h``."""
        vector = [0.0] * N_DISTURBANCES
        for idv, fault in self._started(time_h).items():
            vector[idv - 1] = fault.magnitude
        return tuple(vector)

    def change_times(self) -> tuple[float, ...]:
        """Simulated hours at which the activation vector changes, ascending."""
        return tuple(sorted({fault.start_h for fault in self.faults}))


@dataclass(frozen=True, slots=True)
class PlantSample:
    """The plant's tags at one sample time.

    ``index`` counts samples from 0 (the state at start), ``time_h`` is simulated hours
    since start, ``values`` holds one float per :data:`~.register_map.TAGS` entry (FAULT
    last) and ``active_faults`` every active IDV, ascending.
    """

    index: int
    time_h: float
    values: tuple[float, ...]
    active_faults: tuple[int, ...]

    @property
    def fault(self) -> int:
        """The FAULT tag: lowest active IDV, 0 in normal operation."""
        return self.active_faults[0] if self.active_faults else 0

    def value(self, tag: str) -> float:
        """The value of ``tag`` (``XMEAS_7``, ``XMV_10``, ``FAULT``)."""
        return self.values[_TAG_INDEX[tag]]

    def as_dict(self) -> dict[str, float]:
        """``{tag: value}`` in register order."""
        return dict(zip(TAGS, self.values, strict=True))


_TAG_INDEX = {tag: index for index, tag in enumerate(TAGS)}


def kernel_seed(seed: int) -> float:
    """The kernel's random-generator seed for ``--seed``.

    The kernel's generator is ``g <- g * 9228907 mod 2**32``: a seed of 0 would freeze it
    (no noise at all) and even seeds shorten its period, so seeds are spread over odd
    32-bit values. Seed 0 maps to the kernel's own default (1431655765).
    """
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    return float(((seed * 2654435761 + 1431655765) % 2**32) | 1)


def _steps_per(period_s: float, control_seconds: float, *, what: str) -> int:
    steps = round(period_s / control_seconds)
    if steps < 1 or abs(steps * control_seconds - period_s) > 1e-6 * period_s:
        raise ConfigError(
            f"{what} of {period_s:g} s is not a whole number of {control_seconds:g} s "
            "control steps; pick a multiple (3 min = 100 steps of 1.8 s)"
        )
    return steps


class TepPlant:
    """The closed-loop TEP, one sample per :meth:`step`.

    ``seed`` fixes noise and random disturbances; ``faults`` is the IDV schedule;
    ``mode`` a tep-studio operating mode (``mode1`` = base case); ``sample_minutes`` the
    sampling period of the published tags; ``control_seconds`` the controller and
    integration step (1.8 s is Ricker's design; coarser steps run faster, less faithfully).
    Raises :class:`SimulatorError` when tep-studio is missing, :class:`ConfigError` for
    bad arguments.
    """

    def __init__(
        self,
        *,
        seed: int,
        faults: Sequence[FaultSpec] = (),
        mode: str = "mode1",
        sample_minutes: float = 3.0,
        control_seconds: float = CONTROL_SECONDS,
    ) -> None:
        if mode not in PLANT_MODES:
            raise ConfigError(f"unknown mode {mode!r}: use one of {', '.join(PLANT_MODES)}")
        if not (math.isfinite(sample_minutes) and sample_minutes > 0):
            raise ConfigError(f"sample period must be > 0 minutes, got {sample_minutes}")
        if not (math.isfinite(control_seconds) and control_seconds > 0):
            raise ConfigError(f"control step must be > 0 s, got {control_seconds}")
        self.seed = seed
        self.mode = mode
        self.schedule = FaultSchedule(tuple(faults))
        self.sample_minutes = float(sample_minutes)
        self._control_h = control_seconds / 3600.0
        self._steps_per_sample = _steps_per(
            sample_minutes * 60.0, control_seconds, what="a sample period"
        )
        seed_value = kernel_seed(seed)
        tep = load_tep_studio()
        from tep_studio.simulation.modes import mode_setpoints

        self._sim: Any = tep.TennesseeEastmanProcess()
        measurements, _ = self._sim.reset(mode=mode, seed=seed_value, ms_flag=_KERNEL_FLAGS)
        # Safety overrides on, as tep-studio's studio runs it: they hold the 3000 kPa trip.
        self._controller: Any = tep.RickerMultiLoopController(
            setpoints=mode_setpoints(mode), enable_overrides=True
        )
        self._controller.reset(measurements, time=0.0)
        self._measurements: Any = measurements
        self._steps = 0
        self._current = self._sample(0, measurements, self._sim.state[38:49])

    @property
    def sample_hours(self) -> float:
        """Simulated hours between two samples."""
        return self.sample_minutes / 60.0

    @property
    def current(self) -> PlantSample:
        """The latest sample (index 0 before the first :meth:`step`)."""
        return self._current

    def step(self) -> PlantSample:
        """Advance one sample period and return the new sample.

        Raises :class:`PlantShutdown` when the plant trips, :class:`SimulatorError` when
        the integration fails or produces non-finite values.
        """
        implemented: Any = None
        for _ in range(self._steps_per_sample):
            time_h = self._steps * self._control_h
            action, _ = self._controller.compute_action(self._measurements, time=self._sim.time)
            try:
                result = self._sim.advance(
                    action,
                    control_interval=self._control_h,
                    disturbances=self.schedule.activation(time_h),
                )
            except (RuntimeError, ValueError) as exc:
                raise SimulatorError(f"plant integration failed at {time_h:.4f} h: {exc}") from exc
            self._steps += 1
            self._measurements = result.measurements
            implemented = result.implemented_action
            status = result.shutdown_status
            if status["terminated"]:
                reason = str(status["message"]).strip() or f"shutdown code {status['code']}"
                raise PlantShutdown(
                    f"the plant shut down at {self._steps * self._control_h:.2f} simulated h: "
                    f"{reason}",
                    time_h=self._steps * self._control_h,
                    reason=reason,
                )
        self._current = self._sample(self._current.index + 1, self._measurements, implemented)
        return self._current

    def _sample(self, index: int, measurements: Any, mvs: Any) -> PlantSample:
        time_h = index * self.sample_hours
        active = self.schedule.active(time_h)
        fault = float(active[0]) if active else 0.0
        values = (*(float(v) for v in measurements[:41]), *(float(v) for v in mvs[:11]), fault)
        if not all(math.isfinite(v) for v in values):
            raise SimulatorError(f"the plant produced non-finite values at {time_h:.2f} h")
        if len(values) != len(TAGS) or TAGS[-1] != FAULT_TAG:
            raise SimulatorError("tep-studio returned an unexpected number of variables")
        return PlantSample(index=index, time_h=time_h, values=values, active_faults=active)
