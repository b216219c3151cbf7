"""`fedgate-agent predict --input FILE`: windows files and historian exports, offline."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
import pytest
from click.testing import CliRunner
from fedgate_agent import predict_cli
from fedgate_agent.cli import main as agent_main
from fedgate_agent.cli_support import ExitCode
from fedgate_agent.config import AgentConfig, ScoringConfig, WindowsConfig, write_config
from fedgate_agent.onnx_export import save_exported_model
from fedgate_agent.scoring import ScoringModel

from tests.agent.scoring_support import DEMO_WINDOW, exported_demo_model, tep_test_set
from tests.npz_support import npy_header_only, with_member

TAGS = tuple(f"XMEAS_{i}" for i in range(1, 53))
PERIOD_S = 180.0


def agent_config(tmp_path: Path, scoring: ScoringConfig | None = None) -> AgentConfig:
    return AgentConfig(
        agent_id="site-1",
        deployment="plant-a",
        cloud="cloud-1",
        state_dir=str(tmp_path / "state"),
        windows=WindowsConfig(tags=TAGS, period_s=PERIOD_S),
        scoring=scoring or ScoringConfig(),
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    write_config(path, agent_config(tmp_path))
    return path


def predict(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(agent_main, ["predict", *args])
    return result.exit_code, result.stdout, result.stderr


def test_without_an_exported_model_says_so(config: Path, tmp_path: Path) -> None:
    windows = tmp_path / "w.npz"
    np.savez(windows, x=tep_test_set().x[:2])
    code, _, err = predict("--config", str(config), "--input", str(windows))
    assert code == ExitCode.NO_MODEL
    assert int(ExitCode.NO_MODEL) == 7
    assert "no exported model" in err


def test_windows_file_with_labels(config: Path, tmp_path: Path) -> None:
    exported = exported_demo_model(0)
    save_exported_model(tmp_path / "state", exported)
    test = tep_test_set()
    x, y = test.x[::50], test.y[::50]
    windows = tmp_path / "windows.npz"
    np.savez(windows, x=x, y=y)
    code, out, err = predict("--config", str(config), "--input", str(windows), "--json")
    assert code == 0, err
    result = json.loads(out)
    expected = ScoringModel.from_onnx(exported.onnx).score(x)
    assert result["windows"] == len(x)
    assert result["model_digest"] == exported.model_digest
    assert [p["predicted_class"] for p in result["predictions"]] == [
        p.predicted_class for p in expected
    ]
    hits = sum(p.predicted_class == label for p, label in zip(expected, y, strict=True))
    assert result["accuracy"] == pytest.approx(hits / len(y), abs=1e-6)
    code, text, _ = predict("--config", str(config), "--input", str(windows))
    assert code == 0
    assert f"{len(x)} windows scored by model round 0" in text
    assert "accuracy against the file's labels" in text


def test_unusable_windows_files(config: Path, tmp_path: Path) -> None:
    save_exported_model(tmp_path / "state", exported_demo_model(0))
    no_x = tmp_path / "no_x.npz"
    np.savez(no_x, windows=np.zeros((1, 20, 52), dtype=np.float32))
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, x=np.zeros((1, 20, 51), dtype=np.float32))
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    nan = tmp_path / "nan.npz"
    x = np.zeros((3, 20, 52), dtype=np.float32)
    x[1, 4, 7], x[2, 0, 0] = np.nan, np.inf
    np.savez(nan, x=x)
    for path, message in [
        (no_x, "arrays ['x'] missing"),
        (wrong_shape, "do not fit"),
        (not_npz, "npz"),
        (nan, "'x' holds 2 NaN or infinite value(s), the first at index (1, 4, 7)"),
    ]:
        code, _, err = predict("--config", str(config), "--input", str(path))
        assert code == ExitCode.DATA, err
        assert message in err


def test_truncated_corrupt_or_huge_windows_files_exit_data(config: Path, tmp_path: Path) -> None:
    """An .npz cut short, with a member that fails its CRC, holding one bare .npy array, or
    declaring an array no machine holds: exit 4 naming the file, no traceback."""
    save_exported_model(tmp_path / "state", exported_demo_model(0))
    valid = tmp_path / "valid.npz"
    np.savez(valid, x=tep_test_set().x[:4])
    data = valid.read_bytes()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.npz"
    middle = len(data) // 2  # inside the float data of x.npy (stored uncompressed)
    corrupt.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    bare = tmp_path / "bare.npz"
    with bare.open("wb") as stream:
        np.save(stream, tep_test_set().x[:4])
    huge = tmp_path / "huge.npz"
    huge.write_bytes(with_member(data, "x.npy", npy_header_only((10**15, 20, 52))))
    for path, message in [
        (truncated, "truncated.npz: not a readable .npz archive"),
        (corrupt, "corrupt.npz: not a readable .npz archive (Bad CRC-32"),
        (bare, "bare.npz: holds a single array, not an .npz archive"),
        (huge, "huge.npz: an array is larger than this machine can load"),
    ]:
        code, _, err = predict("--config", str(config), "--input", str(path))
        assert code == ExitCode.DATA, err
        assert message in err


def test_historian_export_is_cut_on_the_windows_grid(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wide CSV export of 30 samples 3 minutes apart gives the 11 windows of 20 that end
    at each grid point, each scored as the same rows cut directly would be (cut and scored
    4 windows at a time)."""
    monkeypatch.setattr(predict_cli, "SCORE_BATCH", 4)
    exported = exported_demo_model(0)
    save_exported_model(tmp_path / "state", exported)
    rows = tep_test_set().x[100, :, :]  # 20 samples of one test window …
    rows = np.concatenate([rows, tep_test_set().x[101, -10:, :]])  # … and 10 more
    start = 1_764_374_400.0  # a multiple of 180 s
    export = tmp_path / "line3.csv"
    with export.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["timestamp", *TAGS])
        for i, values in enumerate(rows):
            writer.writerow([start + i * PERIOD_S, *(f"{v:.9g}" for v in values)])
    code, out, err = predict("--config", str(config), "--input", str(export), "--json")
    assert code == 0, err
    result = json.loads(out)
    direct = np.lib.stride_tricks.sliding_window_view(
        np.array([[float(f"{v:.9g}") for v in r] for r in rows], dtype=np.float32),
        DEMO_WINDOW,
        axis=0,
    ).transpose(0, 2, 1)
    expected = ScoringModel.from_onnx(exported.onnx).score(direct)
    assert result["windows"] == len(rows) - DEMO_WINDOW + 1 == 11
    assert [p["window_end"] for p in result["predictions"]] == [
        start + (i + DEMO_WINDOW - 1) * PERIOD_S for i in range(11)
    ]
    got = np.array([p["probabilities"] for p in result["predictions"]])
    np.testing.assert_allclose(got, [p.probabilities for p in expected], atol=1e-5)
    code, _, err = predict("--config", str(config), "--input", str(export), "--stride", "5")
    assert code == 0, err


