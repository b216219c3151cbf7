"""`fedgate-bridge simulate-runs`: simulated TEP runs exported to a plant-runs file.

The command runs as a user runs it (the installed console script, a real simulator, real
worker processes), kept short: 1.5 simulated hours per run, the fault on from 0.5 h.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedgate_bridge.errors import ConfigError
from fedgate_bridge.simulate_runs_cli import SimulateRunsExitCode
from fedgate_bridge.simulator.plant_runs import RunsPlan, parse_fault_list, plant_seed
from fedgate_common.plant_runs import PLANT_RUNS_FORMAT, PlantRun, load_plant_runs

SIMULATE_RUNS = [str(Path(sys.executable).with_name("fedgate-bridge")), "simulate-runs"]
SHORT = ("--hours", "1.5", "--fault-start-h", "0.5")  # 30 samples, the fault from sample 10
SAMPLE_H = 0.05


def run_command(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIMULATE_RUNS, *args], capture_output=True, text=True, timeout=timeout)


def arrays(runs: list[PlantRun]) -> list[tuple[int, int, list[float], list[int]]]:
    return [(r.set, r.fault, r.x.ravel().tolist(), r.y.tolist()) for r in runs]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """Seed 1, two sets of faults 0 and 1 over two worker processes, with --json."""
    out = tmp_path_factory.mktemp("runs") / "runs.npz"
    started = time.monotonic()
    result = run_command(
        "--out", str(out), *SHORT, "--faults", "0,1", "--sets", "2", "--jobs", "2", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 20  # a few seconds on 2 busy cores
    return out, json.loads(result.stdout), result.stderr


# -- the core, in process ---------------------------------------------------------------


def test_fault_lists_keep_the_order_given() -> None:
    assert parse_fault_list("0-20") == tuple(range(21))
    assert parse_fault_list("4, 0-2,7") == (4, 0, 1, 2, 7)
    with pytest.raises(ConfigError, match="fault 22 is not in the TEP data set"):
        parse_fault_list("20-99999999999")  # refused before the range is built
    plan = RunsPlan(seed=3, sets=2, faults=(4, 0))
    assert [(r.set_index, r.fault) for r in plan.requests()] == [(0, 4), (0, 0), (1, 4), (1, 0)]
    # set k of seed S is set 0 of seed S + k, as in bench/privacy/public_pretraining.py
    assert plant_seed(3, 1, 4) == plant_seed(4, 0, 4) == 404


# -- the command --------------------------------------------------------------------------


@pytest.mark.parametrize("hours", [1e308, 1000.5, float("inf")])
def test_a_plan_longer_than_the_longest_run_is_a_config_error(hours: float) -> None:
    with pytest.raises(ConfigError, match="at most 1000"):
        RunsPlan(seed=1, sets=1, faults=(0,), hours=hours)


def test_help_has_an_example_and_the_exit_codes() -> None:
    result = run_command("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: fedgate-bridge simulate-runs")
    assert "fedgate-bridge simulate-runs --out" in result.stdout
    assert "Exit codes" in result.stdout
    for code in SimulateRunsExitCode:
        assert f"  {int(code)} " in result.stdout, code


def test_runs_come_in_set_then_fault_order_with_their_meta(
    simulated: tuple[Path, dict[str, Any], str],
) -> None:
    out, _, stderr = simulated
    meta, runs = load_plant_runs(out)
    assert [(r.set, r.fault) for r in runs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for run in runs:
        assert run.x.shape == (30, 52)
        assert run.y.shape == (30,)
    assert meta.format == PLANT_RUNS_FORMAT
    assert re.fullmatch(r"tep-studio \d+\.\d+\.\S+", meta.simulator)
    assert (meta.seed, meta.sets, meta.hours, meta.fault_start_h) == (1, 2, 1.5, 0.5)
    assert (meta.sample_minutes, meta.control_seconds) == (3.0, 9.0)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta.created_at)
    # one progress line per finished run, on stderr
    assert len(re.findall(r"^run \d/4  set \d fault \d: 30 samples, ", stderr, re.M)) == 4


def test_labels_are_the_fault_from_its_start(simulated: tuple[Path, dict[str, Any], str]) -> None:
    _, runs = load_plant_runs(simulated[0])
    for run in runs:
        times = (np.arange(len(run.y)) + 1) * SAMPLE_H  # the first sample is at 3 min
        before, after = times < 0.5 - 1e-9, times > 0.5 + 1e-9
        assert (run.y[before] == 0).all()
        assert (run.y[after] == run.fault).all()
        # The sample at the onset carries the fault's label, though the plant has not yet
        # felt it (the disturbance acts from the next control step); either is accepted.
        assert set(run.y[~before & ~after].tolist()) <= {0, run.fault}


def test_json_summary_matches_the_file(simulated: tuple[Path, dict[str, Any], str]) -> None:
    out, summary, _ = simulated
    _, runs = load_plant_runs(out)
    assert summary["file"] == str(out)
    assert summary["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert summary["runs"] == len(runs) == 4
    assert summary["samples"] == sum(len(r.y) for r in runs) == 120
    assert summary["seconds"] > 0
    assert [(r["set"], r["fault"], r["samples"], r["tripped"]) for r in summary["per_run"]] == [
        (r.set, r.fault, len(r.y), False) for r in runs
    ]


def test_the_same_seed_gives_the_same_runs_whatever_jobs(
    simulated: tuple[Path, dict[str, Any], str], tmp_path: Path
) -> None:
    _, runs = load_plant_runs(simulated[0])
    again = tmp_path / "again.npz"
    again.write_bytes(b"an older file")
    result = run_command(
        "--out", str(again), "--force", *SHORT, "--faults", "0,1", "--sets", "2", "--jobs", "1"
    )
    assert result.returncode == 0, result.stderr
    assert arrays(load_plant_runs(again)[1]) == arrays(runs)


def test_another_seed_differs_and_set_k_is_set_0_of_seed_plus_k(
    simulated: tuple[Path, dict[str, Any], str], tmp_path: Path
) -> None:
    _, runs = load_plant_runs(simulated[0])
    seed_2 = tmp_path / "seed-2.npz"
    result = run_command(
        "--out", str(seed_2), "--seed", "2", *SHORT, "--faults", "0,1", "--sets", "1"
    )
    assert result.returncode == 0, result.stderr
    other = load_plant_runs(seed_2)[1]
    assert arrays(other) != arrays(runs[:2])  # another seed, other noise
    # set 1 of seed 1 is set 0 of seed 2 (only the set number differs)
    for got, want in zip(other, runs[2:], strict=True):
        assert (got.fault, got.set, want.set) == (want.fault, 0, 1)
        np.testing.assert_array_equal(got.x, want.x)
        np.testing.assert_array_equal(got.y, want.y)


def test_a_run_that_trips_ends_there(tmp_path: Path) -> None:
    # IDV6 (A feed loss) shuts the plant down about 7.4 h after its start.
    out = tmp_path / "trip.npz"
    result = run_command(
        *("--out", str(out), "--faults", "6", "--sets", "1", "--hours", "10"),
        *("--fault-start-h", "0.5", "--control-seconds", "36", "--json"),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["per_run"][0]["tripped"] is True
    assert "ended early: the plant shut down at 7." in result.stderr
    (run,) = load_plant_runs(out)[1]
    assert 140 < len(run.y) == summary["samples"] < 200
    assert (run.y[10:] == 6).all()


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "runs.npz"
    out.write_bytes(b"keep me")
    result = run_command("--out", str(out), *SHORT, "--faults", "0", "--sets", "1")
    assert result.returncode == SimulateRunsExitCode.EXISTS
    assert "--force" in result.stderr
    assert "simulating" not in result.stderr
    assert out.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["runs.npz"]
    as_json = run_command("--out", str(out), *SHORT, "--faults", "0", "--sets", "1", "--json")
    assert as_json.returncode == SimulateRunsExitCode.EXISTS
    report = json.loads(as_json.stdout)  # a script reading --json gets JSON on failure too
    assert report["exit_code"] == int(SimulateRunsExitCode.EXISTS)
    assert "--force" in report["error"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--faults", "0,21"), "IDV 21 (random A feed temperature) is not"),
        (("--faults", "0-22"), "fault 22"),
        (("--faults", "7-4"), "low-high"),
        (("--faults", "1,x"), "0,1,4-7"),
        (("--faults", "1,0-2"), "fault 1 is listed twice"),
        (("--hours", "1.5", "--fault-start-h", "1.5"), "not before the end of the run"),
        (("--fault-start-h", "-1"), "--fault-start-h"),
        (("--hours", "0.01"), "--hours"),
        (("--hours", "nan"), "hours must be"),
        (("--hours", "1e308"), "Invalid value for '--hours'"),
        (("--hours", "inf"), "Invalid value for '--hours'"),
        (("--hours", "-1"), "Invalid value for '--hours'"),
        (("--hours", "1000.5"), "0.05<=x<=1000.0"),
        (("--sets", "0"), "--sets"),
        (("--jobs", "0"), "--jobs"),
        (("--control-seconds", "7"), "control steps"),
    ],
)
def test_bad_options_exit_2_before_simulating(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = run_command("--out", str(tmp_path / "runs.npz"), *args)
    assert result.returncode == SimulateRunsExitCode.USAGE, result.stderr
    assert message in result.stderr
    assert "simulating" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_out_in_a_file_exits_3(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = run_command("--out", str(tmp_path / "file" / "runs.npz"), *SHORT)
    assert result.returncode == SimulateRunsExitCode.OUTPUT
    assert "is not a directory" in result.stderr


def test_missing_tep_studio_says_how_to_install(tmp_path: Path) -> None:
    out = tmp_path / "runs.npz"
    code = (
        "import sys; sys.modules['tep_studio'] = None  # `import tep_studio` fails\n"
        "from fedgate_bridge.cli import main\n"
        f"main(['simulate-runs', '--out', {str(out)!r}], prog_name='fedgate-bridge')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == SimulateRunsExitCode.SIMULATOR_FAILED
    assert "pip install 'fedgate-bridge[sim]'" in result.stderr
    assert not out.exists()


def _children(pid: int) -> list[int]:
    """The pids of ``pid``'s children (Linux)."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_stops_the_workers_and_writes_nothing(
    tmp_path: Path, signum: signal.Signals
) -> None:
    out = tmp_path / "runs.npz"
    process = subprocess.Popen(
        [*SIMULATE_RUNS, "--out", str(out), "--faults", "0-3", "--sets", "1", "--jobs", "2"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        assert process.stderr.readline().startswith("simulating 4 runs")
        deadline = time.monotonic() + 10
        while len(workers := _children(process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(workers) == 2
        time.sleep(0.3)  # the workers are mid-run: a 25 h run takes several seconds
        process.send_signal(signum)
        assert process.wait(timeout=20) == SimulateRunsExitCode.INTERRUPTED
        assert "interrupted; nothing written" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert list(tmp_path.iterdir()) == []  # no file, no temporary file
    for worker in workers:
        assert not Path(f"/proc/{worker}").exists(), worker
