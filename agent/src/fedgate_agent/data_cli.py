"""``fedgate-agent import`` (historian exports into the buffer) and ``fedgate-agent windows``
(what training would cut from the buffer now)."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
from fedgate_common.instance_lock import AlreadyRunning, StateDirUnusable, single_instance
from fedgate_common.model_spec import ModelSpec
from fedgate_common.text_table import format_table

from fedgate_agent.cli_support import ExitCode, config_option, echo_json, fail, guard
from fedgate_agent.config import load_config
from fedgate_agent.data_settings import buffer_settings, window_spec
from fedgate_agent.errors import ConfigError
from fedgate_agent.federation_trust import read_pinned
from fedgate_agent.ingest.buffer import IngestBuffer
from fedgate_agent.ingest.historian import ColumnMapping, ImportProgress, import_history
from fedgate_agent.ingest.windows import build_windows
from fedgate_agent.state import RUN_LOCK

__all__ = ["import_command", "import_progress_printer", "windows_command"]


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        old, sep, new = value.partition("=")
        if not sep or not old or not new:
            fail(f"{option} {value!r} is not OLD=NEW", ExitCode.USAGE)
        pairs[old] = new
    return pairs


def import_progress_printer(enabled: bool) -> Callable[[ImportProgress], None] | None:
    """What ``import`` and ``predict`` show on stderr while an export is imported (one line,
    rewritten in place), or None when not ``enabled`` (not a terminal, or ``--json``)."""

    def show(progress: ImportProgress) -> None:
        share = "" if progress.fraction is None else f"{progress.fraction:6.1%} "
        click.echo(
            f"\r{share}{progress.rows_read:,} rows, {progress.inserted:,} new, "
            f"{progress.duplicates:,} already there, {progress.rejected:,} rejected "
            f"({progress.seconds:.1f} s)",
            err=True,
            nl=False,
        )

    return show if enabled else None


# How a historian export's columns are read: `import` and `predict` take the same options.
layout_option = click.option(
    "--layout",
    type=click.Choice(["auto", "long", "wide"]),
    default="auto",
    show_default=True,
    help="long: timestamp, tag, value columns; wide: timestamp and one column per tag.",
)
timestamp_column_option = click.option(
    "--timestamp-column", default=None, help="Default: timestamp/time/ts/…."
)
timestamp_format_option = click.option(
    "--timestamp-format",
    type=click.Choice(["auto", "iso", "epoch_s", "epoch_ms", "epoch_us"]),
    default="auto",
    show_default=True,
)
timezone_option = click.option(
    "--timezone", default=None, help="IANA zone of naive timestamps (default UTC)."
)


@click.command("import")
@config_option
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@layout_option
@timestamp_column_option
@click.option("--tag-column", default=None, help="Long layout. Default: tag/TagName/name/….")
@click.option("--value-column", default=None, help="Long layout. Default: value/Value/….")
@click.option("--source-column", default=None, help="Long layout: a column naming the source.")
@timestamp_format_option
@timezone_option
@click.option("--rename", multiple=True, metavar="OLD=NEW", help="Rename a tag (repeatable).")
@click.option("--tag", "tags", multiple=True, help="Import only this tag (repeatable).")
@click.option(
    "--slash-as",
    default=None,
    metavar="TEXT",
    help="Replace '/' in tag names by TEXT (e.g. '.'), for historians that name tags by "
    "path; without it such tags are refused (bad_tag).",
)
@click.option("--delimiter", default=None, help="CSV separator (default: guessed).")
@click.option(
    "--format",
    "file_format",
    type=click.Choice(["csv", "parquet"]),
    default=None,
    help="Default: by suffix (.csv, .csv.gz, .parquet).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@guard
def import_command(
    config_path: Path,
    file: Path,
    layout: str,
    timestamp_column: str | None,
    tag_column: str | None,
    value_column: str | None,
    source_column: str | None,
    timestamp_format: str,
    timezone: str | None,
    rename: tuple[str, ...],
    tags: tuple[str, ...],
    slash_as: str | None,
    delimiter: str | None,
    file_format: str | None,
    as_json: bool,
) -> None:
    """Import a historian export (CSV or Parquet) into the agent's buffer.

    Every value is stored once per (tag, timestamp): running the same import again adds
    nothing, and an interrupted import can simply be run again. Rows that do not parse
    are counted and listed, not fatal. Progress goes to stderr. The agent may be running.

    \b
    Examples:
      fedgate-agent import line3-2026-10.csv
      fedgate-agent import export.parquet --layout wide --timestamp-column Time \\
          --rename "FIC101.PV=feed_flow" --tag feed_flow --json
      fedgate-agent import ignition-line3.csv --slash-as .   # Line3/FIC101 → Line3.FIC101
    """
    cfg = load_config(config_path, require_complete=False)
    mapping = ColumnMapping(
        layout=layout,  # type: ignore[arg-type]  # validated by ColumnMapping
        timestamp_column=timestamp_column,
        tag_column=tag_column,
        value_column=value_column,
        source_column=source_column,
        timestamp_format=timestamp_format,  # type: ignore[arg-type]
        timezone=timezone,
        rename=_pairs(rename, "--rename"),
        tags=tags or None,
        delimiter=delimiter,
        slash_as=slash_as,
    )
    # Beside a running agent, its log is not checked: the agent checked it at its start.
    running = _agent_running(cfg.state_path)
    with IngestBuffer.open(buffer_settings(cfg), check_log=not running) as buffer:
        report = import_history(
            file,
            buffer,
            mapping,
            progress=import_progress_printer(not as_json and sys.stderr.isatty()),
            file_format=file_format,
        )
    if as_json:
        echo_json(report)
        return
    click.echo(f"imported {file}", err=False)
    click.echo(
        f"  rows {report.rows_read:,}: {report.inserted:,} samples new, "
        f"{report.duplicates:,} already in the buffer, {report.rejected:,} rejected"
    )
    if report.tags:
        click.echo(
            f"  tags ({len(report.tags)}): {', '.join(report.tags[:12])}"
            + (" …" if len(report.tags) > 12 else "")
        )
    for example in report.rejected_examples:
        column = example.column if example.column.isprintable() else repr(example.column)
        click.echo(f"  line {example.line} {column}: {example.reason} ({example.text!r})")
    if slash_as is None and any(
        e.reason == "bad_tag" and "/" in e.text + e.column for e in report.rejected_examples
    ):
        click.echo("  tag names with '/' are refused: run again with --slash-as . (or --rename)")


@click.command("windows")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@guard
def windows_command(config_path: Path, as_json: bool) -> None:
    """Show the training windows the buffer gives now, per class.

    Uses [windows] and the model spec of the pinned federation manifest; run it after an
    import or while live data flows to see whether training will find enough windows.
    Reads the buffer only (the agent may be running).

    \b
    Example:
      fedgate-agent windows --json
    """
    cfg = load_config(config_path, require_complete=False)
    spec = _current_spec(cfg.state_path)
    with IngestBuffer.open_read_only(cfg.buffer_path) as buffer:
        data = build_windows(buffer, window_spec(cfg, spec))
    train = Counter(int(y) for y in data.train.y)
    test = Counter(int(y) for y in data.test.y)
    result = {
        "train_windows": len(data.train),
        "test_windows": len(data.test),
        "grid_start": data.grid_start,
        "grid_end": data.grid_end,
        "dropped": dict(data.dropped_windows),
        "train_per_class": dict(sorted(train.items())),
        "test_per_class": dict(sorted(test.items())),
        "feature_means": np.round(data.train.x.mean(axis=(0, 1)), 4).tolist()
        if len(data.train)
        else [],
    }
    if as_json:
        echo_json(result)
        return
    click.echo(f"train windows {len(data.train):,}, test windows {len(data.test):,}")
    rows = [[k, train.get(k, 0), test.get(k, 0)] for k in sorted(set(train) | set(test))]
    click.echo(format_table(["class", "train", "test"], rows))
    if result["dropped"]:
        click.echo("dropped " + ", ".join(f"{k}={v}" for k, v in result["dropped"].items()))


def _current_spec(state_dir: Path) -> ModelSpec:
    """The model spec of the pinned federation manifest (every global model has it)."""
    signed = read_pinned(state_dir)
    if signed is None:
        raise ConfigError(
            "no federation manifest is pinned, so the model's window and features are "
            "unknown; run `fedgate-agent federation pin FILE` first"
        )
    return signed.manifest.model_spec


def _agent_running(state_dir: Path) -> bool:
    """Whether ``fedgate-agent run`` holds its lock on ``state_dir`` now."""
    try:
        with single_instance(state_dir, RUN_LOCK):
            return False
    except AlreadyRunning:
        return True
    except StateDirUnusable:
        return False  # no agent could run there either