def test_a_model_file_is_scored_with_the_configured_normal_class(
    config: Path, tmp_path: Path
) -> None:
    """`--model FILE` with a windows file: the configuration named still applies."""
    exported = exported_demo_model(0)
    model = save_exported_model(tmp_path / "state", exported)
    write_config(config, agent_config(tmp_path, ScoringConfig(normal_class=1)))
    windows = tmp_path / "w.npz"
    x = tep_test_set().x[:3]
    np.savez(windows, x=x)
    expected = ScoringModel.from_onnx(exported.onnx).score(x, normal_class=1)

    for extra in ([], ["--model", str(model)]):
        code, out, err = predict("--config", str(config), "--input", str(windows), "--json", *extra)
        assert code == 0, err
        scores = [p["anomaly_score"] for p in json.loads(out)["predictions"]]
        assert scores == pytest.approx([p.anomaly_score for p in expected])
    code, _, err = predict(
        "--config", str(tmp_path / "absent.toml"), "--input", str(windows), "--model", str(model)
    )
    assert code == ExitCode.CONFIG, err


def test_model_file_problems_are_named(config: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "w.npz", x=tep_test_set().x[:2])
    windows = (tmp_path / "w.npz").rename(tmp_path / "W.NPZ")  # the suffix in any case
    code, _, err = predict("--input", str(windows), "--model", str(tmp_path / "missing.onnx"))
    assert code == ExitCode.NO_MODEL
    assert "missing.onnx: no such file" in err
    model = save_exported_model(tmp_path / "state", exported_demo_model(0))
    code, out, err = predict("--input", str(windows), "--model", str(model), "--json")
    assert code == 0, err
    assert json.loads(out)["windows"] == 2


