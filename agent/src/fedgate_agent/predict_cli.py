"""``fedgate-agent predict --input FILE``: score a file offline with the exported model.

Input formats (by suffix):

- ``.npz``: arrays ``x`` — float windows ``(n, window, n_features)`` of raw sensor values,
  as in the agent's training file — and optionally ``y`` (int labels, then accuracy is
  reported). Never unpickled.
- ``.csv``, ``.csv.gz``, ``.parquet``: a historian export in the shapes ``fedgate-agent
  import`` accepts (long or wide). It is imported into a temporary buffer (deleted
  afterwards; the agent's own buffer is not touched) and cut into windows on the
  ``[windows]`` grid of the agent configuration (tags, period_s, max_gap_s), one window
  ending at every grid point (``--stride`` to thin out), exactly as live scoring cuts them.

The model is ``<state_dir>/models/current.onnx`` (written by ``fedgate-agent run`` for each
certified global model) or ``--model FILE``; the scores come from onnxruntime, not torch.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np
import numpy.typing as npt
from click.core import ParameterSource

from fedgate_agent.cli_support import ExitCode, config_option, echo_json, fail
from fedgate_agent.config import AgentConfig, load_config
from fedgate_agent.data_cli import (
    layout_option,
    timestamp_column_option,
    timestamp_format_option,
    timezone_option,
)
from fedgate_agent.data_settings import window_spec
from fedgate_agent.errors import ConfigError, LocalDataError
from fedgate_agent.ingest.buffer import BufferSettings, IngestBuffer
from fedgate_agent.ingest.errors import IngestError
from fedgate_agent.ingest.historian import ColumnMapping, import_history
from fedgate_agent.local_dataset import read_npz_arrays
from fedgate_agent.scoring import (
    ScoringFailed,
    ScoringModel,
    ScoringModelMissing,
    ScoringModelUnusable,
    WindowShapeError,
    load_scoring_model,
    onnx_path,
    windows_over,
)
from fedgate_agent.state import read_status

__all__ = ["predict_command"]


def _read_npz(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64] | None]:
    arrays = read_npz_arrays(path, required=("x",), optional=("y",))
    x, y = arrays["x"], arrays.get("y")
    if x.dtype.kind != "f":
        raise LocalDataError(f"{path}: 'x' must hold floats, not {x.dtype}", path=path)
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise LocalDataError(
            f"{path}: 'x' holds {int(bad.sum())} NaN or infinite value(s), the first at index "
            f"{first}; only finite values can be scored",
            path=path,
        )
    if x.ndim == 0 or x.shape[0] == 0:
        raise LocalDataError(f"{path}: 'x' holds no windows; nothing to score", path=path)
    if y is not None and (y.dtype.kind not in "iu" or y.shape != x.shape[:1]):
        raise LocalDataError(f"{path}: 'y' must hold one integer label per window", path=path)
    return x.astype(np.float32), None if y is None else y.astype(np.int64)


def _windows_from_export(
    path: Path, config: AgentConfig, model: ScoringModel, mapping: ColumnMapping, stride: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float32]]:
    if not config.windows.tags:
        raise ConfigError(
            "scoring a historian export needs [windows] tags (the model's input tags, in "
            "order) and period_s in the agent configuration; or pass windows as .npz"
        )
    spec = window_spec(config, model.spec)
    with tempfile.TemporaryDirectory(prefix="fedgate-predict-") as scratch:
        settings = BufferSettings(path=Path(scratch) / "predict.db", max_samples=10**10)
        with IngestBuffer.open(settings) as buffer:
            report = import_history(path, buffer, mapping)
            if report.inserted == 0:
                raise LocalDataError(
                    f"{path}: no values imported ({report.rejected} rejected, tags seen: "
                    f"{report.tags[:12]}); check --layout and the column options",
                    path=path,
                )
            return windows_over(buffer, spec, stride=stride)


def _needed(config: AgentConfig | None) -> AgentConfig:
    if config is None:  # pragma: no cover - loaded whenever a path below needs it
        raise ConfigError("the agent configuration is needed here; pass --config")
    return config


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


@click.command("predict")
@config_option
@click.option(
    "--input",
    "input_file",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Windows (.npz with x[, y]) or a historian export (.csv, .csv.gz, .parquet).",
)
@click.option(
    "--model",
    "model_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="ONNX file to use. Default: <state_dir>/models/current.onnx.",
)
@click.option(
    "--stride",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Historian exports: grid steps between scored windows.",
)
@layout_option
@timestamp_column_option
@timestamp_format_option
@timezone_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def predict_command(
    config_path: Path,
    input_file: Path,
    model_file: Path | None,
    stride: int,
    layout: str,
    timestamp_column: str | None,
    timestamp_format: str,
    timezone: str | None,
    as_json: bool,
) -> None:
    """Score a file offline with the exported global model (onnxruntime, one thread).

    Prints one line per window: its end time (historian exports) or index (.npz), the
    predicted class, its probability and the anomaly score 1 − P(normal class), where the
    normal class is scoring.normal_class (default 0). With labels (.npz 'y') the accuracy.
    The running agent is not disturbed: its buffer is not read.

    \b
    Examples:
      fedgate-agent predict --input /var/lib/fedgate-agent/data/train.npz
      fedgate-agent predict --input line3-2026-11.csv --json > scores.json
      fedgate-agent predict --input windows.npz --model /tmp/current.onnx

    \b
    Exit codes:
      0 success            1 unexpected failure     2 bad command line
      3 config invalid     4 input file unreadable or does not fit the model
      7 no exported model yet (the agent has not adopted a global model) or unusable
    """
    config: AgentConfig | None = None
    is_npz = input_file.suffix.lower() == ".npz"
    source = click.get_current_context().get_parameter_source("config_path")
    config_given = source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    try:
        # Windows and a model file alone need no agent; a configuration that is there (or
        # named) still supplies scoring.normal_class.
        if model_file is None or not is_npz or config_given or config_path.exists():
            config = load_config(config_path, require_complete=False)
        if model_file is not None and not model_file.exists():
            raise ScoringModelMissing(f"{model_file}: no such file")
        path = model_file if model_file is not None else onnx_path(_needed(config).state_path)
        model = load_scoring_model(path)
        labels: npt.NDArray[np.int64] | None = None
        ends: npt.NDArray[np.float64] | None = None
        if is_npz:
            windows, labels = _read_npz(input_file)
        else:
            mapping = ColumnMapping(
                layout=layout,  # type: ignore[arg-type]  # validated by ColumnMapping
                timestamp_column=timestamp_column,
                timestamp_format=timestamp_format,  # type: ignore[arg-type]
                timezone=timezone,
            )
            ends, windows = _windows_from_export(
                input_file, _needed(config), model, mapping, stride
            )
        if len(windows) == 0:
            raise LocalDataError(
                f"{input_file}: no complete window of {model.spec.window} samples to score",
                path=input_file,
            )
        normal = config.scoring.normal_class if config is not None else 0
        predictions = model.score(
            windows,
            window_ends=None if ends is None else [float(e) for e in ends],
            normal_class=normal,
        )
    except (ScoringModelMissing, ScoringModelUnusable) as exc:
        fail(str(exc), ExitCode.NO_MODEL)
    except (LocalDataError, IngestError, WindowShapeError, ScoringFailed) as exc:
        fail(str(exc), ExitCode.DATA)
    except ConfigError as exc:
        fail(str(exc), ExitCode.CONFIG)
    if model_file is None and config is not None:
        try:
            adopted = read_status(config.state_path).model_round
        except OSError:  # an unreadable state directory: nothing to compare with
            adopted = None
        if adopted is not None and adopted > model.model_round:
            click.echo(
                f"warning: the agent adopted the model of round {adopted}, but {path} is "
                f"round {model.model_round}'s: its export is pending or failed "
                "(`fedgate-agent status`, scoring line)",
                err=True,
            )
    result: dict[str, Any] = {
        "input": str(input_file),
        "model": str(path),
        "model_digest": model.model_digest,
        "model_round": model.model_round,
        "windows": len(predictions),
        "class_counts": dict(sorted(Counter(p.predicted_class for p in predictions).items())),
        "accuracy": None,
        "predictions": predictions,
    }
    if labels is not None and len(labels):
        hits = sum(int(p.predicted_class == y) for p, y in zip(predictions, labels, strict=True))
        result["accuracy"] = round(hits / len(labels), 6)
    if as_json:
        echo_json(result)
        return
    _print_predictions(result)


def _print_predictions(result: dict[str, Any]) -> None:
    from fedgate_common.text_table import format_table

    rows = []
    for index, p in enumerate(result["predictions"]):
        where = _iso(p.window_end) if p.window_end is not None else index
        score = "-" if p.anomaly_score is None else f"{p.anomaly_score:.4f}"
        rows.append([where, p.predicted_class, f"{p.probability:.4f}", score])
    click.echo(format_table(["window", "class", "probability", "anomaly score"], rows))
    click.echo(
        f"{result['windows']} windows scored by model round {result['model_round']} "
        f"({result['model_digest'][:16]}); classes {result['class_counts']}"
    )
    if result["accuracy"] is not None:
        click.echo(f"accuracy against the file's labels: {result['accuracy']:.4f}")
