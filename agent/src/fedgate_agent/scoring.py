"""Scoring windows with the exported global model in onnxruntime.

:class:`ScoringModel` is one loaded model: an onnxruntime session (one intra-op and one
inter-op thread: a gateway gives scoring one core) plus the certified digest and spec read
from the ONNX file's own metadata. It is immutable; a new global model is a new
:class:`ScoringModel`.

:class:`LiveScorer` holds the model in use in a single attribute. A swap is one reference
assignment, and every scoring call reads that attribute exactly once, so a batch is scored
and labelled by one model only, and scoring never waits for a swap (the new model is
exported and loaded beforehand, off the event loop).

What a prediction says (:class:`Prediction`): the predicted class and its probability, the
softmax probabilities of every class, and an anomaly score ``1 − P(normal class)`` (the
fault class 0 of TEP is "normal"; ``normal_class = -1`` turns the score off). An
:class:`AlertRule` turns predictions into alerts: raised when the anomaly score reaches the
threshold or the predicted class is one of the alert classes, cleared when a later window
no longer does; only the changes are published.

:func:`window_ending_at` cuts the live window ending at one grid point from the buffer, on
the same epoch-aligned grid and forward-fill limit as the training windows
(:mod:`fedgate_agent.ingest.windows`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import numpy.typing as npt
from fedgate_common.errors import MalformedMessage
from fedgate_common.identifiers import validate_identifier
from fedgate_common.model_spec import ModelSpec
from fedgate_common.topics import cloud_prefix

from fedgate_agent.errors import AgentError
from fedgate_agent.ingest.errors import WindowingError
from fedgate_agent.ingest.windows import SeriesReader, WindowSpec, resample
from fedgate_agent.state import MODELS_DIR

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = [
    "AlertRule",
    "AlertTracker",
    "GridWindows",
    "LiveScorer",
    "Prediction",
    "ScoringFailed",
    "ScoringModel",
    "ScoringModelMissing",
    "ScoringModelUnusable",
    "WindowShapeError",
    "alerts_topic",
    "latest_grid_point",
    "load_scoring_model",
    "onnx_path",
    "open_session",
    "predictions_topic",
    "window_ending_at",
    "windows_over",
]

#: The exported model in the state directory (next to ``current.fgm``).
ONNX_FILE = "current.onnx"
DIGEST_SUFFIX = ".sha256"  # beside the ONNX file: the SHA-256 of its bytes, written by the export
INPUT_NAME = "windows"
OUTPUT_NAME = "logits"
METADATA_PREFIX = "fedgate."
PAYLOAD_VERSION = 1


class ScoringModelMissing(AgentError):
    """No exported model exists yet (the agent has not received a certified global model)."""

    kind = "no_scoring_model"


class ScoringModelUnusable(AgentError):
    """The ONNX file exists but cannot be loaded or lacks the fedgate metadata."""

    kind = "scoring_model_unusable"


class ScoringFailed(AgentError):
    """onnxruntime refused to run the model on a batch (the message is onnxruntime's), or
    the batch gave non-finite scores; nothing of it is published."""

    kind = "scoring_failed"


class WindowShapeError(AgentError):
    """Windows handed to the scorer do not have the model's ``(window, n_features)`` shape."""

    kind = "window_shape"


def open_session(onnx_model: bytes | str) -> ort.InferenceSession:
    """An onnxruntime CPU session using one thread (ONNX bytes or a file path).

    onnxruntime is imported here, when a model is first loaded: the agent's other commands
    start without it (faster, and without its warnings on stderr)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])


class Prediction(msgspec.Struct, kw_only=True):
    """One scored window, as published on the predictions topic (JSON)."""

    v: int = PAYLOAD_VERSION
    window_end: float | None  # grid time of the window's last point (s since epoch)
    model_digest: str
    model_round: int
    predicted_class: int
    probability: float  # of predicted_class
    anomaly_score: float | None  # 1 − P(normal class); None when normal_class = -1
    probabilities: list[float]


@dataclass(frozen=True, eq=False)
class ScoringModel:
    """A loaded exported model; scoring is :meth:`score` (thread-safe, stateless)."""

    session: ort.InferenceSession
    model_digest: str
    model_round: int
    spec: ModelSpec
    opset: int
    parity_max_abs_diff: float
    parity_tolerance: float
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_onnx(cls, onnx_model: bytes | Path) -> ScoringModel:
        """Load ONNX bytes or a file written by :mod:`fedgate_agent.onnx_export`."""
        where = str(onnx_model) if isinstance(onnx_model, Path) else "ONNX model"
        try:
            session = open_session(str(onnx_model) if isinstance(onnx_model, Path) else onnx_model)
        except Exception as exc:  # onnxruntime raises its own (non-Python-hierarchy) errors
            raise ScoringModelUnusable(f"{where} cannot be loaded by onnxruntime: {exc}") from None
        meta = session.get_modelmeta().custom_metadata_map
        fields = {k[len(METADATA_PREFIX) :]: v for k, v in meta.items() if k.startswith("fedgate.")}
        try:
            spec = msgspec.json.decode(fields["spec"], type=ModelSpec)
            model = cls(
                session=session,
                model_digest=fields["model_digest"],
                model_round=int(fields["model_round"]),
                spec=spec,
                opset=_opset(session),
                parity_max_abs_diff=float(fields["parity_max_abs_diff"]),
                parity_tolerance=float(fields["parity_tolerance"]),
                metadata=fields,
            )
        except (KeyError, ValueError, msgspec.DecodeError, MalformedMessage) as exc:
            raise ScoringModelUnusable(
                f"{where} lacks valid fedgate metadata ({exc}); it was not written by "
                "fedgate-agent: delete it, the agent exports the current model again"
            ) from None
        inputs = session.get_inputs()
        if [i.name for i in inputs] != [INPUT_NAME] or list(inputs[0].shape[1:]) != [
            spec.window,
            spec.n_features,
        ]:
            raise ScoringModelUnusable(f"{where} has inputs {inputs}, not {INPUT_NAME!r}")
        return model

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`WindowShapeError` unless ``shape`` is ``(n, window, n_features)``."""
        expected = (self.spec.window, self.spec.n_features)
        if len(shape) != 3 or shape[1:] != expected:
            raise WindowShapeError(
                f"windows of shape {shape} do not fit the model: it needs (n, {expected[0]}, "
                f"{expected[1]}) — {expected[0]} time steps of {expected[1]} features"
            )

    def logits(self, windows: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
        """Raw model output ``(n, n_classes)`` for ``windows`` ``(n, window, n_features)``."""
        x = np.ascontiguousarray(windows, dtype=np.float32)
        self.check_shape(x.shape)
        try:
            out: npt.NDArray[np.float32] = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        except Exception as exc:  # onnxruntime's errors have no common Python base class
            raise ScoringFailed(f"onnxruntime could not score {len(x)} windows: {exc}") from None
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).any(axis=1).sum())
            raise ScoringFailed(
                f"{bad} of {len(x)} windows gave non-finite scores (a reading near the float32 "
                f"limit, {float(np.abs(x).max()):.3g} here, overflows the standardisation)"
            )
        return out

    def score(
        self,
        windows: npt.NDArray[np.floating],
        *,
        window_ends: Sequence[float | None] | None = None,
        normal_class: int = 0,
    ) -> list[Prediction]:
        """One :class:`Prediction` per window, all from this model."""
        return self.predictions(
            self.logits(windows), window_ends=window_ends, normal_class=normal_class
        )

    def predictions(
        self,
        logits: npt.NDArray[np.float32],
        *,
        window_ends: Sequence[float | None] | None = None,
        normal_class: int = 0,
    ) -> list[Prediction]:
        """The :class:`Prediction` of each row of this model's ``logits`` (:meth:`logits`):
        ``predict`` keeps a long file's logits and builds its predictions a slice at a time."""
        logits = logits.astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        classes = probabilities.argmax(axis=1)
        ends = list(window_ends) if window_ends is not None else [None] * len(logits)
        use_normal = 0 <= normal_class < self.spec.n_classes
        predictions: list[Prediction] = []
        for row, end in enumerate(ends):
            p = probabilities[row]
            predicted = int(classes[row])
            predictions.append(
                Prediction(
                    window_end=end,
                    model_digest=self.model_digest,
                    model_round=self.model_round,
                    predicted_class=predicted,
                    probability=round(float(p[predicted]), 6),
                    anomaly_score=round(1.0 - float(p[normal_class]), 6) if use_normal else None,
                    probabilities=[round(float(v), 6) for v in p],
                )
            )
        return predictions


