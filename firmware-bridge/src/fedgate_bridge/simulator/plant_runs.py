"""Labelled plant runs simulated in a batch: the public data a genesis model is pre-trained on.

One run is one :class:`~.tep_plant.TepPlant` stepped for ``hours`` at 3-minute samples,
with one fault (IDV) switched on at ``fault_start_h`` (fault 0: normal operation all
along). A *set* is one run per fault; set ``k`` of ``--seed S`` seeds its plants with
``(S + k) * 100 + fault``, so it is the same as set 0 of seed ``S + k`` (and as
``bench/privacy/public_pretraining.py``'s runs of seed ``S + k``). A run that trips
(IDV 6 empties the stripper after about 7 h) or diverges ends there, shorter.

Layers: :class:`RunsPlan` validates what to simulate, :func:`simulate_run` simulates one
run, :func:`simulate_runs` all of a plan's runs over worker processes. Nothing here reads
or writes files (``fedgate-bridge simulate-runs`` does, with
:func:`fedgate_common.plant_runs.save_plant_runs`); the only clock is the one that times
each run for the progress report.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import signal
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedgate_bridge.errors import ConfigError, SimulatorError
from fedgate_bridge.simulator.register_map import FEATURE_TAGS
from fedgate_bridge.simulator.tep_plant import FaultSpec, PlantShutdown, TepPlant

if TYPE_CHECKING:  # numpy (via the file format) is imported by a run, not by every command
    from fedgate_common.plant_runs import PlantRun

__all__ = [
    "FAULT_START_H",
    "MAX_RUN_HOURS",
    "PUBLIC_FAULTS",
    "RUN_CONTROL_SECONDS",
    "RUN_HOURS",
    "SAMPLE_MINUTES",
    "RunProgress",
    "RunRequest",
    "RunsPlan",
    "SimulatedRun",
    "check_simulator",
    "parse_fault_list",
    "plant_seed",
    "samples_per_run",
    "simulate_run",
    "simulate_runs",
]

#: Normal operation and IDV 1-20, the faults the simulator shares with the TEP data set.
#: Its IDV 21 is another disturbance than the data set's fault 21, and IDV 22-28 have no
#: counterpart there: runs of them would be mislabelled.
PUBLIC_FAULTS: tuple[int, ...] = tuple(range(21))
RUN_HOURS = 25.0
#: Longest run: about 40 simulated days, 200 s of CPU and 20,000 samples.
MAX_RUN_HOURS = 1000.0
FAULT_START_H = 1.0
#: 5 × Ricker's 1.8 s: about 3 times faster, less faithful (decision 0046).
RUN_CONTROL_SECONDS = 9.0
#: As in the sites' data: one sample every 3 simulated minutes.
SAMPLE_MINUTES = 3.0

_FAULT_ITEM = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")
_DATASET_FAULT_21 = (
    "fault 21 cannot be simulated: the simulator's IDV 21 (random A feed temperature) is not "
    "the TEP data set's fault 21 (stream 4 valve stuck), so its runs would be mislabelled"
)


def parse_fault_list(text: str) -> tuple[int, ...]:
    """Faults from ``0-20`` or ``0,1,4-7``, in the order given; each once, 0..20."""
    faults: list[int] = []
    for item in text.split(","):
        match = _FAULT_ITEM.fullmatch(item)
        if match is None:
            raise ConfigError(
                f"bad fault list {text!r}: write numbers and ranges, e.g. 0-20 or 0,1,4-7"
            )
        first = int(match[1])
        last = int(match[2]) if match[2] is not None else first
        if last < first:
            raise ConfigError(f"bad fault range {item.strip()!r}: write it low-high, e.g. 4-7")
        if last > 21:
            raise ConfigError(
                f"fault {max(first, 22)} is not in the TEP data set (faults 0-21); use faults 0-20"
            )
        faults.extend(range(first, last + 1))
    if 21 in faults:
        raise ConfigError(f"{_DATASET_FAULT_21}; use faults 0-20")
    repeated = sorted({fault for fault in faults if faults.count(fault) > 1})
    if repeated:
        raise ConfigError(f"fault {repeated[0]} is listed twice in {text!r}")
    return tuple(faults)


def plant_seed(seed: int, set_index: int, fault: int) -> int:
    """The plant seed of one run: ``(seed + set_index) * 100 + fault``."""
    return (seed + set_index) * 100 + fault


def samples_per_run(hours: float) -> int:
    """Samples in a run of ``hours`` that does not trip (as the benchmark counts them)."""
    return round(hours / (SAMPLE_MINUTES / 60.0))


@dataclass(frozen=True, slots=True)
class RunsPlan:
    """What to simulate: ``sets`` sets of one run per fault in ``faults`` (in that order),
    seeded from ``seed``, each ``hours`` long, the fault on from ``fault_start_h``, the
    plant stepped every ``control_seconds``. Raises :class:`ConfigError` listing every
    problem."""

    seed: int
    sets: int
    faults: tuple[int, ...]
    hours: float = RUN_HOURS
    fault_start_h: float = FAULT_START_H
    control_seconds: float = RUN_CONTROL_SECONDS

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        if self.sets < 1:
            problems.append(f"sets must be at least 1, got {self.sets}")
        if not self.faults:
            problems.append("give at least one fault")
        elif len(set(self.faults)) != len(self.faults):
            problems.append("each fault may be listed once")
        elif not set(self.faults) <= set(PUBLIC_FAULTS):
            problems.append("faults must be in 0-20")
        sample_hours = SAMPLE_MINUTES / 60.0
        if not (
            math.isfinite(self.hours)
            and self.hours <= MAX_RUN_HOURS
            and samples_per_run(self.hours) >= 1
        ):
            problems.append(
                f"hours must be at least one sample ({sample_hours:g}) and at most "
                f"{MAX_RUN_HOURS:g}, got {self.hours}"
            )
        if not (math.isfinite(self.fault_start_h) and 0.0 <= self.fault_start_h < self.hours):
            problems.append(
                f"fault start must be >= 0 and before the end of the run ({self.hours:g} h), "
                f"got {self.fault_start_h}"
            )
        if not (math.isfinite(self.control_seconds) and self.control_seconds > 0):
            problems.append(f"control step must be > 0 s, got {self.control_seconds}")
        if problems:
            raise ConfigError("; ".join(problems), problems=problems)

    @property
    def runs(self) -> int:
        return self.sets * len(self.faults)

    @property
    def samples_per_run(self) -> int:
        """Samples in a run that does not trip."""
        return samples_per_run(self.hours)

    def requests(self) -> list[RunRequest]:
        """Every run, set-major, then in the order of :attr:`faults`."""
        return [
            RunRequest(
                seed=self.seed,
                set_index=set_index,
                fault=fault,
                hours=self.hours,
                fault_start_h=self.fault_start_h,
                control_seconds=self.control_seconds,
            )
            for set_index in range(self.sets)
            for fault in self.faults
        ]


@dataclass(frozen=True, slots=True)
class RunRequest:
    """One run to simulate: the arguments of :func:`simulate_run`, picklable for a worker."""

    seed: int
    set_index: int
    fault: int
    hours: float
    fault_start_h: float
    control_seconds: float


@dataclass(frozen=True, slots=True)
class SimulatedRun:
    """A finished run, how long it took, and why it ended early (``None``: it did not)."""

    run: PlantRun
    seconds: float
    trip: str | None = None

    @property
    def tripped(self) -> bool:
        return self.trip is not None


#: Called once per finished run, in the order runs finish: the run, how many runs have
#: finished (this one included) and how many there are.
RunProgress = Callable[[SimulatedRun, int, int], None]


def check_simulator(*, control_seconds: float) -> None:
    """Build one plant, so that a missing tep-studio (:class:`SimulatorError`) or a control
    step that does not divide the sample period (:class:`ConfigError`) is found before
    any run starts. It also imports tep-studio (about a second) into worker processes
    forked afterwards."""
    TepPlant(seed=0, sample_minutes=SAMPLE_MINUTES, control_seconds=control_seconds)


def simulate_run(
    *,
    seed: int,
    set_index: int,
    fault: int,
    hours: float,
    fault_start_h: float,
    control_seconds: float,
) -> PlantRun:
    """One run of set ``set_index``: ``hours`` of samples (52 features) labelled sample by
    sample with the active fault, shorter if the plant trips."""
    request = RunRequest(
        seed=seed,
        set_index=set_index,
        fault=fault,
        hours=hours,
        fault_start_h=fault_start_h,
        control_seconds=control_seconds,
    )
    return _simulate(request).run


def _simulate(request: RunRequest) -> SimulatedRun:
    import numpy as np
    from fedgate_common.plant_runs import PlantRun

    started = time.perf_counter()
    fault = request.fault
    schedule = [FaultSpec(idv=fault, start_h=request.fault_start_h, magnitude=1.0)] if fault else []
    plant = TepPlant(
        seed=plant_seed(request.seed, request.set_index, fault),
        faults=schedule,
        sample_minutes=SAMPLE_MINUTES,
        control_seconds=request.control_seconds,
    )
    samples: list[tuple[float, ...]] = []
    labels: list[int] = []
    trip: str | None = None
    try:
        for _ in range(samples_per_run(request.hours)):
            sample = plant.step()
            samples.append(sample.values[:-1])  # FAULT is the label, not a feature
            labels.append(sample.fault)
    except (PlantShutdown, SimulatorError) as exc:
        trip = str(exc)  # the run ends where the plant tripped or diverged
    run = PlantRun(
        fault=fault,
        set=request.set_index,
        # reshape: a run that trips before its first sample still has 52 columns
        x=np.asarray(samples, dtype=np.float64).reshape(-1, len(FEATURE_TAGS)),
        y=np.asarray(labels, dtype=np.int64),
    )
    return SimulatedRun(run=run, seconds=time.perf_counter() - started, trip=trip)


def _init_worker() -> None:
    # Ctrl-C reaches every process of the terminal's group: only the parent handles it
    # (and terminates the workers). SIGTERM must kill a worker whatever it inherited.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def simulate_runs(
    plan: RunsPlan, *, jobs: int, progress: RunProgress | None = None
) -> list[SimulatedRun]:
    """Every run of ``plan``, simulated in up to ``jobs`` worker processes (none with 1).

    The result is in :meth:`RunsPlan.requests` order (set-major, then fault order),
    whatever order runs finish in; each run depends only on its seed and fault, so the
    result does not depend on ``jobs``. ``progress`` is called in this process as each run
    finishes. On any exception, KeyboardInterrupt included, the workers are terminated
    before it propagates.
    """
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    requests = plan.requests()
    total = len(requests)
    finished: dict[int, SimulatedRun] = {}
    if jobs == 1 or total == 1:
        for index, request in enumerate(requests):
            result = finished[index] = _simulate(request)
            if progress is not None:
                progress(result, index + 1, total)
        return [finished[index] for index in range(total)]
    children_before = set(multiprocessing.active_children())
    executor = ProcessPoolExecutor(max_workers=min(jobs, total), initializer=_init_worker)
    try:
        positions: dict[Future[SimulatedRun], int] = {
            executor.submit(_simulate, request): index for index, request in enumerate(requests)
        }
        for done, future in enumerate(as_completed(positions), start=1):
            result = finished[positions[future]] = future.result()
            if progress is not None:
                progress(result, done, total)
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        # Python 3.11 has no public way to stop running workers (3.14: terminate_workers);
        # they are the children this process started since the pool was made.
        workers = set(multiprocessing.active_children()) - children_before
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(timeout=5)
        raise
    executor.shutdown()
    return [finished[index] for index in range(total)]
