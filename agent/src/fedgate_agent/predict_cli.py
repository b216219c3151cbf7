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

import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import msgspec
import numpy as np
import numpy.typing as npt
from click.core import ParameterSource

from fedgate_agent.cli_support import ExitCode, config_option, fail
from fedgate_agent.config import AgentConfig, load_config
from fedgate_agent.data_cli import (
    import_progress_printer,
    layout_option,
    timestamp_column_option,
    timestamp_format_option,
    timezone_option,
)
from fedgate_agent.data_settings import window_spec
from fedgate_agent.errors import ConfigError, LocalDataError
from fedgate_agent.ingest.buffer import BufferSettings, IngestBuffer
from fedgate_agent.ingest.errors import IngestError
from fedgate_agent.ingest.historian import ColumnMapping, detect_format, import_history
from fedgate_agent.local_dataset import read_npz_arrays
from fedgate_agent.scoring import (
    GridWindows,
    Prediction,
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
    return x.astype(np.float32, copy=False), None if y is None else y.astype(np.int64)


def _check_export_suffix(path: Path) -> None:
    try:
        detect_format(path)
    except IngestError:
        raise LocalDataError(
            f"{path}: not a windows file (.npz) nor a historian export (.csv, .csv.gz, .tsv, "
            ".txt, .parquet) by its name; rename it to the suffix of its format",
            path=path,
        ) from None


def _windows_from_export(
    path: Path,
    config: AgentConfig,
    model: ScoringModel,
    mapping: ColumnMapping,
    stride: int,
    progress: bool,
) -> GridWindows:
    if not config.windows.tags:
        raise ConfigError(
            "scoring a historian export needs [windows] tags (the model's input tags, in "
            "order) and period_s in the agent configuration; or pass windows as .npz"
        )
    spec = window_spec(config, model.spec)
    with tempfile.TemporaryDirectory(prefix="fedgate-predict-") as scratch:
        settings = BufferSettings(path=Path(scratch) / "predict.db", max_samples=10**10)
        with IngestBuffer.open(settings) as buffer:
            report = import_history(
                path, buffer, mapping, progress=import_progress_printer(progress)
            )
            if progress:
                click.echo(err=True)
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
    The running agent is not disturbed: its buffer is not read. Windows are scored 4,096
    at a time; on a terminal, progress goes to stderr.

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
    show_progress = not as_json and sys.stderr.isatty()
    try:
        if not is_npz:
            _check_export_suffix(input_file)
        # Windows and a model file alone need no agent; a configuration that is there (or
        # named) still supplies scoring.normal_class.
        if model_file is None or not is_npz or config_given or config_path.exists():
            config = load_config(config_path, require_complete=False)
        if model_file is not None and not model_file.exists():
            raise ScoringModelMissing(f"{model_file}: no such file")
        path = model_file if model_file is not None else onnx_path(_needed(config).state_path)
        model = load_scoring_model(path)
        if is_npz:
            x, labels = _read_npz(input_file)
            model.check_shape(x.shape)  # the file's shape, before it is cut into slices
            scored = _Scored(x.__getitem__, len(x), None, labels)
        else:
            mapping = ColumnMapping(
                layout=layout,  # type: ignore[arg-type]  # validated by ColumnMapping
                timestamp_column=timestamp_column,
                timestamp_format=timestamp_format,  # type: ignore[arg-type]
                timezone=timezone,
            )
            grid = _windows_from_export(
                input_file, _needed(config), model, mapping, stride, show_progress
            )
            scored = _Scored(lambda rows: grid.windows(rows.start, rows.stop), len(grid), grid.ends)
        if scored.count == 0:
            raise LocalDataError(
                f"{input_file}: no complete window of {model.spec.window} samples to score",
                path=input_file,
            )
        logits = _logits(model, scored, show_progress)
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
    normal = config.scoring.normal_class if config is not None else 0
    header = {
        "input": str(input_file),
        "model": str(path),
        "model_digest": model.model_digest,
        "model_round": model.model_round,
    }
    write = _write_json if as_json else _write_text
    write(header, _predictions(model, logits, scored.ends, normal), scored)


# Windows scored per onnxruntime call, and predictions built and written per slice: a long
# file's windows are cut from its grid (or its .npz array) a slice at a time, and only the
# logits of every window are kept until the end (n_classes floats each).
SCORE_BATCH = 4096


@dataclass(frozen=True)
class _Scored:
    """What is scored: ``count`` windows, cut a slice at a time by ``windows``; their end
    times (historian exports) and labels (.npz with y), when the input has them."""

    windows: Callable[[slice], npt.NDArray[np.float32]]
    count: int
    ends: npt.NDArray[np.float64] | None
    labels: npt.NDArray[np.int64] | None = None


def _slices(count: int) -> Iterator[slice]:
    for start in range(0, count, SCORE_BATCH):
        yield slice(start, min(count, start + SCORE_BATCH))


def _logits(model: ScoringModel, scored: _Scored, progress: bool) -> npt.NDArray[np.float32]:
    logits = np.empty((scored.count, model.spec.n_classes), dtype=np.float32)
    began = time.monotonic()
    for rows in _slices(scored.count):
        try:
            logits[rows] = model.logits(scored.windows(rows))
        except ScoringFailed as exc:
            if scored.ends is None:
                where = f"windows {rows.start:,}–{rows.stop - 1:,}"
            else:
                first, last = scored.ends[rows.start], scored.ends[rows.stop - 1]
                where = f"windows ending {_iso(float(first))} – {_iso(float(last))}"
            raise ScoringFailed(f"{where}: {exc}") from None
        if progress:
            click.echo(
                f"\rscored {rows.stop:,} of {scored.count:,} windows "
                f"({time.monotonic() - began:.1f} s)",
                err=True,
                nl=False,
            )
    if progress:
        click.echo(err=True)
    return logits


def _predictions(
    model: ScoringModel,
    logits: npt.NDArray[np.float32],
    ends: npt.NDArray[np.float64] | None,
    normal_class: int,
) -> Iterator[list[Prediction]]:
    for rows in _slices(len(logits)):
        yield model.predictions(
            logits[rows],
            window_ends=None if ends is None else [float(e) for e in ends[rows]],
            normal_class=normal_class,
        )


class _Tally:
    """Class counts and label hits, kept while the predictions are written."""

    def __init__(self, labels: npt.NDArray[np.int64] | None) -> None:
        self.labels = labels
        self.counts: Counter[int] = Counter()
        self.hits = 0
        self.seen = 0

    def add(self, batch: list[Prediction]) -> None:
        classes = [p.predicted_class for p in batch]
        self.counts.update(classes)
        if self.labels is not None:
            expected = self.labels[self.seen : self.seen + len(batch)]
            self.hits += int((np.asarray(classes) == expected).sum())
        self.seen += len(batch)

    def summary(self) -> dict[str, Any]:
        accuracy = None
        if self.labels is not None and len(self.labels):
            accuracy = round(self.hits / len(self.labels), 6)
        return {
            "windows": self.seen,
            "class_counts": dict(sorted(self.counts.items())),
            "accuracy": accuracy,
        }


def _write_json(
    header: dict[str, Any], batches: Iterator[list[Prediction]], scored: _Scored
) -> None:
    """One JSON object, written as it goes: the header's fields, ``predictions`` (one
    compact object per line), then ``windows``, ``class_counts`` and ``accuracy``."""
    fields = "".join(
        f"  {json.dumps(key)}: {json.dumps(value)},\n" for key, value in header.items()
    )
    click.echo("{\n" + fields + '  "predictions": [', nl=False)
    tally = _Tally(scored.labels)
    for batch in batches:
        lines = ",\n    ".join(msgspec.json.encode(p).decode() for p in batch)
        click.echo((",\n    " if tally.seen else "\n    ") + lines, nl=False)
        tally.add(batch)
    summary = json.dumps(tally.summary(), indent=2)
    click.echo("\n  ],\n" + summary[2:])  # the summary's fields close the object


def _write_text(
    header: dict[str, Any], batches: Iterator[list[Prediction]], scored: _Scored
) -> None:
    where_width = 27 if scored.ends is not None else max(6, len(str(scored.count - 1)))
    widths = (where_width, 5, 11, 13)
    titles = ("window", "class", "probability", "anomaly score")
    click.echo(
        "  ".join(
            t.ljust(w) if i == 0 and scored.ends is not None else t.rjust(w)
            for i, (t, w) in enumerate(zip(titles, widths, strict=True))
        ).rstrip()
    )
    click.echo("  ".join("-" * w for w in widths))
    tally = _Tally(scored.labels)
    for batch in batches:
        lines = []
        for index, p in enumerate(batch, start=tally.seen):
            if p.window_end is None:
                where = str(index).rjust(widths[0])
            else:
                where = _iso(p.window_end).ljust(widths[0])
            score = "-" if p.anomaly_score is None else f"{p.anomaly_score:.4f}"
            lines.append(
                f"{where}  {p.predicted_class:>{widths[1]}}  "
                f"{p.probability:>{widths[2]}.4f}  {score:>{widths[3]}}"
            )
        tally.add(batch)
        click.echo("\n".join(lines))
    summary = tally.summary()
    click.echo(
        f"{summary['windows']} windows scored by model round {header['model_round']} "
        f"({header['model_digest'][:16]}); classes {summary['class_counts']}"
    )
    if summary["accuracy"] is not None:
        click.echo(f"accuracy against the file's labels: {summary['accuracy']:.4f}")
