"""Simulated plant-runs files: what `fedgate-bridge simulate-runs` writes and
`fedgate-agent pretrain` reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedgate_common.errors import PlantRunsInvalid
from fedgate_common.plant_runs import PlantRun, RunsMeta, load_plant_runs, save_plant_runs

from tests.npz_support import HUGE_SHAPE, npy_header_only, with_member

META = RunsMeta(
    simulator="tep-studio 0.2.0",
    seed=1,
    sets=1,
    hours=2.0,
    fault_start_h=1.0,
    sample_minutes=3.0,
    control_seconds=9.0,
    created_at="2026-11-29T12:00:00Z",
)


def _runs() -> list[PlantRun]:
    rng = np.random.default_rng(0)
    return [
        PlantRun(fault=0, set=0, x=rng.normal(size=(40, 3)), y=np.zeros(40, dtype=np.int64)),
        PlantRun(
            fault=4,
            set=0,
            x=rng.normal(size=(25, 3)),
            y=np.where(np.arange(25) < 20, 0, 4).astype(np.int64),
        ),
    ]


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "runs.npz"
    save_plant_runs(path, _runs(), META)
    meta, runs = load_plant_runs(path)
    assert meta == META
    assert [(r.fault, r.set, len(r.y)) for r in runs] == [(0, 0, 40), (4, 0, 25)]
    for got, want in zip(runs, _runs(), strict=True):
        np.testing.assert_array_equal(got.x, want.x)
        np.testing.assert_array_equal(got.y, want.y)
    assert [p.name for p in tmp_path.iterdir()] == ["runs.npz"]


def _rewrite(path: Path, **changes: object) -> None:
    with np.load(path) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"x": np.full((65, 3), np.nan)}, "NaN or Inf"),
        ({"y": np.zeros(64, dtype=np.int64)}, "65 samples but 64 labels"),
        ({"run_lengths": np.asarray([40, 20])}, "add up to 60"),
        ({"run_sets": np.asarray([0])}, "disagree"),
        ({"y": np.full(65, -1, dtype=np.int64)}, "negative"),
        ({"x": np.zeros(65)}, "2-D float"),
        ({"meta": None}, "no meta"),
        ({"meta": np.asarray('{"format": "fedgate-plant-runs/7"}')}, "this release reads"),
        ({"meta": np.asarray('{"format": "fedgate-plant-runs/1"}')}, "bad meta"),
        ({"meta": np.asarray("{not json")}, "bad meta"),
    ],
)
def test_inconsistent_files_are_refused(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    path = tmp_path / "runs.npz"
    save_plant_runs(path, _runs(), META)
    _rewrite(path, **changes)
    with pytest.raises(PlantRunsInvalid, match=message):
        load_plant_runs(path)


def test_unreadable_and_truncated_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "runs.npz"
    save_plant_runs(path, _runs(), META)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(PlantRunsInvalid, match=r"runs\.npz: cannot read it"):
        load_plant_runs(path)
    with pytest.raises(PlantRunsInvalid, match="cannot read it"):
        load_plant_runs(tmp_path / "missing.npz")


def test_a_bare_npy_or_a_header_declaring_a_huge_array_is_refused(tmp_path: Path) -> None:
    saved = tmp_path / "runs.npz"
    save_plant_runs(saved, _runs(), META)
    bare = tmp_path / "runs.npy"
    np.save(bare, _runs()[0].x)
    huge_npy = tmp_path / "huge.npy"
    huge_npy.write_bytes(npy_header_only(HUGE_SHAPE))
    huge_npz = tmp_path / "huge.npz"
    huge_npz.write_bytes(with_member(saved.read_bytes(), "x.npy", npy_header_only(HUGE_SHAPE)))
    long_header = tmp_path / "long-header.npz"
    long_header.write_bytes(
        with_member(saved.read_bytes(), "x.npy", npy_header_only((65, 3), padding=20_000))
    )
    for path, message in [
        (bare, r"runs\.npy: holds a single array \(\.npy\), not a simulated-runs \.npz"),
        (huge_npy, r"huge\.npy: an array is larger than this machine can load"),
        (huge_npz, r"huge\.npz: an array is larger than this machine can load"),
        (long_header, r"long-header\.npz: cannot read it: Header info length"),
    ]:
        with pytest.raises(PlantRunsInvalid, match=message):
            load_plant_runs(path)


def test_nothing_or_ragged_runs_are_not_written(tmp_path: Path) -> None:
    path = tmp_path / "runs.npz"
    with pytest.raises(PlantRunsInvalid, match="no run"):
        save_plant_runs(path, [], META)
    ragged = [*_runs(), PlantRun(fault=1, set=0, x=np.zeros((3, 5)), y=np.zeros(3, np.int64))]
    with pytest.raises(PlantRunsInvalid, match="same number of features"):
        save_plant_runs(path, ragged, META)
    short = [*_runs(), PlantRun(fault=1, set=0, x=np.zeros((3, 3)), y=np.zeros(4, np.int64))]
    with pytest.raises(PlantRunsInvalid, match="fault 1: 3 samples, 4 labels"):
        save_plant_runs(path, short, META)
    nan = [*_runs(), PlantRun(fault=1, set=0, x=np.full((2, 3), np.inf), y=np.zeros(2, np.int64))]
    with pytest.raises(PlantRunsInvalid, match="NaN or Inf"):
        save_plant_runs(path, nan, META)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_run_is_kept_and_the_file_is_readable_by_others(tmp_path: Path) -> None:
    """A run that tripped at once has no sample; the file is not private to its writer."""
    path = tmp_path / "runs.npz"
    empty = PlantRun(fault=6, set=0, x=np.asarray([]), y=np.asarray([], dtype=np.int64))
    save_plant_runs(path, [*_runs(), empty], META)
    _, runs = load_plant_runs(path)
    assert [len(r.y) for r in runs] == [40, 25, 0]
    assert runs[2].x.shape == (0, 3)
    assert path.stat().st_mode & 0o044 == 0o044
