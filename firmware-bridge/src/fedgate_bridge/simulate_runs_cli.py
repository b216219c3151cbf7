"""``fedgate-bridge simulate-runs``: simulated Tennessee Eastman runs exported to one file.

The file (:mod:`fedgate_common.plant_runs`) is the public data ``fedgate-agent pretrain``
trains a federation's genesis model on (decision 0046). The simulation is
:mod:`fedgate_bridge.simulator.plant_runs`; this module checks the command line, the output
path and tep-studio before any run starts, reports progress, and writes the file atomically:
an interrupted command (Ctrl-C, SIGTERM) leaves no file behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path

import click
from fedgate_common.click_support import echo_json, fail

from fedgate_bridge.errors import ConfigError, SimulatorError
from fedgate_bridge.simulator.plant_runs import (
    FAULT_START_H,
    MAX_RUN_HOURS,
    PUBLIC_FAULTS,
    RUN_CONTROL_SECONDS,
    RUN_HOURS,
    SAMPLE_MINUTES,
    RunsPlan,
    SimulatedRun,
    check_simulator,
    parse_fault_list,
    simulate_runs,
)
from fedgate_bridge.simulator.tep_plant import CONTROL_SECONDS

__all__ = ["EXIT_CODES_HELP", "SimulateRunsExitCode", "simulate_runs_command"]


class SimulateRunsExitCode(IntEnum):
    OK = 0  # the file is written
    FAILURE = 1  # unexpected failure (a traceback)
    USAGE = 2  # bad command line; nothing simulated
    OUTPUT = 3  # --out unusable: a directory, or its directory cannot be made or written
    EXISTS = 5  # --out exists and --force is not given
    SIMULATOR_FAILED = 7  # tep-studio not installed, or a worker process died
    INTERRUPTED = 130  # Ctrl-C or SIGTERM; nothing written


EXIT_CODES_HELP = """\b
Exit codes:
  0 the file is written
  1 unexpected failure
  2 bad command line (--faults, --sets, --hours, --fault-start-h, ...); nothing simulated
  3 --out unusable: a directory, or its directory cannot be created or written
  5 --out exists (pass --force to replace it)
  7 simulator failed: tep-studio not installed, or a worker process died
  130 interrupted (Ctrl-C, SIGTERM): nothing written"""


def _default_jobs() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _parse_faults(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return parse_fault_list(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _check_out(path: Path, *, force: bool) -> None:
    """Exit 5 if ``path`` exists (without ``force``), 3 if it cannot be written."""
    if path.is_dir():
        fail(f"--out {str(path)!r} is a directory; give a file name", SimulateRunsExitCode.OUTPUT)
    if path.exists() and not force:
        fail(
            f"--out {str(path)!r} exists; pass --force to replace it",
            SimulateRunsExitCode.EXISTS,
        )
    ancestor = path.absolute().parent
    while not ancestor.exists():  # save_plant_runs creates the missing directories
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        fail(f"--out: {str(ancestor)!r} is not a directory", SimulateRunsExitCode.OUTPUT)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        fail(f"--out: directory {str(ancestor)!r} is not writable", SimulateRunsExitCode.OUTPUT)


def _simulator_version() -> str:
    try:
        return f"tep-studio {importlib.metadata.version('tep-studio')}"
    except importlib.metadata.PackageNotFoundError:
        return "tep-studio (version unknown)"


def _file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so both stop the workers and
    leave no file (save_plant_runs removes its temporary file on any exception)."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fault_text(faults: tuple[int, ...]) -> str:
    """``0-20`` or ``0,1,4-7``: the fault list as it can be given back to --faults."""
    parts: list[str] = []
    start = previous = faults[0]
    for fault in (*faults[1:], None):
        if fault is not None and fault == previous + 1:
            previous = fault
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if fault is not None:
            start = previous = fault
    return ",".join(parts)


def _progress_line(result: SimulatedRun, done: int, total: int) -> str:
    run = result.run
    ended = f" (ended early: {result.trip})" if result.trip else ""
    return (
        f"run {done}/{total}  set {run.set} fault {run.fault}: "
        f"{len(run.y)} samples{ended}, {result.seconds:.1f} s"
    )


_HELP = f"""Simulate labelled Tennessee Eastman runs and write them to one file.

