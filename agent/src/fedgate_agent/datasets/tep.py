"""Tennessee Eastman process (TEP) fault classification, split across sites.

Source: the classic Braatz TEP runs shipped in ``bibmon/tennessee_eastman/`` — 52 process
variables sampled every 3 minutes, one run per class (0 = normal operation, k = fault k,
22 classes):

- ``dNN.dat``: 480 samples, faulty throughout (``d00.dat``: 500 normal samples, stored
  transposed as 52×500);
- ``dNN_te.dat``: 960 samples; the fault starts at sample 160, so samples 0..159 are normal
  (``d00_te.dat`` is normal throughout).

A sample's label is its run's fault id, or 0 before the fault starts. Windows of
``window`` consecutive samples with one shared label become examples (see
:func:`make_windows`); a window straddling the onset of a fault is dropped.

The split made by :func:`federated_split` (every piece is a :class:`Segment`, so tests can
check it by construction):

- **Held-out test set**: samples ``TEST_START..959`` (480..959) of every ``dNN_te.dat`` run:
  for k ≥ 1 the steady fault 16..40 hours after onset, for class 0 the second half of
  ``d00_te``. Every class contributes one stretch of the same length, so the test set is
  balanced (class 0 is not over-represented) and nothing needs subsampling.
- **Training material**, all of it before ``TRAIN_STOP`` (440) in the ``_te`` runs, so
  it ends two hours (40 samples) before the first test sample of the same run:
  per fault k, ``dNN.dat[0:480]`` and ``dNN_te.dat[0:440]`` (the latter holds 160 normal
  samples, then the early fault); for class 0, ``d00.dat[0:500]`` and ``d00_te.dat[0:440]``.
- **Non-IID over sites** (:func:`fault_assignment`): the 21 faults are taken in a seeded
  random order, and each goes to the ``sites_per_fault`` sites holding the fewest faults so
  far (seeded random tie-break). Each of those sites receives a different contiguous time
  part of that fault's two runs (equal parts, in holder order). The normal runs
  ``d00.dat``/``d00_te.dat[0:440]`` are cut in time into ``n_sites`` parts, one per site.
  So every site has class 0 and ``21 * sites_per_fault / n_sites`` faults give or take one,
  every fault is on some site, and no site sees every class (``sites_per_fault < n_sites``).

Standardisation constants (:func:`feature_statistics`) come from ``d00.dat`` alone: a
public reference operating point, not any site's private data.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from fedgate_common.model_spec import ModelSpec

from fedgate_agent.local_dataset import LocalDataset, make_windows, save_local_dataset

__all__ = [
    "FAULT_ONSET",
    "N_CLASSES",
    "N_FEATURES",
    "TEST_START",
    "TRAIN_STOP",
    "FederatedSplit",
    "Segment",
    "TepRuns",
    "centralized_dataset",
    "fault_assignment",
    "feature_statistics",
    "federated_split",
    "held_out_test_set",
    "load_tep_runs",
    "make_windows",
    "tep_model_spec",
    "write_site_files",
]

N_FEATURES = 52
N_CLASSES = 22
FAULT_ONSET = 160  # first faulty sample of a dNN_te.dat run
TRAIN_STOP = 440  # dNN_te.dat samples [0, TRAIN_STOP) may be used for training
TEST_START = 480  # dNN_te.dat samples [TEST_START, 960) are the held-out test set
_TRAIN_RUN_LENGTH = 480
_NORMAL_TRAIN_RUN_LENGTH = 500
_TEST_RUN_LENGTH = 960

Samples = npt.NDArray[np.float64]
Labels = npt.NDArray[np.int64]


@dataclass(frozen=True)
class TepRuns:
    """All 44 runs as ``(T, 52)`` float64 arrays (read-only), indexed by class id.

    ``train[k]`` is ``dNN.dat`` (k = NN), ``test[k]`` is ``dNN_te.dat``; "train"/"test" are
    the roles the original files were published with, not the roles in a split.
    """

    train: tuple[Samples, ...]
    test: tuple[Samples, ...]

    def samples(self, segment: Segment) -> Samples:
        run = self.test[segment.fault] if segment.te else self.train[segment.fault]
        if not 0 <= segment.start <= segment.stop <= len(run):
            raise ValueError(f"{segment} lies outside its run of {len(run)} samples")
        return run[segment.start : segment.stop]

    def labels(self, segment: Segment) -> Labels:
        """Per-sample labels: the fault id, or 0 before the onset in a ``_te`` run."""
        index = np.arange(segment.start, segment.stop)
        faulty = index >= FAULT_ONSET if segment.te else np.ones(len(index), dtype=bool)
        return np.where(faulty, segment.fault, 0).astype(np.int64)


@dataclass(frozen=True, order=True)
class Segment:
    """Samples ``start:stop`` of run ``dNN.dat`` (``te=False``) or ``dNN_te.dat`` (``te=True``)."""

    fault: int
    te: bool
    start: int
    stop: int

    @property
    def file_name(self) -> str:
        return f"d{self.fault:02d}{'_te' if self.te else ''}.dat"

    def __str__(self) -> str:
        return f"{self.file_name}[{self.start}:{self.stop}]"


@dataclass(frozen=True)
class FederatedSplit:
    """Per-site training sets, the held-out test set, and the model spec they fit.

    ``site_segments[i]`` / ``test_segments`` record exactly which samples went where;
    ``site_faults[i]`` are the fault ids (≥ 1) site i sees.
    """

    sites: list[LocalDataset]
    test: LocalDataset
    spec: ModelSpec
    site_segments: tuple[tuple[Segment, ...], ...]
    test_segments: tuple[Segment, ...]
    site_faults: tuple[frozenset[int], ...]


def _data_directory() -> Traversable:
    # Locate bibmon's files without importing bibmon (its __init__ takes seconds to import).
    spec = importlib.util.find_spec("bibmon")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "tennessee_eastman"
            if candidate.is_dir():
                return candidate
    return importlib.resources.files("bibmon") / "tennessee_eastman"


def _read_run(directory: Traversable, name: str, shape: tuple[int, int]) -> Samples:
    with (directory / name).open("rb") as stream:
        values = np.loadtxt(stream, dtype=np.float64)
    if values.shape == shape[::-1] and name == "d00.dat":
        values = values.T  # published transposed
    if values.shape != shape or not np.isfinite(values).all():
        raise ValueError(f"{name}: expected {shape} finite values, found {values.shape}")
    values = np.ascontiguousarray(values)
    values.flags.writeable = False
    return values


@functools.cache
def load_tep_runs() -> TepRuns:
    """Read the 22 training and 22 test runs from bibmon's package data (cached, read-only)."""
    directory = _data_directory()
    train = tuple(
        _read_run(
            directory,
            f"d{k:02d}.dat",
            (_NORMAL_TRAIN_RUN_LENGTH if k == 0 else _TRAIN_RUN_LENGTH, N_FEATURES),
        )
        for k in range(N_CLASSES)
    )
    test = tuple(
        _read_run(directory, f"d{k:02d}_te.dat", (_TEST_RUN_LENGTH, N_FEATURES))
        for k in range(N_CLASSES)
    )
    return TepRuns(train=train, test=test)


