"""ONNX export of the global model: recorded facts, parity with torch, refusals."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from fedgate_agent.model import build_model
from fedgate_agent.onnx_export import (
    INPUT_NAME,
    PARITY_TOLERANCE,
    SYNTHETIC_WINDOWS,
    ModelExportFailed,
    export_in_subprocess,
    export_model,
    parity_windows,
    save_exported_model,
)
from fedgate_agent.scoring import (
    ScoringFailed,
    ScoringModel,
    ScoringModelMissing,
    ScoringModelUnusable,
    WindowShapeError,
    load_scoring_model,
    onnx_digest_path,
    onnx_path,
)
from fedgate_common.model_spec import ModelSpec

from tests.agent.scoring_support import demo_spec, exported_demo_model, tep_test_set, weights

torch.set_num_threads(1)


def test_export_records_opset_input_digest_and_parity() -> None:
    exported = exported_demo_model(0)
    spec = demo_spec()
    assert exported.opset >= 18
    assert exported.input_name == INPUT_NAME
    assert exported.input_shape == ("batch", spec.window, spec.n_features)
    assert exported.model_digest == "00" * 32
    assert 0 <= exported.parity_max_abs_diff <= exported.parity_tolerance == PARITY_TOLERANCE
    assert exported.parity_windows == 64 + SYNTHETIC_WINDOWS  # real test windows + synthetic
    proto = onnx.load_from_string(exported.onnx)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["fedgate.model_digest"] == "00" * 32
    assert float(meta["fedgate.parity_max_abs_diff"]) == exported.parity_max_abs_diff
    assert int(meta["fedgate.opset"]) == exported.opset
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param  # the batch axis is symbolic
    assert [d.dim_value for d in dims[1:]] == [spec.window, spec.n_features]


def test_parity_with_torch_on_the_whole_test_set() -> None:
    """Every held-out TEP window: onnxruntime logits within the tolerance of torch eager."""
    test = tep_test_set()
    spec = demo_spec()
    model = ScoringModel.from_onnx(exported_demo_model(0).onnx)
    torch_model = build_model(spec, weights=weights(spec, 0)).eval()
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(test.x)).numpy()
    got = model.logits(test.x)
    max_abs_diff = float(np.max(np.abs(got - expected)))
    print(f"ONNX vs torch on {len(test)} TEP test windows: max abs diff {max_abs_diff:.3g}")
    assert len(test) > 5_000
    assert max_abs_diff <= PARITY_TOLERANCE
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).mean() > 0.999


@pytest.mark.parametrize("reading", [1e19, -1e30, 3e36])
def test_a_huge_reading_scores_as_torch_does(reading: float) -> None:
    """The rewritten asinh stays finite where sqrt(z² + 1) would overflow float32."""
    spec = demo_spec()
    window = tep_test_set().x[:1].copy()
    window[0, 3, 5] = reading
    torch_model = build_model(spec, weights=weights(spec, 0)).eval()
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(window)).numpy()
    got = ScoringModel.from_onnx(exported_demo_model(0).onnx).logits(window)
    assert np.isfinite(expected).all()
    assert float(np.max(np.abs(got - expected))) <= PARITY_TOLERANCE


def test_non_finite_scores_are_refused_not_published() -> None:
    window = tep_test_set().x[:2].copy()
    window[1, 0, 0] = 3.4e38  # standardisation overflows in torch and onnxruntime alike
    with pytest.raises(ScoringFailed, match="1 of 2 windows gave non-finite scores"):
        ScoringModel.from_onnx(exported_demo_model(0).onnx).score(window)


def test_batch_axis_is_dynamic() -> None:
    model = ScoringModel.from_onnx(exported_demo_model(0).onnx)
    x = tep_test_set().x[:33]
    one_by_one = np.concatenate([model.logits(x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(model.logits(x), one_by_one, atol=1e-5)


def test_parity_failure_refuses_the_model() -> None:
    spec = ModelSpec(n_features=3, window=8, n_classes=2, channels=4)
    with pytest.raises(ModelExportFailed) as error:
        export_model(
            spec,
            weights(spec, 1),
            digest="ab" * 32,
            round=1,
            windows=parity_windows(spec),
            tolerance=-1.0,  # no export can meet it: the check itself is exercised
        )
    assert error.value.max_abs_diff is not None
    assert error.value.max_abs_diff >= 0
    assert "tolerance" in str(error.value)


def test_saved_file_loads_with_its_metadata(tmp_path: Path) -> None:
    exported = exported_demo_model(0)
    path = save_exported_model(tmp_path, exported)
    assert path == onnx_path(tmp_path)
    assert oct(path.stat().st_mode & 0o777) == "0o640"
    model = load_scoring_model(path)
    assert (model.model_digest, model.model_round, model.spec) == (
        exported.model_digest,
        exported.model_round,
        demo_spec(),
    )
    assert model.parity_max_abs_diff == exported.parity_max_abs_diff


def test_missing_foreign_or_broken_files_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ScoringModelMissing, match="certified global model"):
        load_scoring_model(tmp_path / "absent.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ScoringModelUnusable, match="onnxruntime"):
        load_scoring_model(garbage)
    proto = onnx.load_from_string(exported_demo_model(0).onnx)
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(proto.SerializeToString())
    with pytest.raises(ScoringModelUnusable, match="fedgate metadata"):
        load_scoring_model(foreign)


def test_a_damaged_file_that_still_loads_is_refused_by_its_recorded_digest(
    tmp_path: Path,
) -> None:
    """Bytes of a weight flipped: onnxruntime loads it, its metadata still names the
    certified model, and it would score wrongly; the SHA-256 written at export says so."""
    exported = exported_demo_model(0)
    path = save_exported_model(tmp_path, exported)
    assert onnx_digest_path(path).read_text() == hashlib.sha256(exported.onnx).hexdigest()
    proto = onnx.load_from_string(exported.onnx)
    weight = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    weight.raw_data = bytes(b ^ 0x80 for b in weight.raw_data)  # every sign bit
    path.write_bytes(proto.SerializeToString())
    ScoringModel.from_onnx(path)  # still a model onnxruntime runs

    with pytest.raises(ScoringModelUnusable, match="does not match the SHA-256 recorded"):
        load_scoring_model(path)
    # Without the record (a file from before it existed): usable for `predict`, but not
    # reused by the running agent, which exports the model again.
    onnx_digest_path(path).unlink()
    assert load_scoring_model(path).model_digest == exported.model_digest
    with pytest.raises(ScoringModelUnusable, match="no recorded digest"):
        load_scoring_model(path, require_digest=True)


def test_windows_of_the_wrong_shape_are_refused() -> None:
    model = ScoringModel.from_onnx(exported_demo_model(0).onnx)
    with pytest.raises(WindowShapeError, match=r"\(n, 20, 52\)"):
        model.logits(np.zeros((2, 20, 51), dtype=np.float32))


def test_the_export_child_imports_nothing_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m` puts the working directory first on sys.path: a msgspec.py there ran as
    the agent user at every export."""
    marker = tmp_path / "planted-code-ran"
    (tmp_path / "msgspec.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    spec = demo_spec()
    exported = export_in_subprocess(
        spec,
        weights(spec, 0),
        digest="00" * 32,
        round=0,
        windows=parity_windows(spec, tep_test_set().x[::400]),
    )
    assert exported.model_digest == "00" * 32
    assert not marker.exists()


def test_a_scratch_directory_that_cannot_be_written_is_an_export_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full /tmp raised a bare OSError out of the export task and ended the agent."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
    spec = demo_spec()
    with pytest.raises(ModelExportFailed, match="No such file or directory"):
        export_in_subprocess(
            spec,
            weights(spec, 0),
            digest="00" * 32,
            round=0,
            windows=np.zeros((1, 20, 52), np.float32),
        )
