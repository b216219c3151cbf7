from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fedgate_agent.datasets.tep import (
    FAULT_ONSET,
    N_CLASSES,
    N_FEATURES,
    FederatedSplit,
    Segment,
    centralized_dataset,
    fault_assignment,
    feature_statistics,
    federated_split,
    load_tep_runs,
    make_windows,
    tep_model_spec,
    write_site_files,
)
from fedgate_agent.training import check_dataset, load_local_dataset

# find_spec, not importorskip: importing bibmon itself takes seconds and is not needed.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("bibmon") is None, reason="needs the datasets extra (bibmon)"
)


@pytest.fixture(scope="module")
def split() -> FederatedSplit:
    return federated_split(6, window=20, stride=5, seed=0)


def test_runs_have_the_published_shapes() -> None:
    runs = load_tep_runs()
    assert len(runs.train) == len(runs.test) == N_CLASSES == 22
    assert runs.train[0].shape == (500, N_FEATURES)  # d00.dat is stored transposed
    assert all(run.shape == (480, 52) for run in runs.train[1:])
    assert all(run.shape == (960, 52) for run in runs.test)
    assert not runs.train[3].flags.writeable


def test_statistics_come_from_the_normal_run() -> None:
    runs = load_tep_runs()
    mean, scale = feature_statistics(runs)
    assert len(mean) == len(scale) == 52
    np.testing.assert_allclose(mean, runs.train[0].mean(axis=0))
    assert min(scale) > 0
    # Normal test data standardises to roughly unit scale; a strong fault does not.
    z_normal = (runs.test[0] - np.array(mean)) / np.array(scale)
    assert float(np.median(np.abs(z_normal))) < 1.5
    spec = tep_model_spec(window=10)
    assert (spec.n_features, spec.n_classes, spec.window) == (52, 22, 10)
    assert spec.feature_mean == mean
    assert spec.feature_scale == scale


def test_make_windows_keeps_only_single_label_windows() -> None:
    samples = np.arange(24, dtype=np.float64).reshape(12, 2)
    labels = np.array([0] * 5 + [4] * 7)
    data = make_windows(samples, labels, window=3, stride=2)
    # starts 0,2,4,6,8: the window at 4 holds labels 0,4,4 and is dropped
    assert data.y.tolist() == [0, 0, 4, 4]
    assert data.x.shape == (4, 3, 2)
    assert data.x.dtype == np.float32
    np.testing.assert_array_equal(data.x[1], samples[2:5])
    np.testing.assert_array_equal(data.x[3], samples[8:11])
    empty = make_windows(samples[:2], labels[:2], window=3, stride=1)
    assert empty.x.shape == (0, 3, 2)


def test_labels_switch_at_the_fault_onset() -> None:
    runs = load_tep_runs()
    labels = runs.labels(Segment(7, True, 150, 170))
    assert labels.tolist() == [0] * (FAULT_ONSET - 150) + [7] * (170 - FAULT_ONSET)
    assert set(runs.labels(Segment(7, False, 0, 480)).tolist()) == {7}
    assert set(runs.labels(Segment(0, True, 0, 960)).tolist()) == {0}


def test_split_shapes_and_classes(split: FederatedSplit) -> None:
    assert split.spec.n_features == 52
    assert split.spec.n_classes == 22
    for site in [*split.sites, split.test]:
        check_dataset(site, split.spec)
    assert set(split.test.y.tolist()) == set(range(22))
    union = set().union(*(set(site.y.tolist()) for site in split.sites))
    assert union == set(range(22))


def test_split_is_non_iid(split: FederatedSplit) -> None:
    for site, faults in zip(split.sites, split.site_faults, strict=True):
        seen = set(site.y.tolist())
        assert 0 in seen
        assert seen == {0, *faults}
        assert len(seen) < N_CLASSES
    for label in range(1, N_CLASSES):
        holders = [i for i, site in enumerate(split.sites) if label in site.y]
        assert 1 <= len(holders) < len(split.sites)
    assert len({frozenset(f) for f in split.site_faults}) == len(split.sites)


def intervals(segments: tuple[Segment, ...]) -> set[tuple[int, bool, int]]:
    return {(s.fault, s.te, i) for s in segments for i in range(s.start, s.stop)}


def test_test_set_is_disjoint_in_time_from_training(split: FederatedSplit) -> None:
    test_samples = intervals(split.test_segments)
    used = [intervals(segments) for segments in split.site_segments]
    for site_samples in used:
        assert not site_samples & test_samples
    # Sites get different parts of a shared run, never the same sample twice.
    assert sum(len(u) for u in used) == len(set().union(*used))
    assert all(s.te and s.start >= 480 for s in split.test_segments)


def test_test_set_is_balanced(split: FederatedSplit) -> None:
    counts = Counter(split.test.y.tolist())
    typical_fault = float(np.median([counts[k] for k in range(1, N_CLASSES)]))
    assert counts[0] <= 2 * typical_fault


def test_split_is_deterministic_per_seed(split: FederatedSplit) -> None:
    again = federated_split(6, window=20, stride=5, seed=0)
    assert again.site_segments == split.site_segments
    for a, b in zip(again.sites, split.sites, strict=True):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
    other = federated_split(6, window=20, stride=5, seed=1)
    assert other.site_faults != split.site_faults


def test_fault_assignment_rules() -> None:
    for n_sites, per_fault in [(6, 2), (6, 3), (3, 2), (2, 1), (10, 4)]:
        assignment = fault_assignment(n_sites, per_fault, seed=4)
        assert sorted(assignment) == list(range(1, 22))
        assert all(len(set(h)) == per_fault for h in assignment.values())
        per_site = Counter(site for holders in assignment.values() for site in holders)
        assert set(per_site) == set(range(n_sites))
        assert max(per_site.values()) - min(per_site.values()) <= 1
    with pytest.raises(ValueError, match="sites_per_fault"):
        fault_assignment(6, 6, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        fault_assignment(1, 1, seed=0)


def test_centralized_is_the_union_of_sites(split: FederatedSplit) -> None:
    everything = centralized_dataset(split)
    assert len(everything) == sum(len(s) for s in split.sites)
    assert Counter(everything.y.tolist()) == sum(
        (Counter(s.y.tolist()) for s in split.sites), Counter()
    )


def test_write_site_files(tmp_path: Path, split: FederatedSplit) -> None:
    directories = [tmp_path / f"site{i}" for i in range(len(split.sites))]
    paths = write_site_files(split, directories)
    assert paths == [d / "data" / "train.npz" for d in directories]
    loaded = load_local_dataset(paths[2], split.spec)
    np.testing.assert_array_equal(loaded.x, split.sites[2].x)
    np.testing.assert_array_equal(loaded.y, split.sites[2].y)
    with pytest.raises(ValueError, match="directories"):
        write_site_files(split, directories[:2])