def feature_statistics(runs: TepRuns) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-variable mean and standard deviation of the normal training run ``d00.dat``."""
    normal = runs.train[0]
    mean = normal.mean(axis=0)
    scale = normal.std(axis=0, ddof=1)
    return tuple(float(v) for v in mean), tuple(float(v) for v in scale)


def tep_model_spec(window: int = 20, *, channels: int = 64, kernel_size: int = 3) -> ModelSpec:
    """The ``cnn1d-v1`` spec for TEP windows, standardised with :func:`feature_statistics`."""
    mean, scale = feature_statistics(load_tep_runs())
    return ModelSpec(
        n_features=N_FEATURES,
        window=window,
        n_classes=N_CLASSES,
        channels=channels,
        kernel_size=kernel_size,
        feature_mean=mean,
        feature_scale=scale,
    )


def _concatenate(parts: Sequence[LocalDataset], window: int) -> LocalDataset:
    if not parts:
        return LocalDataset(
            x=np.empty((0, window, N_FEATURES), dtype=np.float32), y=np.empty(0, dtype=np.int64)
        )
    return LocalDataset(
        x=np.concatenate([p.x for p in parts]), y=np.concatenate([p.y for p in parts])
    )


def _windows_of(
    runs: TepRuns, segments: Sequence[Segment], window: int, stride: int
) -> LocalDataset:
    parts = [make_windows(runs.samples(s), runs.labels(s), window, stride) for s in segments]
    return _concatenate(parts, window)


def _test_segments() -> tuple[Segment, ...]:
    return tuple(Segment(k, True, TEST_START, _TEST_RUN_LENGTH) for k in range(N_CLASSES))


def held_out_test_set(window: int = 20, stride: int = 2) -> LocalDataset:
    """The held-out windows of every class: the test set of every :func:`federated_split`
    with the same ``window`` and ``stride``."""
    return _windows_of(load_tep_runs(), _test_segments(), window, stride)


def _time_parts(fault: int, te: bool, stop: int, n_parts: int) -> list[Segment]:
    bounds = [stop * j // n_parts for j in range(n_parts + 1)]
    return [Segment(fault, te, bounds[j], bounds[j + 1]) for j in range(n_parts)]


def fault_assignment(n_sites: int, sites_per_fault: int, seed: int) -> dict[int, tuple[int, ...]]:
    """Fault id → the sites that see it, in the order they receive its time parts."""
    if n_sites < 2:
        raise ValueError("a non-IID split needs at least 2 sites")
    if not 1 <= sites_per_fault < n_sites:
        raise ValueError(
            f"sites_per_fault must be in 1..{n_sites - 1} so that no site sees every fault"
        )
    rng = np.random.default_rng(seed)
    faults_held = np.zeros(n_sites, dtype=np.int64)
    assignment: dict[int, tuple[int, ...]] = {}
    for fault in rng.permutation(np.arange(1, N_CLASSES)):
        tie_break = rng.random(n_sites)
        holders = np.lexsort((tie_break, faults_held))[:sites_per_fault]
        faults_held[holders] += 1
        assignment[int(fault)] = tuple(int(site) for site in holders)
    return dict(sorted(assignment.items()))


def federated_split(
    n_sites: int,
    *,
    window: int = 20,
    stride: int = 2,
    seed: int = 0,
    sites_per_fault: int = 3,
    channels: int = 64,
) -> FederatedSplit:
    """Non-IID per-site training sets and a held-out test set (see the module docstring).

    Deterministic for given arguments. The test set uses the same ``stride``.
    """
    runs = load_tep_runs()
    assignment = fault_assignment(n_sites, sites_per_fault, seed)
    segments: list[list[Segment]] = [[] for _ in range(n_sites)]
    for site, part in enumerate(_time_parts(0, False, _NORMAL_TRAIN_RUN_LENGTH, n_sites)):
        segments[site].append(part)
    for site, part in enumerate(_time_parts(0, True, TRAIN_STOP, n_sites)):
        segments[site].append(part)
    for fault in sorted(assignment):
        holders = assignment[fault]
        train_parts = _time_parts(fault, False, _TRAIN_RUN_LENGTH, len(holders))
        te_parts = _time_parts(fault, True, TRAIN_STOP, len(holders))
        for site, train_part, te_part in zip(holders, train_parts, te_parts, strict=True):
            segments[site].extend((train_part, te_part))
    test_segments = _test_segments()
    site_faults = tuple(
        frozenset(f for f, holders in assignment.items() if site in holders)
        for site in range(n_sites)
    )
    return FederatedSplit(
        sites=[_windows_of(runs, s, window, stride) for s in segments],
        test=held_out_test_set(window, stride),
        spec=tep_model_spec(window, channels=channels),
        site_segments=tuple(tuple(s) for s in segments),
        test_segments=test_segments,
        site_faults=site_faults,
    )


def centralized_dataset(split: FederatedSplit) -> LocalDataset:
    """All sites' training windows in one data set (the centralized baseline)."""
    return _concatenate(split.sites, split.spec.window)


def write_site_files(split: FederatedSplit, directories: Sequence[Path]) -> list[Path]:
    """Write site i's windows to ``directories[i]/data/train.npz``; returns the paths."""
    if len(directories) != len(split.sites):
        raise ValueError(f"{len(split.sites)} sites but {len(directories)} directories")
    paths: list[Path] = []
    for directory, dataset in zip(directories, split.sites, strict=True):
        path = Path(directory) / "data" / "train.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_local_dataset(path, dataset)
        paths.append(path)
    return paths
