from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fedgate_agent.errors import AgentError, LocalDataError, PlanRejected
from fedgate_agent.model import build_model, weights_of
from fedgate_agent.training import (
    LocalDataset,
    evaluate,
    load_local_dataset,
    save_local_dataset,
    train_locally,
)
from fedgate_common.errors import FedgateError
from fedgate_common.messages import TrainingPlan
from fedgate_common.model_spec import ModelSpec, initial_weights

from tests.npz_support import npy_header_only, with_member

torch.set_num_threads(1)

SPEC = ModelSpec(n_features=3, window=8, n_classes=3, channels=8)


def synthetic(n: int, seed: int) -> LocalDataset:
    """Class c = a sine of frequency c+1 on feature c mod 3, plus noise: easy but not linear."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, SPEC.n_classes, size=n)
    t = np.arange(SPEC.window)
    x = rng.normal(scale=0.3, size=(n, SPEC.window, SPEC.n_features))
    phase = rng.uniform(0, 2 * np.pi, size=n)
    for i, label in enumerate(y):
        x[i, :, label] += 2.0 * np.sin((label + 1) * t * 0.7 + phase[i])
    return LocalDataset(x=x.astype(np.float32), y=y.astype(np.int64))


def fresh_model(seed: int = 0) -> torch.nn.Module:
    return build_model(SPEC, weights=initial_weights(SPEC, np.random.default_rng(seed)))


PLAN = TrainingPlan(learning_rate=0.05, momentum=0.9, local_epochs=15, batch_size=16)


def test_training_reduces_loss_and_beats_chance() -> None:
    train, test = synthetic(300, seed=1), synthetic(300, seed=2)
    model = fresh_model()
    before = evaluate(model, test)
    result = train_locally(model, train, PLAN, seed=0)
    after = evaluate(model, test)
    assert result.num_samples == 300
    assert np.isfinite(result.mean_loss)
    assert after.loss < 0.5 * before.loss
    assert after.accuracy > 0.8  # chance is 1/3
    assert after.n == 300


def test_same_seed_gives_identical_weights_and_other_seed_does_not() -> None:
    data = synthetic(100, seed=3)
    plan = TrainingPlan(learning_rate=0.05, local_epochs=2, batch_size=16)
    runs = []
    for seed in (7, 7, 8):
        model = fresh_model()
        train_locally(model, data, plan, seed=seed)
        runs.append(weights_of(model))
    for name in runs[0]:
        np.testing.assert_array_equal(runs[0][name], runs[1][name])
    assert any(not np.array_equal(runs[0][n], runs[2][n]) for n in runs[0])


def test_training_leaves_global_torch_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_locally(fresh_model(), synthetic(40, seed=4), PLAN, seed=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    "plan",
    [
        TrainingPlan(learning_rate=0.0),
        TrainingPlan(learning_rate=float("nan")),
        TrainingPlan(learning_rate=0.1, momentum=1.0),
        TrainingPlan(learning_rate=0.1, local_epochs=0),
        TrainingPlan(learning_rate=0.1, batch_size=0),
    ],
)
def test_unsafe_plans_are_rejected(plan: TrainingPlan) -> None:
    with pytest.raises(PlanRejected):
        train_locally(fresh_model(), synthetic(10, seed=0), plan)


def test_training_refuses_windows_of_the_wrong_shape() -> None:
    data = LocalDataset(x=np.zeros((4, 9, 3), dtype=np.float32), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(LocalDataError, match="window"):
        train_locally(fresh_model(), data, PLAN)


def test_dataset_round_trips_through_npz(tmp_path: Path) -> None:
    data = synthetic(20, seed=5)
    path = tmp_path / "train.npz"
    save_local_dataset(path, data)
    assert [p.name for p in tmp_path.iterdir()] == ["train.npz"]  # no temp file left
    loaded = load_local_dataset(path, SPEC)
    np.testing.assert_array_equal(loaded.x, data.x)
    np.testing.assert_array_equal(loaded.y, data.y)
    assert loaded.x.dtype == np.float32
    assert loaded.y.dtype == np.int64


def write_npz(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def good_arrays() -> tuple[np.ndarray, np.ndarray]:
    data = synthetic(10, seed=6)
    return data.x, data.y


def test_rejects_nan(tmp_path: Path) -> None:
    x, y = good_arrays()
    x[3, 2, 1] = np.nan
    with pytest.raises(LocalDataError, match="NaN") as caught:
        load_local_dataset(write_npz(tmp_path / "d.npz", x=x, y=y), SPEC)
    assert caught.value.path == tmp_path / "d.npz"


@pytest.mark.parametrize(
    ("x_shape", "y_len", "message"),
    [
        ((10, 8, 4), 10, "n_features"),
        ((10, 7, 3), 10, "window"),
        ((10, 24), 10, "dimensions|n_features"),
        ((10, 8, 3), 9, "labels"),
    ],
)
def test_rejects_bad_shapes(
    tmp_path: Path, x_shape: tuple[int, ...], y_len: int, message: str
) -> None:
    x = np.zeros(x_shape, dtype=np.float32)
    y = np.zeros(y_len, dtype=np.int64)
    with pytest.raises(LocalDataError, match=message):
        load_local_dataset(write_npz(tmp_path / "d.npz", x=x, y=y), SPEC)


@pytest.mark.parametrize("bad_label", [-1, 3, 1000])
def test_rejects_labels_out_of_range(tmp_path: Path, bad_label: int) -> None:
    x, y = good_arrays()
    y[4] = bad_label
    with pytest.raises(LocalDataError, match="labels"):
        load_local_dataset(write_npz(tmp_path / "d.npz", x=x, y=y), SPEC)


def test_rejects_pickled_object_arrays(tmp_path: Path) -> None:
    x, _ = good_arrays()
    y = np.array([{"label": 1}] * 10, dtype=object)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    with pytest.raises(LocalDataError, match="pickle"):
        load_local_dataset(path, SPEC)


def test_rejects_a_plain_pickle_and_garbage(tmp_path: Path) -> None:
    pickled = tmp_path / "p.npz"
    pickled.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(LocalDataError):
        load_local_dataset(pickled, SPEC)
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(LocalDataError):
        load_local_dataset(garbage, SPEC)
    with pytest.raises(LocalDataError, match="not a readable"):
        load_local_dataset(tmp_path / "missing.npz", SPEC)


def test_rejects_wrong_dtypes_and_missing_arrays(tmp_path: Path) -> None:
    x, y = good_arrays()
    with pytest.raises(LocalDataError, match="int64"):
        load_local_dataset(write_npz(tmp_path / "a.npz", x=x, y=y.astype(np.float32)), SPEC)
    with pytest.raises(LocalDataError, match="float32"):
        load_local_dataset(write_npz(tmp_path / "b.npz", x=x.astype(np.int32), y=y), SPEC)
    with pytest.raises(LocalDataError, match=r"\['y'\]"):
        load_local_dataset(write_npz(tmp_path / "c.npz", x=x, labels=y), SPEC)
    single = tmp_path / "s.npy"
    np.save(single, x)
    with pytest.raises(LocalDataError, match="savez"):
        load_local_dataset(single, SPEC)


def test_rejects_empty_dataset(tmp_path: Path) -> None:
    x = np.zeros((0, 8, 3), dtype=np.float32)
    y = np.zeros(0, dtype=np.int64)
    with pytest.raises(LocalDataError, match="no windows"):
        load_local_dataset(write_npz(tmp_path / "e.npz", x=x, y=y), SPEC)


def test_float64_and_int32_inputs_are_converted(tmp_path: Path) -> None:
    x, y = good_arrays()
    loaded = load_local_dataset(
        write_npz(tmp_path / "d.npz", x=x.astype(np.float64), y=y.astype(np.int32)), SPEC
    )
    assert loaded.x.dtype == np.float32
    assert loaded.y.dtype == np.int64


def test_dataset_checks_its_own_arrays() -> None:
    with pytest.raises(LocalDataError):
        LocalDataset(x=np.zeros((2, 8, 3), dtype=np.float64), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(LocalDataError, match="labels"):
        LocalDataset(x=np.zeros((2, 8, 3), dtype=np.float32), y=np.zeros(3, dtype=np.int64))


def test_errors_share_the_fedgate_root() -> None:
    assert issubclass(LocalDataError, AgentError)
    assert issubclass(AgentError, FedgateError)


def _packages_loaded(modules: str, packages: set[str]) -> list[str]:
    """Which of ``packages`` a fresh interpreter has loaded after importing ``modules``."""
    probe = (
        f"import sys, {modules}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(packages)!r})))"
    )
    shown = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return list(ast.literal_eval(shown.stdout.strip()))


def test_the_command_line_and_plain_training_do_not_load_opacus() -> None:
    """Only DP-SGD (private_training) imports Opacus: every `fedgate-agent` command starts
    without it, and so does an agent (its service) that trains without record-level DP."""
    modules = "fedgate_agent.cli, fedgate_agent.training, fedgate_agent.service"
    assert _packages_loaded(modules, {"opacus"}) == []


def test_the_command_line_starts_without_torch() -> None:
    """`fedgate-agent` (every command's module, the data path's windowing included) loads
    neither torch, dp-accounting nor onnxruntime until a command trains, scores or counts
    ε: `--help` takes about half a second instead of three, and onnxruntime's warnings
    (a non-root user sees one about telemetry) appear only where a model is scored."""
    modules = "fedgate_agent.cli, fedgate_agent.local_dataset, fedgate_agent.data_path"
    assert _packages_loaded(modules, {"torch", "dp_accounting", "onnxruntime"}) == []


def test_a_header_declaring_a_huge_array_is_refused(tmp_path: Path) -> None:
    """`run` reads the training file with the same checks as `predict`: a member whose header
    declares petabytes is refused as data, not a MemoryError from the service."""
    x, y = good_arrays()
    valid = write_npz(tmp_path / "valid.npz", x=x, y=y)
    huge = tmp_path / "huge.npz"
    huge.write_bytes(with_member(valid.read_bytes(), "x.npy", npy_header_only((10**15, 8, 3))))
    with pytest.raises(LocalDataError, match="larger than this machine can load"):
        load_local_dataset(huge, SPEC)


def test_a_header_numpy_cannot_parse_is_refused(tmp_path: Path) -> None:
    """An unterminated header makes numpy's parser raise tokenize's TokenError: refused as
    data, not a traceback out of `run` or `predict`."""
    x, y = good_arrays()
    valid = write_npz(tmp_path / "valid.npz", x=x, y=y)
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,\n"
    header += " " * (-(10 + len(header)) % 64)
    broken = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1")
    path = tmp_path / "unterminated.npz"
    path.write_bytes(with_member(valid.read_bytes(), "x.npy", broken))
    with pytest.raises(LocalDataError, match=r"not a readable \.npz archive"):
        load_local_dataset(path, SPEC)
