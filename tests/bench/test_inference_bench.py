"""The inference benchmark runs end to end with tiny counts and prints its table: both
engines at each batch size, the parity gap and the verdict on the targets."""

from __future__ import annotations

import re

import pytest

from bench.inference.run import ENGINES, HEADERS, main

pytestmark = pytest.mark.slow


def test_the_benchmark_prints_a_row_per_engine_and_batch(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--windows", "80", "--batch", "1", "--batch", "8", "--blocks", "2"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["engine", "batch"]
    assert all(header.split()[0] in lines[0] for header in HEADERS)
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[2:6]]  # columns: 2+ spaces
    assert [(r[0], int(r[1])) for r in rows] == [
        (ENGINES[0], 1),
        (ENGINES[1], 1),
        (ENGINES[0], 8),
        (ENGINES[1], 8),
    ]
    for row in rows:
        assert int(row[2]) == 80  # windows timed
        p50, p99, mean, rate = float(row[3]), float(row[4]), float(row[5]), int(row[6])
        assert 0 < p50 <= p99
        assert mean > 0
        assert rate > 0
    assert rows[0][7] == rows[2][7] == "1.00 x"  # torch eager: the reference of its batch
    parity = next(line for line in lines if line.startswith("parity"))
    assert float(parity.rsplit("=", 1)[1]) <= 1e-4
    assert any(line.startswith("target (batch 1, the live case)") for line in lines)