def _opset(session: ort.InferenceSession) -> int:
    # onnxruntime does not expose the opset; the file's producer metadata is enough here.
    version = session.get_modelmeta().custom_metadata_map.get("fedgate.opset")
    return int(version) if version is not None and version.isdigit() else 0


def onnx_path(state_dir: Path) -> Path:
    """``<state_dir>/models/current.onnx``."""
    return state_dir / MODELS_DIR / ONNX_FILE


def onnx_digest_path(path: Path) -> Path:
    """Where the export keeps the SHA-256 of ``path``'s bytes: ``current.onnx.sha256``."""
    return path.with_name(path.name + DIGEST_SUFFIX)


def onnx_file_digest(onnx: bytes) -> str:
    return hashlib.sha256(onnx).hexdigest()


def load_scoring_model(path: Path, *, require_digest: bool = False) -> ScoringModel:
    """The exported model at ``path``; :class:`ScoringModelMissing` when there is none.

    When the export's SHA-256 lies beside it (``current.onnx.sha256``) the file must match
    it: a damaged file can load and score wrongly under the certified model's digest,
    which its metadata still names. ``require_digest``: without that record the file is
    unusable too (the running agent then exports it again).
    """
    if not path.exists():
        raise ScoringModelMissing(
            f"no exported model at {path}: the agent writes it after it accepts its first "
            "certified global model (`fedgate-agent status` shows model_round)"
        )
    try:
        onnx = path.read_bytes()
        recorded = onnx_digest_path(path).read_text().strip()
    except FileNotFoundError:
        if require_digest:
            raise ScoringModelUnusable(
                f"{path} has no recorded digest ({onnx_digest_path(path).name})"
            ) from None
        return ScoringModel.from_onnx(path)
    except OSError as exc:
        raise ScoringModelUnusable(f"{path} cannot be read: {exc}") from None
    if onnx_file_digest(onnx) != recorded:
        raise ScoringModelUnusable(
            f"{path} does not match the SHA-256 recorded when it was exported "
            f"({onnx_digest_path(path).name}): the file is damaged; the agent exports it "
            "again at its next start"
        )
    return ScoringModel.from_onnx(onnx)