def test_a_stale_export_is_scored_with_a_warning(config: Path, tmp_path: Path) -> None:
    save_exported_model(tmp_path / "state", exported_demo_model(0))
    (tmp_path / "state" / "status.json").write_text('{"model_round": 3}')
    windows = tmp_path / "w.npz"
    np.savez(windows, x=tep_test_set().x[:2])
    code, _, err = predict("--config", str(config), "--input", str(windows))
    assert code == 0, err
    assert "the agent adopted the model of round 3, but" in err
    assert "round 0's: its export is pending or failed" in err


def test_an_export_too_short_for_a_window_says_so(config: Path, tmp_path: Path) -> None:
    save_exported_model(tmp_path / "state", exported_demo_model(0))
    short = tmp_path / "short.csv"
    with short.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["timestamp", *TAGS])
        for i in range(3):
            writer.writerow([f"2026-11-01T00:{i * 3:02d}:00Z", *([1.0] * len(TAGS))])
    code, _, err = predict("--config", str(config), "--input", str(short))
    assert code == ExitCode.DATA
    assert f"no complete window of {DEMO_WINDOW} samples to score" in err


def test_a_long_file_is_scored_a_slice_at_a_time_with_the_same_result(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With slices of 7 windows, 40 windows give the predictions, counts and accuracy of one
    call over all of them, in JSON and in text; a failing slice is named and nothing of the
    file is printed."""
    exported = exported_demo_model(0)
    save_exported_model(tmp_path / "state", exported)
    test = tep_test_set()
    x, y = test.x[::97][:40].copy(), test.y[::97][:40]  # a copy: x is changed below
    windows = tmp_path / "windows.npz"
    np.savez(windows, x=x, y=y)
    monkeypatch.setattr(predict_cli, "SCORE_BATCH", 7)
    expected = ScoringModel.from_onnx(exported.onnx).score(x)
    code, out, err = predict("--config", str(config), "--input", str(windows), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["predictions"] == [msgspec.to_builtins(p) for p in expected]
    assert result["windows"] == 40
    counts = Counter(p.predicted_class for p in expected)
    assert result["class_counts"] == {str(c): n for c, n in sorted(counts.items())}
    hits = sum(p.predicted_class == label for p, label in zip(expected, y, strict=True))
    assert result["accuracy"] == pytest.approx(hits / 40, abs=1e-6)
    code, text, _ = predict("--config", str(config), "--input", str(windows))
    assert code == 0
    rows = [line.split() for line in text.splitlines()[2:42]]
    assert [int(r[0]) for r in rows] == list(range(40))
    assert [int(r[1]) for r in rows] == [p.predicted_class for p in expected]
    assert f"40 windows scored by model round 0 ({exported.model_digest[:16]})" in text
    assert f"accuracy against the file's labels: {hits / 40:.4f}" in text
    x[30, 0, 0] = 3.4e38  # the standardisation overflows: the fifth slice fails
    np.savez(windows, x=x, y=y)
    code, out, err = predict("--config", str(config), "--input", str(windows), "--json")
    assert code == ExitCode.DATA
    assert "windows 28–34: 1 of 7 windows gave non-finite scores" in err
    assert "predictions" not in out
    np.savez(windows, x=x[:, :19])  # one time step short: the file's shape is named
    code, _, err = predict("--config", str(config), "--input", str(windows))
    assert code == ExitCode.DATA
    assert "windows of shape (40, 19, 52) do not fit the model" in err


def test_an_input_of_no_known_format_is_named_before_anything_else(
    config: Path, tmp_path: Path
) -> None:
    notes = tmp_path / "readings.toml"
    notes.write_text("x = 1\n")
    code, _, err = predict("--config", str(config), "--input", str(notes))
    assert code == ExitCode.DATA
    assert "not a windows file (.npz) nor a historian export" in err
    assert "[windows]" not in err  # not mistaken for a configuration problem