\b
The file is the public data a federation's genesis model is pre-trained on
(fedgate-agent pretrain reads it; decision 0046): nothing in it comes from a site,
so training on it costs no privacy. A set is one run per fault in --faults; each
run is --hours of 3-minute samples of the 52 model inputs (XMEAS_1..41,
XMV_1..11), labelled sample by sample: 0 before --fault-start-h, the fault from
then on. Fault 0 is normal operation throughout. A run that trips (fault 6 shuts
the plant down about 7 h after its start) ends there, shorter.

\b
Set k of --seed S is the same as set 0 of --seed S+k, so files of seeds 1 and
4 with --sets 3 share no run. The same options give the same values, whatever
--jobs. --faults takes numbers and ranges (0-20, or 0,1,4-7) from 0-20: the
simulator's IDV 21 is not the data set's fault 21.

\b
Time: about 5 s of CPU per 25 h run at the default control step; a default set
(21 runs) took 90 s on 2 cores, and time grows with runs / --jobs. The file
takes about 4 MB per set. --control-seconds 1.8 (Ricker's own step) is more
faithful and about 3 times slower.

\b
Example (3 sets of faults 0-20, 25 h each, on 4 processes):
  fedgate-bridge simulate-runs --out public/sim-runs-1.npz --seed 1 --sets 3 \\
      --faults 0-20 --hours 25 --fault-start-h 1 --jobs 4 --json

{EXIT_CODES_HELP}
"""


@click.command(
    "simulate-runs", help=_HELP, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=True, path_type=Path),
    required=True,
    help="File to write (.npz; its directory is created).",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Seed of set 0; set k uses seed + k.",
)
@click.option(
    "--sets",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Sets to simulate (one run per fault each).",
)
@click.option(
    "--faults",
    metavar="FAULTS",
    callback=_parse_faults,
    default=f"{PUBLIC_FAULTS[0]}-{PUBLIC_FAULTS[-1]}",
    show_default=True,
    help="Faults to simulate, in this order (0 = normal operation).",
)
@click.option(
    "--hours",
    type=click.FloatRange(min=SAMPLE_MINUTES / 60.0, max=MAX_RUN_HOURS),
    default=RUN_HOURS,
    show_default=True,
    help="Simulated hours per run.",
)
@click.option(
    "--fault-start-h",
    type=click.FloatRange(min=0.0),
    default=FAULT_START_H,
    show_default=True,
    help="Simulated hour the fault switches on (before --hours).",
)
@click.option(
    "--control-seconds",
    type=click.FloatRange(min=0.0, min_open=True),
    default=RUN_CONTROL_SECONDS,
    show_default=True,
    help=(
        f"Controller/integration step; a divisor of {SAMPLE_MINUTES * 60:g} s. The default is "
        f"5 × Ricker's {CONTROL_SECONDS:g} s: about 3 times faster, less faithful."
    ),
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes (default: the number of CPUs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def simulate_runs_command(
    out: Path,
    force: bool,
    seed: int,
    sets: int,
    faults: tuple[int, ...],
    hours: float,
    fault_start_h: float,
    control_seconds: float,
    jobs: int | None,
    as_json: bool,
) -> None:
    if fault_start_h >= hours:
        raise click.BadParameter(
            f"{fault_start_h:g} h is not before the end of the run (--hours {hours:g})",
            param_hint="'--fault-start-h'",
        )
    try:  # what click's types let through (nan, inf)
        plan = RunsPlan(
            seed=seed,
            sets=sets,
            faults=faults,
            hours=hours,
            fault_start_h=fault_start_h,
            control_seconds=control_seconds,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    _check_out(out, force=force)
    try:
        with _sigterm_interrupts():
            results, seconds = _simulate_and_write(out, plan, jobs=jobs, force=force)
    except KeyboardInterrupt:
        fail("interrupted; nothing written", SimulateRunsExitCode.INTERRUPTED)
    except BrokenProcessPool as exc:  # a worker was killed (out of memory?)
        fail(f"a worker process died: {exc}", SimulateRunsExitCode.SIMULATOR_FAILED)
    except SimulatorError as exc:  # tep-studio is not installed
        fail(str(exc), SimulateRunsExitCode.SIMULATOR_FAILED)
    _report(out, plan, results, seconds, as_json=as_json)


def _simulate_and_write(
    out: Path, plan: RunsPlan, *, jobs: int | None, force: bool
) -> tuple[list[SimulatedRun], float]:
    """The runs, written to ``out``, and the seconds it took (from the first run)."""
    try:
        check_simulator(control_seconds=plan.control_seconds)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="'--control-seconds'") from None
    workers = min(jobs or _default_jobs(), plan.runs)
    click.echo(
        f"simulating {plan.runs} runs ({plan.sets} set{'s' if plan.sets > 1 else ''} × faults "
        f"{_fault_text(plan.faults)}, {plan.hours:g} h each) in {workers} "
        f"process{'es' if workers > 1 else ''}",
        err=True,
    )
    started = time.perf_counter()
    results = simulate_runs(
        plan,
        jobs=workers,
        progress=lambda result, done, total: click.echo(
            _progress_line(result, done, total), err=True
        ),
    )
    if out.exists() and not force:  # created while we simulated
        fail(
            f"--out {str(out)!r} appeared while simulating; pass --force to replace it",
            SimulateRunsExitCode.EXISTS,
        )
    try:
        _write(out, plan, results)
    except OSError as exc:
        fail(f"cannot write --out {str(out)!r}: {exc}", SimulateRunsExitCode.OUTPUT)
    return results, time.perf_counter() - started


def _write(out: Path, plan: RunsPlan, results: list[SimulatedRun]) -> None:
    # Imported here: the file format needs numpy, which --help should not load.
    from fedgate_common.plant_runs import RunsMeta, save_plant_runs

    meta = RunsMeta(
        simulator=_simulator_version(),
        seed=plan.seed,
        sets=plan.sets,
        hours=plan.hours,
        fault_start_h=plan.fault_start_h,
        sample_minutes=SAMPLE_MINUTES,
        control_seconds=plan.control_seconds,
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    save_plant_runs(out, [result.run for result in results], meta)


def _report(
    out: Path, plan: RunsPlan, results: list[SimulatedRun], seconds: float, *, as_json: bool
) -> None:
    from fedgate_common.plant_runs import PLANT_RUNS_FORMAT

    samples = sum(len(result.run.y) for result in results)
    tripped = sum(result.tripped for result in results)
    digest = _file_sha256(out)
    if as_json:
        summary = {
            "file": str(out),
            "format": PLANT_RUNS_FORMAT,
            "sha256": digest,
            "seed": plan.seed,
            "sets": plan.sets,
            "faults": list(plan.faults),
            "hours": plan.hours,
            "fault_start_h": plan.fault_start_h,
            "control_seconds": plan.control_seconds,
            "runs": len(results),
            "samples": samples,
            "tripped": tripped,
            "seconds": round(seconds, 2),
            "per_run": [
                {
                    "set": result.run.set,
                    "fault": result.run.fault,
                    "samples": len(result.run.y),
                    "tripped": result.tripped,
                    "seconds": round(result.seconds, 2),
                }
                for result in results
            ],
        }
        echo_json(summary)
        return
    early = f", {tripped} ended early" if tripped else ""
    click.echo(f"wrote {out}: {len(results)} runs{early}, {samples} samples, {seconds:.1f} s")
    click.echo(f"sha256 {digest}")


if __name__ == "__main__":  # `python -m fedgate_bridge.simulate_runs_cli`, usable without cli.py
    simulate_runs_command()