class LiveScorer:
    """The model in use; :meth:`swap` replaces it atomically for later scoring calls."""

    def __init__(self) -> None:
        self._model: ScoringModel | None = None

    @property
    def model(self) -> ScoringModel | None:
        return self._model

    def swap(self, model: ScoringModel) -> ScoringModel | None:
        """Put ``model`` in use (one reference assignment); returns the previous one."""
        previous, self._model = self._model, model
        return previous

    def score(
        self,
        windows: npt.NDArray[np.floating],
        *,
        window_ends: Sequence[float | None] | None = None,
        normal_class: int = 0,
    ) -> list[Prediction]:
        """Score with one snapshot of the model in use (:class:`ScoringModelMissing` if none)."""
        model = self._model  # read once: a concurrent swap affects the next call only
        if model is None:
            raise ScoringModelMissing("no global model has been exported for scoring yet")
        return model.score(windows, window_ends=window_ends, normal_class=normal_class)


@dataclass(frozen=True)
class AlertRule:
    """When a window raises an alert: anomaly score ≥ ``threshold`` (0: never) or the
    predicted class in ``classes``."""

    threshold: float = 0.0
    classes: frozenset[int] = frozenset()

    def reasons(self, prediction: Prediction) -> list[str]:
        found: list[str] = []
        score = prediction.anomaly_score
        if self.threshold > 0 and score is not None and score >= self.threshold:
            found.append("anomaly_score")
        if prediction.predicted_class in self.classes:
            found.append("class")
        return found


