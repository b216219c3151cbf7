"""Training windows and labels over the ingest buffer.

Samples arrive per tag at their own times; a model wants a regular ``(window, n_features)``
matrix. So every tag is *resampled* onto one time grid (``period_s`` apart, aligned to
multiples of ``period_s`` since the epoch so live windows and training windows line up):
the value at grid time ``t`` is the last observation with ``ts <= t``, if it is at most
``max_gap_s`` old. A grid point where some feature has no such observation is *missing*
and every window touching it is dropped, so a sensor outage never turns into invented
values beyond ``max_gap_s`` of forward fill.

Labels come from the buffer too (:class:`LabelSpec`):

- ``mode="tag"``: the class is the integer value of a label tag (a fault flag, a quality
  class; for live TEP the ``FAULT`` tag) at the window's last grid point. With
  ``uniform=True`` windows whose label changes inside the window are dropped, as the
  offline TEP windows are at a fault's onset (:func:`fedgate_agent.datasets.tep.make_windows`).
- ``mode="next_value"``: forecasting as classification. The class is the bin of the label
  tag's value ``horizon`` grid steps after the window's end (``len(bins) + 1`` classes:
  below ``bins[0]`` is class 0, ``[bins[i-1], bins[i])`` is class ``i``, at or above
  ``bins[-1]`` is the last class).

The split into train and test is by time, never by shuffling: windows starting in the last
``test_fraction`` of the grid are test windows; training windows end (label target
included) at least ``length`` grid steps before the first test grid point, so no window
and no label straddles the boundary and autocorrelation cannot leak test data into
training.

Everything is vectorised with numpy (:func:`numpy.searchsorted` for the resampling,
cumulative sums for the per-window checks), so a million samples take well under a second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fedgate_agent.ingest.errors import WindowingError
from fedgate_agent.local_dataset import LocalDataset

__all__ = [
    "LabelMode",
    "LabelSpec",
    "SeriesReader",
    "WindowSpec",
    "WindowedData",
    "build_windows",
    "latest_window",
]

Floats = npt.NDArray[np.float64]
Series = tuple[Floats, Floats]

#: Why windows were dropped; the keys of :attr:`WindowedData.dropped_windows`.
DROP_MISSING_FEATURE = "missing_feature"
DROP_MISSING_LABEL = "missing_label"
DROP_LABEL_CHANGES = "label_changes"
DROP_LABEL_NOT_INTEGER = "label_not_integer"
DROP_LABEL_OUT_OF_RANGE = "label_out_of_range"
DROP_SPLIT_GAP = "split_gap"
DROP_NOT_FINITE = "not_finite"  # a feature too large for float32 (it became ±inf)
DROP_BEFORE_GRID = "before_grid"  # older than the newest MAX_GRID_CELLS / tags grid points

#: The most grid points × feature tags one windowing builds (float32: 4 bytes each). A
#: buffer whose samples span longer is windowed over its newest part only.
MAX_GRID_CELLS = 25_000_000


class SeriesReader(Protocol):
    """What windowing needs from :class:`~fedgate_agent.ingest.buffer.IngestBuffer`."""

    def tags(self) -> list[str]: ...

    def read_series(
        self, tags: Sequence[str], start: float | None = None, end: float | None = None
    ) -> Mapping[str, Series]: ...


class LabelMode(StrEnum):
    TAG = "tag"
    NEXT_VALUE = "next_value"


@dataclass(frozen=True)
class LabelSpec:
    """Where a window's class comes from (see the module docstring).

    ``tag``: the label tag (``FAULT``; need not be a feature). ``uniform`` (mode ``tag``):
    drop windows whose label changes inside them. ``bins`` / ``horizon`` (mode
    ``next_value``): sorted bin edges and how many grid steps after the window's end the
    target value lies. ``max_gap_s``: how old the label tag's last observation may be;
    ``None`` means unlimited in mode ``tag`` (fault flags are often published only when they
    change) and the window's ``max_gap_s`` in mode ``next_value``.
    """

    tag: str
    mode: LabelMode = LabelMode.TAG
    uniform: bool = True
    bins: tuple[float, ...] = ()
    horizon: int = 1
    max_gap_s: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", LabelMode(self.mode))
        object.__setattr__(self, "bins", tuple(float(b) for b in self.bins))
        if not self.tag:
            raise WindowingError("label.tag is empty; name the tag that holds the label")
        if self.mode is LabelMode.NEXT_VALUE:
            if not self.bins:
                raise WindowingError(
                    "label mode next_value needs bins (sorted edges, len(bins) + 1 classes)"
                )
            if not all(math.isfinite(b) for b in self.bins) or any(
                b >= c for b, c in zip(self.bins, self.bins[1:], strict=False)
            ):
                raise WindowingError(f"label.bins {self.bins} must be finite and increasing")
            if self.horizon < 1:
                raise WindowingError(f"label.horizon is {self.horizon}; it must be at least 1")
        if self.max_gap_s is not None and not self.max_gap_s >= 0:
            raise WindowingError(f"label.max_gap_s is {self.max_gap_s}; use a value >= 0")

    @property
    def steps_after_window(self) -> int:
        """Grid steps after a window's last point that its label reads (0 in mode tag)."""
        return self.horizon if self.mode is LabelMode.NEXT_VALUE else 0


