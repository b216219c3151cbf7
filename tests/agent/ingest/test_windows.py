"""Windows and labels over a real ingest buffer filled with known signals."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from fedgate_agent.ingest.buffer import BufferSettings, IngestBuffer
from fedgate_agent.ingest.errors import WindowingError
from fedgate_agent.ingest.samples import Sample
from fedgate_agent.ingest.windows import (
    LabelMode,
    LabelSpec,
    WindowSpec,
    build_windows,
    latest_window,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

T0 = 1_700_000_000.0  # a multiple of every period used here, so grid points are exact


def put(buffer: IngestBuffer, tag: str, times: Sequence[float], values: Sequence[float]) -> None:
    buffer.insert(
        [
            Sample(source=f"test:{tag}", seq=round(t * 1e6), tag=tag, ts=t, value=float(v))
            for t, v in zip(times, values, strict=True)
        ]
    )


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[IngestBuffer]:
    with IngestBuffer.open(BufferSettings(path=tmp_path / "buffer.db")) as opened:
        yield opened


def ramps(buffer: IngestBuffer, n: int = 40, *, skip_a: range = range(0)) -> None:
    """A = k, B = 10k at T0 + k seconds; FAULT = 0 published once (a flag that only reports
    changes)."""
    ks = [k for k in range(n) if k not in skip_a]
    put(buffer, "A", [T0 + k for k in ks], ks)
    put(buffer, "B", [T0 + k for k in range(n)], [10 * k for k in range(n)])
    put(buffer, "FAULT", [T0], [0])


def tag_label(**kwargs: object) -> LabelSpec:
    return LabelSpec(tag="FAULT", **kwargs)  # type: ignore[arg-type]


def test_window_contents_are_the_resampled_signals(buffer: IngestBuffer) -> None:
    ramps(buffer)
    spec = WindowSpec(
        tags=("A", "B"), period_s=1.0, length=4, stride=2, label=tag_label(), test_fraction=0
    )
    data = build_windows(buffer, spec)
    assert (data.grid_start, data.grid_end) == (T0, T0 + 39)
    assert (len(data.test), data.test_start) == (0, None)
    assert len(data.train) == (40 - 4) // 2 + 1
    for i, window in enumerate(data.train.x):
        k = np.arange(2 * i, 2 * i + 4)
        np.testing.assert_array_equal(window, np.stack([k, 10 * k], axis=1).astype(np.float32))
    assert data.train.x.dtype == np.dtype(np.float32)
    assert data.train.y.dtype == np.dtype(np.int64)
    assert (data.train.y == 0).all()
    assert data.dropped_windows == {}


def test_resampling_takes_the_last_observation_at_or_before_each_grid_point(
    buffer: IngestBuffer,
) -> None:
    # Observations 0.3 s after each full second: grid point k sees the value from k - 0.7.
    put(buffer, "A", [T0 + k + 0.3 for k in range(20)], range(20))
    put(buffer, "FAULT", [T0], [1])
    spec = WindowSpec(tags=("A",), period_s=1.0, length=3, label=tag_label(), test_fraction=0)
    data = build_windows(buffer, spec)
    assert data.grid_start == T0 + 1  # T0 itself precedes A's first observation
    np.testing.assert_array_equal(data.train.x[0, :, 0], [0, 1, 2])
    assert (data.train.y == 1).all()


def test_windows_touching_a_gap_longer_than_max_gap_are_dropped(buffer: IngestBuffer) -> None:
    ramps(buffer, skip_a=range(20, 25))  # A last seen at 19, again from 25
    spec = WindowSpec(
        tags=("A", "B"), period_s=1.0, length=4, max_gap_s=2.0, label=tag_label(), test_fraction=0
    )
    data = build_windows(buffer, spec)
    # Forward fill covers grid points 20 and 21 (1 s and 2 s after 19); 22..24 are missing.
    # Windows starting at 19..24 touch them: 6 dropped of 37.
    assert data.dropped_windows == {"missing_feature": 6}
    assert len(data.train) == 37 - 6
    starts = data.train.x[:, 0, 1] / 10  # B = 10k gives each window's first grid step
    assert set(starts.astype(int)) == set(range(37)) - set(range(19, 25))
    filled = data.train.x[starts == 17][0]  # grid 17..20: A at 20 is the value seen at 19
    np.testing.assert_array_equal(filled[:, 0], [17, 18, 19, 19])


def test_tag_labels_uniform_drops_windows_across_a_label_change(buffer: IngestBuffer) -> None:
    ramps(buffer)
    put(buffer, "FAULT", [T0 + 20], [3])  # fault 3 from grid point 20 on
    uniform = WindowSpec(tags=("A",), period_s=1.0, length=4, label=tag_label(), test_fraction=0)
    data = build_windows(buffer, uniform)
    assert data.dropped_windows == {"label_changes": 3}  # starts 17, 18, 19
    first = data.train.x[:, 0, 0]
    np.testing.assert_array_equal(data.train.y, np.where(first >= 20, 3, 0))
    assert not set(first.astype(int)) & {17, 18, 19}

    last_point = WindowSpec(
        tags=("A",), period_s=1.0, length=4, label=tag_label(uniform=False), test_fraction=0
    )
    data = build_windows(buffer, last_point)
    assert (len(data.train), data.dropped_windows) == (37, {})
    np.testing.assert_array_equal(data.train.y, np.where(data.train.x[:, -1, 0] >= 20, 3, 0))


def test_labels_outside_n_classes_or_not_integers_drop_their_windows(buffer: IngestBuffer) -> None:
    ramps(buffer, 30)
    put(buffer, "FAULT", [T0 + 10, T0 + 20], [7, 2.5])
    spec = WindowSpec(
        tags=("A",), period_s=1.0, length=2, n_classes=5, label=tag_label(), test_fraction=0
    )
    data = build_windows(buffer, spec)
    assert data.dropped_windows == {
        "label_changes": 2,
        "label_out_of_range": 9,
        "label_not_integer": 9,
    }
    assert set(data.train.y.tolist()) == {0}


def test_next_value_labels_are_bins_of_a_later_value(buffer: IngestBuffer) -> None:
    ramps(buffer)
    spec = WindowSpec(
        tags=("B",),
        period_s=1.0,
        length=3,
        label=LabelSpec(tag="A", mode=LabelMode.NEXT_VALUE, bins=(10, 20), horizon=2),
        n_classes=3,
        test_fraction=0,
    )
    data = build_windows(buffer, spec)
    assert len(data.train) == 40 - 3 - 2 + 1  # the last windows have no target yet
    target = data.train.x[:, -1, 0] / 10 + 2  # A two steps after each window's end
    np.testing.assert_array_equal(data.train.y, np.digitize(target, [10, 20]))
    assert set(data.train.y.tolist()) == {0, 1, 2}


def test_split_by_time_leaves_a_gap_and_no_overlap(buffer: IngestBuffer) -> None:
    ramps(buffer, 100)
    spec = WindowSpec(tags=("A",), period_s=1.0, length=5, label=tag_label(), test_fraction=0.2)
    data = build_windows(buffer, spec)
    assert data.test_start == T0 + 80
    test_first = data.test.x[:, 0, 0]
    train_last = data.train.x[:, -1, 0]
    assert (test_first.min(), test_first.max()) == (80, 95)
    assert train_last.max() == 80 - 5
    # Starts 72..79 end inside the gap or straddle the split: neither train nor test.
    assert data.dropped_windows == {"split_gap": 8}
    assert (len(data.train), len(data.test)) == (72, 16)


@pytest.fixture(scope="module")
def long_buffer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestBuffer]:
    path = tmp_path_factory.mktemp("windows") / "buffer.db"
    with IngestBuffer.open(BufferSettings(path=path)) as opened:
        n = 300
        put(opened, "TIME", [T0 + k for k in range(n)], range(n))
        put(opened, "FAULT", [T0 + k for k in range(0, n, 37)], [k % 3 for k in range(0, n, 37)])
        yield opened


@given(
    length=st.integers(1, 20),
    stride=st.integers(1, 7),
    test_fraction=st.floats(0.05, 0.6),
    horizon=st.integers(1, 5),
    next_value=st.booleans(),
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_every_training_window_ends_a_gap_before_every_test_window(
    long_buffer: IngestBuffer,
    length: int,
    stride: int,
    test_fraction: float,
    horizon: int,
    next_value: bool,
) -> None:
    label = (
        LabelSpec(tag="TIME", mode=LabelMode.NEXT_VALUE, bins=(100.0, 200.0), horizon=horizon)
        if next_value
        else LabelSpec(tag="FAULT", uniform=False)
    )
    spec = WindowSpec(
        tags=("TIME",),
        period_s=1.0,
        length=length,
        stride=stride,
        label=label,
        test_fraction=test_fraction,
        min_train_windows=0,
    )
    used_after = horizon if next_value else 0
    try:
        data = build_windows(long_buffer, spec)
    except WindowingError:
        # Refused only when no window fits into the test part at all.
        split = 300 - round(test_fraction * 300)
        assert not [s for s in range(0, 300 - length - used_after + 1, stride) if s >= split]
        return
    if len(data.train) and len(data.test):
        last_used_by_train = data.train.x[:, -1, 0].max() + used_after
        assert last_used_by_train <= data.test.x[:, 0, 0].min() - length
    assert data.test_start is not None
    assert (data.test.x[:, 0, 0] >= data.test_start - T0).all()


def test_missing_tags_are_named_with_the_tags_the_buffer_holds(buffer: IngestBuffer) -> None:
    ramps(buffer)
    spec = WindowSpec(tags=("A", "XMEAS_1"), period_s=1.0, length=4, label=tag_label())
    with pytest.raises(WindowingError, match=r"\['XMEAS_1'\].*A, B, FAULT"):
        build_windows(buffer, spec)


def test_too_few_windows_say_what_to_change(buffer: IngestBuffer) -> None:
    ramps(buffer, 10)
    spec = WindowSpec(tags=("A",), period_s=1.0, length=4, label=tag_label(), min_train_windows=20)
    with pytest.raises(
        WindowingError, match=r"only 2 training windows \(need 20\).*Collect more data"
    ):
        build_windows(buffer, spec)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"period_s": 0.0}, "period_s"),
        ({"length": 0}, "length"),
        ({"tags": ("A", "A")}, "twice"),
        ({"test_fraction": 1.0}, "test_fraction"),
        (
            {"n_classes": 4, "label": LabelSpec(tag="A", mode=LabelMode.NEXT_VALUE, bins=(1.0,))},
            "2 classes",
        ),
    ],
)
def test_invalid_specs_are_refused(changes: Mapping[str, object], message: str) -> None:
    arguments: dict[str, object] = {"tags": ("A",), "period_s": 1.0, "length": 4}
    arguments["label"] = tag_label()
    arguments.update(changes)
    with pytest.raises(WindowingError, match=message):
        WindowSpec(**arguments)  # type: ignore[arg-type]


def test_label_specs_validate_bins() -> None:
    with pytest.raises(WindowingError, match="increasing"):
        LabelSpec(tag="A", mode=LabelMode.NEXT_VALUE, bins=(2.0, 1.0))
    with pytest.raises(WindowingError, match="needs bins"):
        LabelSpec(tag="A", mode=LabelMode.NEXT_VALUE)


def test_latest_window_is_the_newest_complete_one(buffer: IngestBuffer) -> None:
    ramps(buffer, skip_a=range(36, 40))  # A stops at 35, B runs to 39
    spec = WindowSpec(tags=("A", "B"), period_s=1.0, length=4, max_gap_s=2.0, label=tag_label())
    window = latest_window(buffer, spec, now=T0 + 39.5)
    assert window is not None
    assert window.dtype == np.dtype(np.float32)
    assert window.shape == (4, 2)
    # Grid 38 and 39 lack A (last seen at 35, > 2 s): the newest complete window ends at 37.
    np.testing.assert_array_equal(window[:, 1], [340, 350, 360, 370])
    np.testing.assert_array_equal(window[:, 0], [34, 35, 35, 35])
    assert latest_window(buffer, spec, now=T0 + 33.2) is not None
    assert latest_window(buffer, spec, now=T0 + 400) is None  # sources silent for too long
    assert latest_window(buffer, spec, now=T0 + 1) is None  # not enough history yet


class _ArraySeries:
    """Arrays in memory: isolates the windowing cost from SQLite reads for the timing test."""

    def __init__(self, series: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]):
        self.series = series

    def tags(self) -> list[str]:
        return sorted(self.series)

    def read_series(
        self, tags: Sequence[str], start: float | None = None, end: float | None = None
    ) -> dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
        return {t: self.series[t] for t in tags if t in self.series}


def test_windowing_a_million_samples_is_fast() -> None:
    rng = np.random.default_rng(0)
    n_tags, per_tag = 10, 100_000
    series = {}
    for j in range(n_tags):
        ts = T0 + np.sort(rng.uniform(0, per_tag, per_tag))
        series[f"T{j}"] = (ts, rng.normal(size=per_tag))
    series["FAULT"] = (np.array([T0]), np.array([0.0]))
    spec = WindowSpec(
        tags=tuple(f"T{j}" for j in range(n_tags)),
        period_s=1.0,
        length=20,
        stride=5,
        max_gap_s=10.0,
        label=LabelSpec(tag="FAULT"),
    )
    started = time.perf_counter()
    data = build_windows(_ArraySeries(series), spec)
    elapsed = time.perf_counter() - started
    assert len(data.train) + len(data.test) > 15_000
    assert np.isfinite(data.train.x).all()
    assert elapsed < 2.0, f"{elapsed:.2f} s for 10^6 samples"


def test_a_value_beyond_float32_drops_the_windows_it_touches(buffer: IngestBuffer) -> None:
    """1e308 is finite in the buffer (float64) and infinite in a float32 window: the windows
    that hold it are dropped and counted, and the rest still train."""
    ramps(buffer, skip_a=range(31, 32))
    put(buffer, "A", [T0 + 30.5], [1e308])  # forward-filled to grid point 31 only
    spec = WindowSpec(tags=("A", "B"), period_s=1.0, length=4, label=tag_label(), test_fraction=0)
    data = build_windows(buffer, spec)
    assert data.dropped_windows == {"not_finite": 4}  # windows starting at 28..31
    assert len(data.train) == 37 - 4
    assert np.isfinite(data.train.x).all()


def test_one_stray_old_sample_does_not_stretch_the_grid(
    buffer: IngestBuffer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sample decades old would make a grid of millions of points; the grid keeps the
    newest MAX_GRID_CELLS / tags points and counts what it leaves out."""
    monkeypatch.setattr("fedgate_agent.ingest.windows.MAX_GRID_CELLS", 60)
    ramps(buffer)
    put(buffer, "A", [T0 - 1e9], [5.0])
    put(buffer, "B", [T0 - 1e9], [5.0])
    put(buffer, "FAULT", [T0 - 1e9], [0])
    spec = WindowSpec(
        tags=("A", "B"), period_s=1.0, length=4, max_gap_s=2.0, label=tag_label(), test_fraction=0
    )
    data = build_windows(buffer, spec)
    assert data.grid_end == T0 + 39
    assert data.grid_start == T0 + 39 - 29  # 60 cells / 2 tags = 30 grid points
    assert data.dropped_windows["before_grid"] > 0
    assert len(data.train) == 30 - 4 + 1
