"""`fedgate-agent pretrain RUNS_FILE... --out FILE`: a genesis model pre-trained on
simulated plant runs (here synthetic ones: three classes whose means differ)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fedgate_agent import pretrain_cli, pretraining, training
from fedgate_agent.cli import main as agent_main
from fedgate_agent.cli_support import ExitCode
from fedgate_agent.config import WindowsConfig
from fedgate_agent.model import build_model
from fedgate_agent.pretraining import (
    PretrainingRefused,
    check_public_runs,
    public_windows,
    read_public_runs,
)
from fedgate_agent.training import evaluate
from fedgate_common.genesis_weights import genesis_weights_digest, read_genesis_weights
from fedgate_common.model_spec import ModelSpec, initial_weights
from fedgate_common.plant_runs import PlantRun, RunsMeta, save_plant_runs

from tests.npz_support import HUGE_SHAPE, npy_header_only, with_member

N_FEATURES = 52
SPEC = ModelSpec(n_features=N_FEATURES, window=8, n_classes=3, channels=8)
RUN_SAMPLES = 120
ONSET = 20  # faulty runs are normal for their first ONSET samples


def synthetic_runs(
    seed: int, *, sets: int = 2, features: int = N_FEATURES, shift: float = 3.0
) -> list[PlantRun]:
    """Per set one run per class 0..2: unit noise, plus ``shift`` on features 0..9 under
    fault 1 and on features 10..19 under fault 2."""
    rng = np.random.default_rng(seed)
    runs = []
    for run_set in range(sets):
        for fault in range(3):
            y = np.full(RUN_SAMPLES, fault, dtype=np.int64)
            y[:ONSET] = 0
            x = rng.normal(size=(RUN_SAMPLES, features))
            for k in (1, 2):
                x[y == k, (k - 1) * 10 : k * 10] += shift
            runs.append(PlantRun(fault=fault, set=run_set, x=x, y=y))
    return runs


def write_runs(path: Path, runs: list[PlantRun], seed: int = 0) -> Path:
    meta = RunsMeta(
        simulator="synthetic",
        seed=seed,
        sets=max(run.set for run in runs) + 1,
        hours=RUN_SAMPLES * 3 / 60,
        fault_start_h=ONSET * 3 / 60,
        sample_minutes=3.0,
        control_seconds=0.0,
        created_at="2026-01-01T00:00:00Z",
    )
    save_plant_runs(path, runs, meta)
    return path


@pytest.fixture
def runs_files(tmp_path: Path) -> list[Path]:
    return [
        write_runs(tmp_path / f"runs-{seed}.npz", synthetic_runs(seed), seed) for seed in (1, 2)
    ]


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "spec.json"
    path.write_bytes(msgspec.json.encode(SPEC))
    return path


def pretrain(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(agent_main, ["pretrain", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_the_genesis_file_holds_weights_trained_on_the_runs(
    runs_files: list[Path], spec_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "genesis.msgpack"
    code, stdout, stderr = pretrain(
        *runs_files,
        "--model-spec",
        spec_file,
        "--seed",
        "11",
        "--stride",
        "2",
        "--out",
        out,
        "--json",
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    genesis = read_genesis_weights(out)
    assert genesis.spec == SPEC
    assert result["digest"] == genesis_weights_digest(genesis)
    assert result["seed"] == 11
    provenance = genesis.pretraining
    assert provenance.start_seed == 11
    assert provenance.runs_sha256 == tuple(
        hashlib.sha256(path.read_bytes()).hexdigest() for path in runs_files
    )
    windows = public_windows(read_public_runs(runs_files).all_runs(), window=8, stride=2)
    assert (provenance.runs, provenance.windows, provenance.stride) == (12, len(windows), 2)
    assert (provenance.epochs, provenance.learning_rate, provenance.momentum) == (2, 0.01, 0.9)
    assert provenance.batch_size == 32
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", provenance.created_at)
    assert len(result["epoch_losses"]) == 2
    assert result["warnings"] == []
    assert stderr.count("epoch ") == 2  # progress per epoch, even with --json

    trained = genesis.named_weights()
    start = initial_weights(SPEC, np.random.default_rng(11))
    assert all(np.isfinite(array).all() for array in trained.values())
    assert any(not np.array_equal(trained[name], start[name]) for name in start)
    before = evaluate(build_model(SPEC, weights=start), windows).accuracy
    after = evaluate(build_model(SPEC, weights=trained), windows).accuracy
    assert after > 0.9 > before + 0.2  # chance: 1/3


def test_the_same_seed_gives_the_same_file_digest(
    runs_files: list[Path], spec_file: Path, tmp_path: Path
) -> None:
    """Human output: progress on stderr, the summary and the next step on stdout. Training
    runs on one thread and leaves torch's thread count as it was."""
    threads = torch.get_num_threads()
    digests = []
    for name in ("a.msgpack", "b.msgpack"):
        code, stdout, stderr = pretrain(
            *runs_files,
            "--model-spec",
            spec_file,
            "--seed",
            "5",
            "--epochs",
            "1",
            "--out",
            tmp_path / name,
        )
        assert code == 0, stderr
        assert "epoch 1/1: loss" in stderr
        assert "fedgate-coordinator federation init --genesis-weights" in stdout
        assert re.search(r"^seed +5$", stdout, re.MULTILINE)
        digest = re.search(r"^digest +(\S+)$", stdout, re.MULTILINE)
        assert digest is not None
        digests.append(digest.group(1))
    assert digests[0] == digests[1]
    assert torch.get_num_threads() == threads
    written = read_genesis_weights(tmp_path / "a.msgpack")
    assert digests[0] == genesis_weights_digest(written)
    assert written.pretraining.stride == WindowsConfig().stride  # the default