@dataclass(frozen=True)
class WindowSpec:
    """How to cut the buffer into training windows.

    ``tags``: feature tags, in feature order (the model's ``n_features`` = ``len(tags)``).
    ``period_s``: resampling grid step. ``length``: grid points per window (the model's
    ``window``). ``stride``: grid steps between window starts. ``max_gap_s``: forward-fill
    limit; ``None`` = ``2 * period_s``. ``test_fraction``: share of the grid (by time, at
    the end) whose windows are test windows, in [0, 1). ``n_classes``: when set, labels
    outside ``0 .. n_classes - 1`` drop their windows (counted as ``label_out_of_range``).
    ``min_train_windows``: fewer training windows than this raise :class:`WindowingError`.
    """

    tags: tuple[str, ...]
    period_s: float
    length: int
    label: LabelSpec
    stride: int = 1
    max_gap_s: float | None = None
    test_fraction: float = 0.2
    n_classes: int | None = None
    min_train_windows: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", tuple(self.tags))
        problems: list[str] = []
        if not self.tags:
            problems.append("tags is empty; list the feature tags in model order")
        if len(set(self.tags)) != len(self.tags):
            problems.append(f"tags {list(self.tags)} name a tag twice")
        if not (math.isfinite(self.period_s) and self.period_s > 0):
            problems.append(f"period_s is {self.period_s}; use a positive number of seconds")
        if self.length < 1:
            problems.append(f"length is {self.length}; a window needs at least 1 grid point")
        if self.stride < 1:
            problems.append(f"stride is {self.stride}; use at least 1")
        if self.max_gap_s is not None and not self.max_gap_s >= 0:
            problems.append(f"max_gap_s is {self.max_gap_s}; use a value >= 0")
        if not 0 <= self.test_fraction < 1:
            problems.append(f"test_fraction is {self.test_fraction}; use a value in [0, 1)")
        if self.n_classes is not None:
            if self.n_classes < 1:
                problems.append(f"n_classes is {self.n_classes}; use at least 1")
            elif (
                self.label.mode is LabelMode.NEXT_VALUE
                and self.n_classes != len(self.label.bins) + 1
            ):
                problems.append(
                    f"n_classes is {self.n_classes} but {len(self.label.bins)} bin edges make "
                    f"{len(self.label.bins) + 1} classes"
                )
        if self.min_train_windows < 0:
            problems.append(f"min_train_windows is {self.min_train_windows}; use 0 or more")
        if problems:
            raise WindowingError("invalid window spec: " + "; ".join(problems))

    @property
    def feature_max_gap_s(self) -> float:
        return 2 * self.period_s if self.max_gap_s is None else self.max_gap_s

    @property
    def label_max_gap_s(self) -> float:
        if self.label.max_gap_s is not None:
            return self.label.max_gap_s
        return math.inf if self.label.mode is LabelMode.TAG else self.feature_max_gap_s