class Alert(msgspec.Struct, kw_only=True):
    """An alert state change, as published on the alert topic (JSON, retained)."""

    v: int = PAYLOAD_VERSION
    state: str  # "raised" | "cleared"
    reasons: list[str]  # anomaly_score | class (empty when cleared)
    window_end: float | None
    model_digest: str
    model_round: int
    predicted_class: int
    anomaly_score: float | None
    threshold: float
    alert_classes: list[int]


class AlertTracker:
    """Edge detection with hysteresis: an :class:`Alert` when the alert state changes, else
    None. The state becomes "raised" after ``raise_after`` alerting windows in a row and
    "cleared" after ``clear_after`` quiet windows in a row, so a score hovering at the
    threshold does not flap. The first window of a run always gives one (cleared, unless
    ``raise_after`` is 1 and it alerts), so the retained alert of an earlier run (perhaps a
    "raised" left behind by a stop) is replaced by this run's state at once."""

    def __init__(self, rule: AlertRule, *, raise_after: int = 1, clear_after: int = 1) -> None:
        if raise_after < 1 or clear_after < 1:
            raise ValueError("raise_after and clear_after must be at least 1")
        self.rule = rule
        self.raise_after = raise_after
        self.clear_after = clear_after
        self._state: bool | None = None  # None: nothing published by this run yet
        self._alerting_run = 0  # alerting windows in a row, up to this one
        self._quiet_run = 0  # quiet windows in a row, up to this one
        self.raised = 0

    @property
    def active(self) -> bool:
        return bool(self._state)

    def observe(self, prediction: Prediction) -> Alert | None:
        reasons = self.rule.reasons(prediction)
        if reasons:
            self._alerting_run, self._quiet_run = self._alerting_run + 1, 0
        else:
            self._alerting_run, self._quiet_run = 0, self._quiet_run + 1
        if self._state:
            state = self._quiet_run < self.clear_after
        else:
            state = self._alerting_run >= self.raise_after
        if state == self._state:
            return None
        self._state = state
        if self.active:
            self.raised += 1
        return Alert(
            state="raised" if self.active else "cleared",
            reasons=reasons if self.active else [],
            window_end=prediction.window_end,
            model_digest=prediction.model_digest,
            model_round=prediction.model_round,
            predicted_class=prediction.predicted_class,
            anomaly_score=prediction.anomaly_score,
            threshold=self.rule.threshold,
            alert_classes=sorted(self.rule.classes),
        )


def latest_grid_point(now: float, period_s: float) -> float:
    """The newest grid time at or before ``now`` (grid: multiples of ``period_s``)."""
    return math.floor(now / period_s) * period_s


def window_ending_at(
    buffer: SeriesReader, spec: WindowSpec, end: float
) -> npt.NDArray[np.float32] | None:
    """The ``(length, n_features)`` window whose last grid point is ``end``, or None when a
    feature has no sample within the forward-fill limit at one of its points."""
    period = spec.period_s
    first = end - (spec.length - 1) * period
    series = buffer.read_series(
        list(spec.tags), first - spec.feature_max_gap_s, math.nextafter(end, math.inf)
    )
    grid = np.arange(spec.length, dtype=np.float64) * period + first
    window = np.empty((spec.length, len(spec.tags)), dtype=np.float32)
    for column, tag in enumerate(spec.tags):
        ts, values = series.get(tag, (np.empty(0), np.empty(0)))
        column_values, present = resample(
            (np.asarray(ts, dtype=np.float64), np.asarray(values, dtype=np.float64)),
            grid,
            spec.feature_max_gap_s,
        )
        if not present.all():
            return None
        window[:, column] = column_values
    return window


