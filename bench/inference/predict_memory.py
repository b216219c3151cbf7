"""Peak memory of ``fedgate-agent predict`` on long files: a windows file (.npz) and a wide
historian export (.csv), scored with ``--json`` and as text, one process per run.

Each run is ``fedgate-agent predict --model <exported demo model> --input <file>`` as its own
process (output to /dev/null); its peak resident set is its ``VmHWM``, polled. "per window"
is the peak above that of a run on 1,000 windows of the same kind, divided by the extra
windows: what a longer file costs. A windows file is loaded whole (it is the user's array);
a historian export is imported into a temporary buffer, resampled on the grid, and its
windows cut from the grid a slice at a time.

    .venv/bin/python -m bench.inference.predict_memory             # ~2 min
    .venv/bin/python -m bench.inference.predict_memory --quick     # seconds
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedgate_agent.config import AgentConfig, WindowsConfig, write_config
from fedgate_agent.datasets.tep import tep_model_spec
from fedgate_agent.onnx_export import export_model, parity_windows
from fedgate_common.model_spec import initial_weights
from fedgate_common.text_table import format_table

from bench.inference.run import test_windows

PERIOD_S = 180.0
TAGS = tuple(f"XMEAS_{i}" for i in range(1, 53))
BASE = 1_000  # windows in the reference run of each kind


@dataclass(frozen=True)
class Run:
    kind: str  # "npz" or "csv"
    output: str  # "json" or "text"
    windows: int
    input_mb: float
    peak_mb: float
    seconds: float


def _agent(binary_dir: Path) -> str:
    return str(binary_dir / "fedgate-agent")


def write_npz(path: Path, windows: int) -> None:
    np.savez(path, x=test_windows(windows))


def write_csv(path: Path, windows: int) -> None:
    """A wide export on the 3-minute grid whose rows give ``windows`` windows of 20."""
    rows = test_windows((windows + 19 + 19) // 20).reshape(-1, len(TAGS))[: windows + 19]
    start = 1_764_374_400.0  # a multiple of PERIOD_S
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["timestamp", *TAGS])
        for i, values in enumerate(rows):
            writer.writerow([start + i * PERIOD_S, *(f"{v:.6g}" for v in values)])


def _high_water_kb(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def measure(command: Sequence[str]) -> tuple[float, float]:
    """Peak resident MB and wall seconds of one run of ``command`` (must succeed).

    The peak is the process's own high-water mark (``VmHWM``), read every 20 ms until it
    exits: ``wait4``'s ``ru_maxrss`` would count the pages of this (torch-laden) process
    that the child shared between fork and exec.
    """
    began = time.perf_counter()
    peak_kb = 0
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        while process.poll() is None:
            peak_kb = max(peak_kb, _high_water_kb(process.pid) or 0)
            time.sleep(0.02)
        seconds = time.perf_counter() - began
        if process.returncode != 0:
            errors.seek(0)
            message = errors.read().decode(errors="replace")
            raise SystemExit(f"{' '.join(command)} failed ({process.returncode}): {message}")
    return peak_kb / 1024, seconds


def run(sizes: Sequence[int], csv_sizes: Sequence[int], scratch: Path) -> list[Run]:
    spec = tep_model_spec(20)
    weights = initial_weights(spec, np.random.default_rng(0))
    exported = export_model(
        spec,
        weights,
        digest="be" * 32,
        round=0,
        windows=parity_windows(spec, test_windows(64)),
    )
    model = scratch / "model.onnx"
    model.write_bytes(exported.onnx)
    config = scratch / "agent.toml"
    write_config(
        config,
        AgentConfig(
            agent_id="bench",
            deployment="bench",
            cloud="cloud-1",
            state_dir=str(scratch / "state"),
            windows=WindowsConfig(tags=TAGS, period_s=PERIOD_S),
        ),
    )
    agent = _agent(Path(sys.executable).parent)
    runs: list[Run] = []
    for kind, counts, write in (("npz", sizes, write_npz), ("csv", csv_sizes, write_csv)):
        for windows in (BASE, *counts):
            path = scratch / f"in-{windows}.{kind}"
            write(path, windows)
            for output in ("json", "text"):
                command = [agent, "predict", "--config", str(config), "--model", str(model)]
                command += ["--input", str(path)] + (["--json"] if output == "json" else [])
                peak, seconds = measure(command)
                runs.append(Run(kind, output, windows, path.stat().st_size / 1e6, peak, seconds))
                print(f"  {kind} {output} {windows:,} windows: {peak:.0f} MB", flush=True)
            path.unlink()
    return runs


def table(runs: Sequence[Run]) -> str:
    base = {(r.kind, r.output): r for r in runs if r.windows == BASE}
    rows = []
    for r in runs:
        ref = base[(r.kind, r.output)]
        extra = r.windows - ref.windows
        per = f"{(r.peak_mb - ref.peak_mb) * 1024 / extra:.2f}" if extra else "-"
        rows.append(
            [r.kind, r.output, r.windows, f"{r.input_mb:.1f}", f"{r.peak_mb:.0f}", per,
             f"{r.seconds:.1f}"]
        )  # fmt: skip
    headers = ["input", "output", "windows", "input MB", "peak MB", "KB per window", "s"]
    return format_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 windows of each kind")
    args = parser.parse_args(argv)
    sizes = (5_000,) if args.quick else (50_000, 200_000)
    csv_sizes = (5_000,) if args.quick else (50_000,)
    with tempfile.TemporaryDirectory(prefix="fedgate-predict-bench-") as scratch:
        runs = run(sizes, csv_sizes, Path(scratch))
    print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