@dataclass(frozen=True, eq=False)
class WindowedData:
    """Windows cut from the buffer, split by time.

    ``grid_start`` / ``grid_end``: first and last grid time (seconds since the epoch);
    ``test_start``: first grid time of the test part (``None`` when ``test_fraction`` is 0);
    ``dropped_windows``: candidate windows left out, by reason (``missing_feature``,
    ``missing_label``, ``label_changes``, ``label_not_integer``, ``label_out_of_range``,
    ``split_gap``).
    """

    train: LocalDataset
    test: LocalDataset
    grid_start: float
    grid_end: float
    test_start: float | None
    dropped_windows: dict[str, int] = field(default_factory=dict)


def resample(
    series: Series, grid: Floats, max_gap_s: float
) -> tuple[Floats, npt.NDArray[np.bool_]]:
    """Values of ``series`` (sorted ``(ts, value)``) at ``grid``, and which are present.

    The value at ``t`` is the last observation with ``ts <= t`` if ``t - ts <= max_gap_s``;
    absent points hold NaN.
    """
    ts, values = series
    index = np.searchsorted(ts, grid, side="right") - 1
    has_previous = index >= 0
    safe = np.where(has_previous, index, 0)
    if len(ts) == 0:
        present = np.zeros(len(grid), dtype=bool)
        return np.full(len(grid), np.nan), present
    present = has_previous & (grid - ts[safe] <= max_gap_s)
    return np.where(present, values[safe], np.nan), present


def _grid(start: float, end: float, period_s: float) -> Floats:
    """Multiples of ``period_s`` in ``[start, end]`` (aligned to the epoch)."""
    first = math.ceil(start / period_s)
    last = math.floor(end / period_s)
    if last < first:
        return np.empty(0, dtype=np.float64)
    return np.arange(first, last + 1, dtype=np.float64) * period_s


def _window_all(
    flags: npt.NDArray[np.bool_], starts: npt.NDArray[np.int64], length: int
) -> npt.NDArray[np.bool_]:
    """Whether ``flags[s : s + length]`` is all true, for every ``s`` in ``starts``."""
    bad = np.concatenate(([0], np.cumsum(~flags, dtype=np.int64)))
    result: npt.NDArray[np.bool_] = bad[starts + length] - bad[starts] == 0
    return result


def _read(
    buffer: SeriesReader, tags: Sequence[str], start: float | None, end: float | None
) -> dict[str, Series]:
    # The buffer's end bound is exclusive; windows include an observation at exactly `end`.
    series = buffer.read_series(
        list(tags), start, None if end is None else math.nextafter(end, math.inf)
    )
    found: dict[str, Series] = {}
    for tag in tags:
        pair = series.get(tag)
        if pair is not None and len(pair[0]) > 0:
            ts = np.asarray(pair[0], dtype=np.float64)
            values = np.asarray(pair[1], dtype=np.float64)
            found[tag] = (ts, values)
    return found


def _missing_tags_error(
    buffer: SeriesReader, missing: Sequence[str], start: float | None, end: float | None
) -> WindowingError:
    known = buffer.tags()
    shown = ", ".join(known[:20]) + (f", … ({len(known)} in all)" if len(known) > 20 else "")
    where = "" if start is None and end is None else f" between {start} and {end}"
    return WindowingError(
        f"tags {list(missing)} have no samples in the buffer{where}; ingest them or fix the "
        f"tag names (the buffer holds: {shown or 'nothing yet'})"
    )


def _labels_at(
    spec: WindowSpec, label_values: Floats, label_present: npt.NDArray[np.bool_]
) -> tuple[Floats, npt.NDArray[np.bool_]]:
    """Per-grid-point class (as float, NaN where absent) in mode tag, or binned target value."""
    if spec.label.mode is LabelMode.NEXT_VALUE:
        classes = np.searchsorted(np.asarray(spec.label.bins), label_values, side="right")
        return np.where(label_present, classes.astype(np.float64), np.nan), label_present
    return label_values, label_present