def test_without_a_seed_a_fresh_one_is_printed_and_recorded(
    runs_files: list[Path], spec_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "genesis.msgpack"
    code, stdout, stderr = pretrain(
        runs_files[0], "--model-spec", spec_file, "--epochs", "1", "--out", out, "--json"
    )
    assert code == 0, stderr
    seed = json.loads(stdout)["seed"]
    assert 0 <= seed < 2**63
    assert read_genesis_weights(out).pretraining.start_seed == seed


def test_runs_that_do_not_fit_the_model_are_refused(
    tmp_path: Path, runs_files: list[Path], spec_file: Path
) -> None:
    out = tmp_path / "genesis.msgpack"
    narrow = write_runs(tmp_path / "narrow.npz", synthetic_runs(3, features=10))
    code, _, stderr = pretrain(narrow, "--model-spec", spec_file, "--out", out)
    assert code == ExitCode.DATA
    assert int(ExitCode.DATA) == 4
    assert "10 features" in stderr
    assert "n_features=52" in stderr
    # a spec of two classes has no class for fault 2
    two = spec_file.with_name("two.json")
    two.write_bytes(msgspec.json.encode(msgspec.structs.replace(SPEC, n_classes=2)))
    code, _, stderr = pretrain(*runs_files, "--model-spec", two, "--out", out)
    assert code == ExitCode.DATA
    assert "label 2" in stderr
    short_runs = [PlantRun(fault=0, set=0, x=np.zeros((5, N_FEATURES)), y=np.zeros(5, np.int64))]
    short = write_runs(tmp_path / "short.npz", short_runs)
    code, _, stderr = pretrain(short, "--model-spec", spec_file, "--out", out)
    assert code == ExitCode.DATA
    assert "no window of 8 samples" in stderr
    assert not out.exists()


def test_bad_files_and_options_exit_with_the_documented_codes(
    tmp_path: Path, runs_files: list[Path], spec_file: Path
) -> None:
    out = tmp_path / "genesis.msgpack"
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an npz archive")
    code, _, stderr = pretrain(garbage, "--model-spec", spec_file, "--out", out)
    assert code == ExitCode.DATA
    assert "garbage.npz" in stderr
    bad_spec = tmp_path / "bad-spec.json"
    bad_spec.write_text('{"n_features": 52}')
    code, _, stderr = pretrain(*runs_files, "--model-spec", bad_spec, "--out", out)
    assert code == ExitCode.CONFIG
    assert int(ExitCode.CONFIG) == 3
    assert "not a valid model spec" in stderr
    code, _, _ = pretrain(tmp_path / "missing.npz", "--out", out)
    assert code == ExitCode.USAGE
    assert int(ExitCode.USAGE) == 2
    code, _, _ = pretrain(*runs_files, "--epochs", "0", "--out", out)
    assert code == ExitCode.USAGE
    assert not out.exists()
    out.write_bytes(b"keep me")
    code, _, stderr = pretrain(*runs_files, "--model-spec", spec_file, "--out", out)
    assert code == ExitCode.CONFLICT
    assert int(ExitCode.CONFLICT) == 5
    assert "--force" in stderr
    assert out.read_bytes() == b"keep me"
    code, _, stderr = pretrain(runs_files[0], "--out", runs_files[0], "--force")
    assert code == ExitCode.USAGE
    code, _, stderr = pretrain(runs_files[0], "--out", out / "genesis.msgpack")
    assert code == ExitCode.CONFIG  # checked before training: out is a file, not a directory
    assert "not a directory" in stderr
    help_text = CliRunner().invoke(agent_main, ["pretrain", "--help"]).stdout
    assert "Exit codes" in help_text
    assert "5 --out exists" in help_text


def test_a_bare_npy_or_a_huge_array_header_exits_data(
    tmp_path: Path, runs_files: list[Path], spec_file: Path
) -> None:
    """Runs files that are one .npy array, or whose header declares an array no machine
    holds or is too long to parse: exit 4 with the file named, no traceback."""
    out = tmp_path / "genesis.msgpack"
    bare = tmp_path / "runs.npy"
    np.save(bare, synthetic_runs(1)[0].x)
    huge_npy = tmp_path / "huge.npy"
    huge_npy.write_bytes(npy_header_only(HUGE_SHAPE))
    huge_npz = tmp_path / "huge.npz"
    huge_npz.write_bytes(
        with_member(runs_files[0].read_bytes(), "x.npy", npy_header_only(HUGE_SHAPE))
    )
    long_header = tmp_path / "long-header.npz"
    long_header.write_bytes(
        with_member(runs_files[0].read_bytes(), "x.npy", npy_header_only((1, 52), padding=20_000))
    )
    for path, message in [
        (bare, "runs.npy: holds a single array (.npy), not a simulated-runs .npz archive"),
        (huge_npy, "huge.npy: an array is larger than this machine can load"),
        (huge_npz, "huge.npz: an array is larger than this machine can load"),
        (long_header, "long-header.npz: cannot read it: Header info length"),
    ]:
        code, _, stderr = pretrain(path, "--model-spec", spec_file, "--out", out)
        assert code == ExitCode.DATA, stderr
        assert message in stderr
    assert not out.exists()


def test_windows_straddling_a_fault_onset_are_dropped() -> None:
    """Public runs are cut as the sites' data is: one label per window."""
    x = np.arange(60 * 52, dtype=np.float64).reshape(60, 52)
    y = np.where(np.arange(60) < 20, 0, 3).astype(np.int64)
    run = PlantRun(fault=3, set=0, x=x, y=y)
    cut = public_windows([run], window=8, stride=1)
    # starts 0..12 are normal, 13..19 straddle the onset, 20..52 are fault 3
    assert len(cut) == 13 + 33
    assert (cut.y[:13] == 0).all()
    assert (cut.y[13:] == 3).all()
    np.testing.assert_array_equal(cut.x[13, 0], x[20])
    assert cut.x.dtype == np.float32
    assert len(public_windows([run], window=8, stride=4)) == 4 + 9


def test_settings_out_of_range_are_refused(runs_files: list[Path]) -> None:
    public = read_public_runs(runs_files)
    with pytest.raises(PretrainingRefused, match="epochs"):
        check_public_runs(public, SPEC, stride=2, epochs=0)
    with pytest.raises(PretrainingRefused, match="stride"):
        check_public_runs(public, SPEC, stride=0, epochs=2)
    with pytest.raises(PretrainingRefused, match="no simulated-runs file"):
        read_public_runs([])


def test_a_model_that_learns_nothing_is_reported(tmp_path: Path, spec_file: Path) -> None:
    """Runs whose classes look alike: the loss stays near ln 3, and the command says so."""
    alike = write_runs(tmp_path / "alike.npz", synthetic_runs(6, shift=0.0))
    out = tmp_path / "genesis.msgpack"
    code, stdout, stderr = pretrain(
        alike, "--model-spec", spec_file, "--epochs", "1", "--out", out, "--json"
    )
    assert code == 0, stderr
    assert "learned little" in json.loads(stdout)["warnings"][0]
    assert "warning: the model learned little" in stderr


def test_the_command_line_defaults_are_those_of_the_training() -> None:
    """pretrain_cli keeps copies (importing the training loads torch)."""
    assert pretrain_cli.DEFAULT_EPOCHS == pretraining.DEFAULT_EPOCHS
    assert pretrain_cli.MAX_EPOCHS == training.MAX_LOCAL_EPOCHS
