"""Export a certified global model to ONNX, check it against torch, keep it in the state dir.

The exported file is self-describing: what the agent needs to trust and use it travels
inside the ONNX model's ``metadata_props`` (keys ``fedgate.*``), so the one file is replaced
atomically and a reader never pairs a model with the description of another:

    fedgate.model_digest     digest of the certified global model (as the round protocol has it)
    fedgate.model_round      round that produced it
    fedgate.spec             the ModelSpec as JSON (window, features, classes, scaling)
    fedgate.parity_max_abs_diff, fedgate.parity_tolerance, fedgate.parity_windows
    fedgate.opset, fedgate.torch_version, fedgate.exported_at

Parity: the exported graph is run in onnxruntime on the given windows plus synthetic ones
around the model's standardisation constants, and the largest absolute difference of the
logits against torch eager must be at most :data:`PARITY_TOLERANCE`; otherwise
:class:`ModelExportFailed` is raised and nothing is written.

Export traces the model (torch.export + onnxscript): a second or more of CPU spent almost
entirely in Python. In a thread of the agent it would hold the GIL so much that live scoring
stalled for the whole export (measured: no window scored for 1.15 s with 50 ms windows), so
the agent runs :func:`export_in_subprocess`: a fresh child process per export, which exits
afterwards (docs/decisions/0033-onnx-export-in-a-child-process.md).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt
import torch
from fedgate_common.atomic_files import atomic_write
from fedgate_common.model_spec import ModelSpec

from fedgate_agent.errors import AgentError
from fedgate_agent.model import build_model
from fedgate_agent.scoring import (
    INPUT_NAME,
    METADATA_PREFIX,
    ONNX_FILE,
    OUTPUT_NAME,
    onnx_digest_path,
    onnx_file_digest,
    onnx_path,
    open_session,
)

__all__ = [
    "INPUT_NAME",
    "ONNX_FILE",
    "OUTPUT_NAME",
    "PARITY_TOLERANCE",
    "ExportedModel",
    "ModelExportFailed",
    "export_in_subprocess",
    "export_model",
    "onnx_path",
    "parity_windows",
    "save_exported_model",
]

#: Largest accepted |onnxruntime − torch| over every logit of the parity windows.
PARITY_TOLERANCE = 1e-4
#: Synthetic parity windows added to the real ones (mean ± up to 8 scales, fixed seed).
SYNTHETIC_WINDOWS = 32


class ModelExportFailed(AgentError):
    """The global model could not be exported to ONNX, or the export disagrees with torch.

    ``max_abs_diff`` is the measured parity gap when the export itself succeeded.
    """

    kind = "onnx_export_failed"

    def __init__(self, message: str, *, max_abs_diff: float | None = None) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff


@dataclass(frozen=True)
class ExportedModel:
    """One exported model: the ONNX bytes and what was recorded about them."""

    onnx: bytes
    model_digest: str
    model_round: int
    spec: ModelSpec
    opset: int
    input_name: str
    input_shape: tuple[str | int, ...]  # ("batch", window, n_features)
    parity_max_abs_diff: float
    parity_tolerance: float
    parity_windows: int
    seconds: float  # wall time of export + parity check


def parity_windows(
    spec: ModelSpec, real: npt.NDArray[np.floating] | None = None, *, limit: int = 64
) -> npt.NDArray[np.float32]:
    """Up to ``limit`` real windows plus :data:`SYNTHETIC_WINDOWS` synthetic ones.

    The synthetic windows (fixed seed, so a check is repeatable) spread over the model's
    standardisation range, excursions of several scales included, as a fault produces.
    """
    rng = np.random.default_rng(20260)
    mean = np.asarray(spec.feature_mean or (0.0,) * spec.n_features, dtype=np.float64)
    scale = np.asarray(spec.feature_scale or (1.0,) * spec.n_features, dtype=np.float64)
    spread = rng.uniform(0.5, 8.0, size=(SYNTHETIC_WINDOWS, 1, 1))
    noise = rng.standard_normal((SYNTHETIC_WINDOWS, spec.window, spec.n_features)) * spread
    synthetic = (mean + noise * scale).astype(np.float32)
    if real is None or len(real) == 0:
        return synthetic
    chosen = np.asarray(real[:limit], dtype=np.float32)
    return np.concatenate([chosen, synthetic])


def _onnx_bytes(model: torch.nn.Module, spec: ModelSpec) -> bytes:
    example = torch.zeros(2, spec.window, spec.n_features, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=1_000_000)
    # The exporter logs chatter (missing torchvision ops) at WARNING; keep it out of journald.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    if program is None:  # pragma: no cover - only without dynamo
        raise ModelExportFailed("torch.onnx.export returned no program")
    return bytes(program.model_proto.SerializeToString())


def _simplify(onnx_bytes: bytes) -> bytes:
    """Two rewrites of the exported graph that onnxruntime does not do itself (measured by
    bench/inference: together about 40 % of a window's scoring time); the parity check
    that follows covers them like the rest of the export.

    - ``Asinh`` becomes ``sign(z) · (log(s) + log(|z|/s + sqrt((|z|/s)² + 1/s²)))`` with
      ``s = max(|z|, 1)``: onnxruntime evaluates Asinh element by element with the C
      library, the replacement ops are vectorised; the scaling by ``s`` keeps a huge reading
      (a garbled register) finite, as torch's asinh is, where ``sqrt(z² + 1)`` overflows.
    - ``Mul`` by an all-ones and ``Add`` of an all-zeros constant are dropped (the exporter
      writes them for GroupNorm without affine parameters); only where the constant has no
      more elements than the ones it is broadcast onto cannot change the shape: a
      per-channel ``(C, 1)`` constant.
    """
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load_from_string(onnx_bytes)
    graph = proto.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    renamed: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    one = "fedgate_asinh_one"
    for node in graph.node:
        inputs = [renamed.get(name, name) for name in node.input]
        del node.input[:]
        node.input.extend(inputs)
        if node.op_type in ("Mul", "Add") and len(inputs) == 2 and node.output[0] not in outputs:
            neutral = 1.0 if node.op_type == "Mul" else 0.0
            value = constants.get(inputs[1])
            if (
                value is not None
                and value.ndim == 2
                and value.shape[1] == 1
                and (value == neutral).all()
            ):
                renamed[node.output[0]] = inputs[0]
                continue
        if node.op_type == "Asinh":
            z, y = inputs[0], node.output[0]
            t = f"{y}_fedgate"
            # asinh(|z|) = log(s) + log(r + sqrt(r² + q²)) with s = max(|z|, 1), r = |z|/s,
            # q = 1/s: r and q are at most 1, so nothing overflows however large |z| is.
            nodes += [
                helper.make_node("Abs", [z], [f"{t}_abs"]),
                helper.make_node("Max", [f"{t}_abs", one], [f"{t}_s"]),
                helper.make_node("Div", [f"{t}_abs", f"{t}_s"], [f"{t}_r"]),
                helper.make_node("Reciprocal", [f"{t}_s"], [f"{t}_q"]),
                helper.make_node("Mul", [f"{t}_r", f"{t}_r"], [f"{t}_r2"]),
                helper.make_node("Mul", [f"{t}_q", f"{t}_q"], [f"{t}_q2"]),
                helper.make_node("Add", [f"{t}_r2", f"{t}_q2"], [f"{t}_sq"]),
                helper.make_node("Sqrt", [f"{t}_sq"], [f"{t}_root"]),
                helper.make_node("Add", [f"{t}_r", f"{t}_root"], [f"{t}_sum"]),
                helper.make_node("Log", [f"{t}_sum"], [f"{t}_log"]),
                helper.make_node("Log", [f"{t}_s"], [f"{t}_scale"]),
                helper.make_node("Add", [f"{t}_scale", f"{t}_log"], [f"{t}_mag"]),
                helper.make_node("Sign", [z], [f"{t}_sign"]),
                helper.make_node("Mul", [f"{t}_sign", f"{t}_mag"], [y]),
            ]
            if one not in constants:
                unit = np.array(1.0, dtype=np.float32)
                graph.initializer.append(numpy_helper.from_array(unit, one))
                constants[one] = unit
            continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in nodes for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return bytes(proto.SerializeToString())


def _with_metadata(onnx_bytes: bytes, metadata: Mapping[str, str]) -> tuple[bytes, int]:
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    for key, value in {**metadata, "opset": str(opset)}.items():
        entry = proto.metadata_props.add()
        entry.key = METADATA_PREFIX + key
        entry.value = value
    return proto.SerializeToString(), int(opset)


def export_model(
    spec: ModelSpec,
    weights: Mapping[str, npt.NDArray[np.generic]],
    *,
    digest: str,
    round: int,
    windows: npt.NDArray[np.float32],
    tolerance: float = PARITY_TOLERANCE,
) -> ExportedModel:
    """Export the model ``spec`` + ``weights`` and check it on ``windows`` against torch.

    Raises :class:`ModelExportFailed` when tracing fails or the parity gap exceeds
    ``tolerance``. Uses torch and onnxruntime; call it off the event loop.
    """
    started = time.perf_counter()
    model = build_model(spec, weights=weights).eval()
    try:
        with torch.no_grad():
            raw = _simplify(_onnx_bytes(model, spec))
            reference = model(torch.from_numpy(np.ascontiguousarray(windows))).numpy()
        got = open_session(raw).run([OUTPUT_NAME], {INPUT_NAME: windows})[0]
        if got.shape != reference.shape:
            raise ModelExportFailed(f"the ONNX model gives {got.shape}, torch {reference.shape}")
    except ModelExportFailed:
        raise
    except Exception as exc:  # exporter and onnxruntime raise many kinds; all mean "no model"
        raise ModelExportFailed(f"ONNX export of model {digest[:12]} failed: {exc}") from exc
    diff = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - reference)))
    if not diff <= tolerance:  # NaN fails too
        raise ModelExportFailed(
            f"ONNX export of model {digest[:12]} differs from torch by {diff:.3g} on "
            f"{len(windows)} windows (tolerance {tolerance:g}); the model is not used for scoring",
            max_abs_diff=diff,
        )
    metadata = {
        "model_digest": digest,
        "model_round": str(round),
        "spec": msgspec.json.encode(spec).decode(),
        "parity_max_abs_diff": repr(diff),
        "parity_tolerance": repr(tolerance),
        "parity_windows": str(len(windows)),
        "torch_version": torch.__version__,
        "exported_at": repr(time.time()),
    }
    data, opset = _with_metadata(raw, metadata)
    return ExportedModel(
        onnx=data,
        model_digest=digest,
        model_round=round,
        spec=spec,
        opset=opset,
        input_name=INPUT_NAME,
        input_shape=("batch", spec.window, spec.n_features),
        parity_max_abs_diff=diff,
        parity_tolerance=tolerance,
        parity_windows=len(windows),
        seconds=time.perf_counter() - started,
    )


_JOB = "job.json"
_ARRAYS = "arrays.npz"
_WINDOWS = "__parity_windows__"
_RESULT = "result.json"
_ERROR = "error.json"
_MODEL = "model.onnx"
EXPORT_TIMEOUT_S = 900.0


class _Job(msgspec.Struct, frozen=True, kw_only=True):
    spec: ModelSpec
    digest: str
    round: int
    threads: int
    tolerance: float


class _Result(msgspec.Struct, frozen=True, kw_only=True):
    opset: int
    parity_max_abs_diff: float
    parity_windows: int
    seconds: float


class _Failure(msgspec.Struct, frozen=True, kw_only=True):
    message: str
    max_abs_diff: float | None = None


def export_in_subprocess(
    spec: ModelSpec,
    weights: Mapping[str, npt.NDArray[np.generic]],
    *,
    digest: str,
    round: int,
    windows: npt.NDArray[np.float32],
    threads: int = 1,
    tolerance: float = PARITY_TOLERANCE,
) -> ExportedModel:
    """:func:`export_model` in a child ``python -m fedgate_agent.onnx_export`` (blocking).

    The caller's interpreter keeps its GIL for serving; the child exits after the export,
    so the exporter's memory is returned. Job and result travel as JSON and ``.npz`` files
    in a private temporary directory (nothing is pickled). Raises
    :class:`ModelExportFailed` for a failed export or a child that died.
    """
    try:
        with tempfile.TemporaryDirectory(prefix="fedgate-export-") as scratch:
            job_dir = Path(scratch)
            job = _Job(spec=spec, digest=digest, round=round, threads=threads, tolerance=tolerance)
            (job_dir / _JOB).write_bytes(msgspec.json.encode(job))
            arrays = {name: np.asarray(a, dtype=np.float32) for name, a in weights.items()}
            arrays[_WINDOWS] = np.asarray(windows, dtype=np.float32)
            np.savez(job_dir / _ARRAYS, **arrays)  # type: ignore[arg-type]  # numpy's stub
            # -I: the child's imports come from the installation only, never from the
            # working directory the agent was started in (nor PYTHON* variables).
            child = subprocess.run(
                [sys.executable, "-I", "-m", "fedgate_agent.onnx_export", str(job_dir)],
                capture_output=True,
                text=True,
                timeout=EXPORT_TIMEOUT_S,
                check=False,
                cwd=job_dir,
            )
            if (job_dir / _ERROR).exists():
                failure = msgspec.json.decode((job_dir / _ERROR).read_bytes(), type=_Failure)
                raise ModelExportFailed(failure.message, max_abs_diff=failure.max_abs_diff)
            if child.returncode != 0 or not (job_dir / _RESULT).exists():
                tail = " ".join(child.stderr.strip().splitlines()[-3:])
                raise ModelExportFailed(
                    f"the ONNX export process for model {digest[:12]} exited with "
                    f"{child.returncode}: {tail or 'no message'}"
                )
            result = msgspec.json.decode((job_dir / _RESULT).read_bytes(), type=_Result)
            onnx_bytes = (job_dir / _MODEL).read_bytes()
    # The scratch directory (a full or read-only /tmp, say), or the child that ran too long.
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelExportFailed(f"the ONNX export of model {digest[:12]}: {exc}") from None
    return ExportedModel(
        onnx=onnx_bytes,
        model_digest=digest,
        model_round=round,
        spec=spec,
        opset=result.opset,
        input_name=INPUT_NAME,
        input_shape=("batch", spec.window, spec.n_features),
        parity_max_abs_diff=result.parity_max_abs_diff,
        parity_tolerance=tolerance,
        parity_windows=result.parity_windows,
        seconds=result.seconds,
    )


def _run_job(job_dir: Path) -> int:
    """The child's side of :func:`export_in_subprocess`."""
    job = msgspec.json.decode((job_dir / _JOB).read_bytes(), type=_Job)
    torch.set_num_threads(job.threads)
    with np.load(job_dir / _ARRAYS, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    windows = arrays.pop(_WINDOWS)
    try:
        exported = export_model(
            job.spec,
            arrays,
            digest=job.digest,
            round=job.round,
            windows=windows,
            tolerance=job.tolerance,
        )
    except ModelExportFailed as exc:
        failure = _Failure(message=str(exc), max_abs_diff=exc.max_abs_diff)
        (job_dir / _ERROR).write_bytes(msgspec.json.encode(failure))
        return 3
    (job_dir / _MODEL).write_bytes(exported.onnx)
    result = _Result(
        opset=exported.opset,
        parity_max_abs_diff=exported.parity_max_abs_diff,
        parity_windows=exported.parity_windows,
        seconds=exported.seconds,
    )
    (job_dir / _RESULT).write_bytes(msgspec.json.encode(result))
    return 0


def save_exported_model(state_dir: Path, exported: ExportedModel) -> Path:
    """Replace ``models/current.onnx`` atomically, its SHA-256 (``current.onnx.sha256``)
    first: a crash between the two leaves a record the old file fails, so it is exported
    again, never a damaged file taken as good. Returns the ONNX file's path."""
    path = onnx_path(state_dir)
    atomic_write(onnx_digest_path(path), onnx_file_digest(exported.onnx).encode(), mode=0o640)
    atomic_write(path, exported.onnx, mode=0o640)
    return path


if __name__ == "__main__":  # the child of export_in_subprocess
    sys.exit(_run_job(Path(sys.argv[1])))