def build_windows(
    buffer: SeriesReader,
    spec: WindowSpec,
    *,
    start: float | None = None,
    end: float | None = None,
) -> WindowedData:
    """Cut ``buffer``'s samples in ``[start, end]`` (seconds, both included; ``None`` = all)
    into windows.

    Returns float32 ``(n, spec.length, len(spec.tags))`` windows with int64 labels, split by
    time into train and test (see the module docstring). Raises :class:`WindowingError`
    naming what to fix when a feature or the label tag has no samples, or fewer than
    ``spec.min_train_windows`` training windows (or, with ``test_fraction > 0``, no test
    window) result.
    """
    wanted = list(dict.fromkeys((*spec.tags, spec.label.tag)))
    series = _read(buffer, wanted, start, end)
    missing = [tag for tag in wanted if tag not in series]
    if missing:
        raise _missing_tags_error(buffer, missing, start, end)

    # The grid starts once every tag has been seen (no window before that could be complete).
    first = max(float(s[0][0]) for s in series.values()) if start is None else start
    last = max(float(s[0][-1]) for s in series.values()) if end is None else end
    dropped: dict[str, int] = {}
    most = max(MAX_GRID_CELLS // max(len(spec.tags), 1), spec.length + 1)
    span = math.floor(last / spec.period_s) - math.ceil(first / spec.period_s) + 1
    if span > most:  # one stray old sample must not stretch the grid over decades
        dropped[DROP_BEFORE_GRID] = (span - most) // spec.stride
        first = (math.floor(last / spec.period_s) - most + 1) * spec.period_s
    grid = _grid(first, last, spec.period_s)
    n_grid = len(grid)

    features = np.empty((n_grid, len(spec.tags)), dtype=np.float32)
    features_present = np.ones(n_grid, dtype=bool)
    for column, tag in enumerate(spec.tags):
        values, present = resample(series[tag], grid, spec.feature_max_gap_s)
        with np.errstate(over="ignore"):  # beyond float32: ±inf, dropped below
            features[:, column] = values
        features_present &= present
    features_finite: npt.NDArray[np.bool_] = np.asarray(np.isfinite(features).all(axis=1))
    label_raw, label_present = resample(series[spec.label.tag], grid, spec.label_max_gap_s)
    label_values, label_present = _labels_at(spec, label_raw, label_present)

    after = spec.label.steps_after_window
    starts = np.arange(0, max(n_grid - spec.length - after + 1, 0), spec.stride, dtype=np.int64)
    ends = starts + spec.length - 1
    targets = ends + after

    keep = np.ones(len(starts), dtype=bool)

    def drop(reason: str, bad: npt.NDArray[np.bool_]) -> None:
        newly = keep & bad
        count = int(np.count_nonzero(newly))
        if count:
            dropped[reason] = dropped.get(reason, 0) + count
        keep[newly] = False

    drop(DROP_MISSING_FEATURE, ~_window_all(features_present, starts, spec.length))
    drop(DROP_NOT_FINITE, ~_window_all(features_finite, starts, spec.length))
    target_values = label_values[targets]
    drop(DROP_MISSING_LABEL, ~label_present[targets])
    if spec.label.mode is LabelMode.TAG and spec.label.uniform and len(starts):
        label_missing_anywhere = ~_window_all(label_present, starts, spec.length)
        drop(DROP_MISSING_LABEL, label_missing_anywhere)
        # Windows with a missing label point are gone already, so NaN never compares here.
        same_as_previous = np.ones(n_grid, dtype=bool)
        same_as_previous[1:] = label_values[1:] == label_values[:-1]
        # Window s..e is uniform when points s+1..e each equal the one before.
        changes = ~_window_all(same_as_previous, starts + 1, spec.length - 1)
        drop(DROP_LABEL_CHANGES, changes)
    with np.errstate(invalid="ignore"):
        not_integer = np.isfinite(target_values) & (target_values != np.round(target_values))
    drop(DROP_LABEL_NOT_INTEGER, not_integer)
    if spec.n_classes is not None:
        with np.errstate(invalid="ignore"):
            out_of_range = (target_values < 0) | (target_values >= spec.n_classes)
        drop(DROP_LABEL_OUT_OF_RANGE, out_of_range)

    split = n_grid - round(spec.test_fraction * n_grid) if spec.test_fraction else n_grid
    is_test = starts >= split
    # Training windows end, label target included, at least `length` steps before the split.
    is_train = targets <= split - spec.length
    if spec.test_fraction:
        drop(DROP_SPLIT_GAP, ~is_test & ~is_train)

    def dataset(selected: npt.NDArray[np.bool_]) -> LocalDataset:
        chosen = starts[keep & selected]
        if len(chosen) == 0 or n_grid < spec.length:
            x = np.empty((0, spec.length, len(spec.tags)), dtype=np.float32)
        else:
            # sliding_window_view gives (n, n_features, length); move time before features.
            view = np.lib.stride_tricks.sliding_window_view(features, spec.length, axis=0)
            x = np.ascontiguousarray(view[chosen].transpose(0, 2, 1), dtype=np.float32)
        y = np.round(label_values[chosen + spec.length - 1 + after]).astype(np.int64)
        return LocalDataset(x=x, y=y)

    train = dataset(~is_test)
    test = dataset(is_test)
    grid_start = float(grid[0]) if n_grid else float("nan")
    grid_end = float(grid[-1]) if n_grid else float("nan")
    test_start = float(grid[split]) if spec.test_fraction and split < n_grid else None
    if len(train) < spec.min_train_windows:
        raise WindowingError(
            f"only {len(train)} training windows (need {spec.min_train_windows}) from "
            f"{n_grid} grid points of {spec.period_s} s; dropped: {dropped or 'none'}. "
            "Collect more data, or shorten length / stride, or raise max_gap_s if "
            "missing_feature dominates"
        )
    if spec.test_fraction and len(test) == 0:
        raise WindowingError(
            f"no test windows in the last {spec.test_fraction:.0%} of {n_grid} grid points; "
            f"dropped: {dropped or 'none'}. Collect more data or raise test_fraction"
        )
    return WindowedData(
        train=train,
        test=test,
        grid_start=grid_start,
        grid_end=grid_end,
        test_start=test_start,
        dropped_windows=dropped,
    )


def latest_window(
    buffer: SeriesReader, spec: WindowSpec, *, now: float | None = None
) -> npt.NDArray[np.float32] | None:
    """The most recent complete window ending at or before ``now``, for live scoring.

    ``now``: seconds since the epoch, default the wall clock. Returns float32
    ``(spec.length, len(spec.tags))`` resampled exactly as :func:`build_windows` does (same
    epoch-aligned grid and forward-fill limit), or ``None`` when no window ending within the
    last ``spec.length`` grid steps has every feature present (a source is down or the
    buffer is too young). Labels are not read.
    """
    now = time.time() if now is None else now
    period = spec.period_s
    last_point = math.floor(now / period) * period
    lookback = 2 * spec.length - 1  # grid points: the newest window plus `length - 1` older ends
    first_point = last_point - (lookback - 1) * period
    series = _read(buffer, spec.tags, first_point - spec.feature_max_gap_s, now)
    if len(series) < len(spec.tags):
        return None
    grid = np.arange(lookback, dtype=np.float64) * period + first_point
    features = np.empty((lookback, len(spec.tags)), dtype=np.float32)
    present = np.ones(lookback, dtype=bool)
    for column, tag in enumerate(spec.tags):
        values, tag_present = resample(series[tag], grid, spec.feature_max_gap_s)
        features[:, column] = values
        present &= tag_present
    starts = np.arange(lookback - spec.length + 1, dtype=np.int64)
    complete = np.flatnonzero(_window_all(present, starts, spec.length))
    if len(complete) == 0:
        return None
    newest = int(complete[-1])
    return np.ascontiguousarray(features[newest : newest + spec.length], dtype=np.float32)