def predictions_topic(deployment: str, cloud: str, agent: str) -> str:
    """``fedgate/<deployment>/<cloud>/site/<agent>/predictions``."""
    return f"{cloud_prefix(deployment, cloud)}/site/{validate_identifier(agent)}/predictions"


def alerts_topic(deployment: str, cloud: str, agent: str) -> str:
    """``fedgate/<deployment>/<cloud>/site/<agent>/alerts``."""
    return f"{cloud_prefix(deployment, cloud)}/site/{validate_identifier(agent)}/alerts"


@dataclass(frozen=True, eq=False)
class GridWindows:
    """The complete windows of a series resampled on the grid, cut on demand: the grid's
    samples are kept once (``n_grid × n_tags``), not every window's copy of them
    (``length`` times as much), so a long historian export is scored a slice at a time."""

    features: npt.NDArray[np.float32]  # (n_grid, n_tags): the series on the grid
    ends: npt.NDArray[np.float64]  # grid time of each complete window's last point
    end_rows: npt.NDArray[np.int64]  # each window's last row in ``features``
    length: int

    def __len__(self) -> int:
        return len(self.ends)

    def windows(self, start: int = 0, stop: int | None = None) -> npt.NDArray[np.float32]:
        """Windows ``start:stop`` as one ``(n, length, n_tags)`` array."""
        rows = self.end_rows[start:stop]
        if len(rows) == 0:
            return np.empty((0, self.length, self.features.shape[1]), dtype=np.float32)
        view = np.lib.stride_tricks.sliding_window_view(self.features, self.length, axis=0)
        return np.ascontiguousarray(view[rows - self.length + 1].transpose(0, 2, 1))


def windows_over(buffer: SeriesReader, spec: WindowSpec, *, stride: int = 1) -> GridWindows:
    """Every complete window of the buffer's whole time range.

    Windows end at grid points ``stride`` steps apart (counted from the newest), on the grid
    and with the forward-fill limit of :func:`window_ending_at`; windows with a missing
    feature are left out. Labels are not read (``predict`` on a historian export).
    """
    series = buffer.read_series(list(spec.tags))
    empty = [tag for tag in spec.tags if len(series.get(tag, ((), ()))[0]) == 0]
    if empty:
        raise WindowingError(f"tags {empty} have no samples; the model needs {list(spec.tags)}")
    first = max(float(series[tag][0][0]) for tag in spec.tags)
    last = max(float(series[tag][0][-1]) for tag in spec.tags)
    period = spec.period_s
    steps = np.arange(math.ceil(first / period), math.floor(last / period) + 1, dtype=np.float64)
    grid: npt.NDArray[np.float64] = steps * period
    features = np.empty((len(grid), len(spec.tags)), dtype=np.float32)
    present = np.ones(len(grid), dtype=bool)
    unread = dict(series)  # each tag's samples are let go once they are on the grid
    del series
    for column, tag in enumerate(spec.tags):
        values, tag_present = resample(unread.pop(tag), grid, spec.feature_max_gap_s)
        features[:, column] = values
        present &= tag_present
    if len(grid) < spec.length:
        no_rows = np.empty(0, dtype=np.int64)
        return GridWindows(features, np.empty(0), no_rows, spec.length)
    missing = np.concatenate(([0], np.cumsum(~present)))
    ends = np.arange(len(grid) - 1, spec.length - 2, -stride, dtype=np.int64)[::-1]
    complete = ends[missing[ends + 1] - missing[ends + 1 - spec.length] == 0]
    return GridWindows(features, grid[complete], complete, spec.length)
