"""Public pre-training for the privacy benchmark: simulated runs, their windows, the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedgate_agent.datasets.tep import N_FEATURES, tep_model_spec
from fedgate_common.genesis_weights import make_genesis_weights, write_genesis_weights
from fedgate_common.model_spec import initial_weights

from bench.privacy import public_pretraining
from bench.privacy.public_pretraining import load_pretrained, pretrain, public_windows, simulate
from tests.common.test_genesis_weights import PRETRAINING


def test_a_simulated_run_is_labelled_from_the_fault_onset() -> None:
    (normal, normal_labels), (faulty, labels) = simulate(7, faults=(0, 4), hours=2.0)
    assert normal.shape == (40, N_FEATURES)
    assert faulty.shape == (40, N_FEATURES)
    assert np.isfinite(faulty).all()
    assert (normal_labels == 0).all()
    # sample i is taken at (i + 1) · 3 min: 0..18 before the onset at 1 h, 19.. after it
    assert (labels[:19] == 0).all()
    assert (labels[19:] == 4).all()
    windows = public_windows([(normal, normal_labels), (faulty, labels)], window=20, stride=2)
    # a window is kept only when one label covers it: 11 normal ones from the normal run;
    # from the faulty run only the one starting at sample 20
    assert windows.x.shape == (12, 20, N_FEATURES)
    assert np.bincount(windows.y).tolist() == [11, 0, 0, 0, 1]


def test_runs_are_cached_and_reloaded_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def short(seed: int) -> public_pretraining.Runs:
        calls.append(seed)
        return simulate(seed, faults=(0, 1), hours=1.5)

    monkeypatch.setattr(public_pretraining, "simulate", short)
    monkeypatch.setattr(public_pretraining, "PUBLIC_FAULTS", (0, 1))
    first = public_pretraining.load_or_simulate([3], tmp_path, lambda _: None)
    again = public_pretraining.load_or_simulate([3], tmp_path, lambda _: None)
    assert calls == [3]  # the second call read the cache
    assert (tmp_path / "sim-runs-3.npz").exists()
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_pretraining_changes_the_weights_and_keeps_their_shapes() -> None:
    spec = tep_model_spec(channels=8)
    genesis = initial_weights(spec, np.random.default_rng(0))
    runs = simulate(5, faults=(0, 2), hours=3.0)
    trained = pretrain(spec, genesis, public_windows(runs, 20, 2), seed=1)
    assert list(trained) == list(genesis)
    for name, before in genesis.items():
        assert trained[name].shape == before.shape
        assert np.isfinite(trained[name]).all()
    assert any(not np.array_equal(trained[n], genesis[n]) for n in genesis)


def test_a_genesis_weights_file_loads_for_its_spec_and_is_refused_for_another(
    tmp_path: Path,
) -> None:
    spec = tep_model_spec(channels=8)
    weights = initial_weights(spec, np.random.default_rng(4))
    path = tmp_path / "genesis.msgpack"
    write_genesis_weights(path, make_genesis_weights(spec, weights, PRETRAINING))
    loaded = load_pretrained(path, spec)
    assert list(loaded) == list(weights)
    for name, array in weights.items():
        np.testing.assert_array_equal(loaded[name], array)
    with pytest.raises(SystemExit, match="another model spec"):
        load_pretrained(path, tep_model_spec(channels=16))
