"""A tiny run of bench/inference/predict_memory.py: it measures real predict processes."""

from __future__ import annotations

from pathlib import Path

from bench.inference.predict_memory import BASE, run, table


def test_each_kind_and_output_is_measured_in_its_own_process(tmp_path: Path) -> None:
    runs = run((1_300,), (1_300,), tmp_path)
    assert [(r.kind, r.output, r.windows) for r in runs] == [
        (kind, output, windows)
        for kind in ("npz", "csv")
        for windows in (BASE, 1_300)
        for output in ("json", "text")
    ]
    # a predict process imports onnxruntime and numpy: far more than the polling's floor
    assert all(r.peak_mb > 50 and r.seconds > 0 for r in runs)
    npz_big = next(r for r in runs if r.kind == "npz" and r.windows == 1_300)
    assert npz_big.input_mb > 1_300 * 20 * 52 * 4 / 1e6  # the windows as float32
    lines = table(runs).splitlines()
    assert lines[0].split()[:3] == ["input", "output", "windows"]
    assert len(lines) == 2 + len(runs)
    assert list(tmp_path.glob("in-*")) == []  # each input is removed after its runs
