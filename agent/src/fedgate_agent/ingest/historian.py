"""``fedgate-agent import``: historian exports (CSV, Parquet) into the ingest buffer.

Two layouts are understood (:class:`ColumnMapping`):

- **long**: one value per row — a timestamp column, a tag column, a value column, and
  optionally a source column (``plant-a``, a historian server's name);
- **wide**: one row per time — a timestamp column and one column per tag (empty cells
  are normal in sparse exports and are skipped, not rejected).

Every value becomes a :class:`~fedgate_agent.ingest.samples.Sample` with
``source = "import:<tag>"`` (``"import:<source>/<tag>"`` with a source column) and
``seq`` = its timestamp in integer microseconds since the epoch. The buffer keeps one
sample per ``(source, seq)``, so importing the same file twice stores nothing the second
time (the report counts them as duplicates), and an import that failed half-way can simply
be run again.

Rows that do not parse (bad timestamp, non-numeric, NaN/Inf or empty value, empty tag, a
tag name with a control character or ``/``, a CSV line whose quote is not closed on it) are
counted and the first few are listed with line numbers in the :class:`ImportReport`; they
never stop the import. A file that cannot be read, or a mapped column that is not there,
raises :class:`~fedgate_agent.ingest.errors.ImportFailed` naming the columns found.

Files are streamed: CSV with the :mod:`csv` module (pandas stays off the gateway), Parquet
batch by batch with pyarrow (an optional dependency, imported only for Parquet files).
Samples are inserted in chunks, one durable transaction each.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import math
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fedgate_agent.ingest.errors import ColumnMappingInvalid, ImportFailed
from fedgate_agent.ingest.samples import MAX_SEQ, Sample, tag_problem, too_far_ahead

__all__ = [
    "ColumnMapping",
    "CountingSink",
    "FileFormat",
    "ImportProgress",
    "ImportReport",
    "InsertCounts",
    "Layout",
    "RejectedValue",
    "TimestampFormat",
    "import_history",
]

#: How many rejected values an :class:`ImportReport` lists (all are counted).
MAX_REJECTED_EXAMPLES = 10

# Header names recognised when a column is not named in the mapping (case-insensitive).
TIMESTAMP_NAMES = ("timestamp", "time", "ts", "datetime", "date_time", "time_stamp", "date")
TAG_NAMES = ("tag", "tagname", "tag_name", "name", "signal", "point", "pointname", "sensor")
VALUE_NAMES = ("value", "val", "reading", "pv")
SOURCE_NAMES = ("source",)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class Layout(StrEnum):
    AUTO = "auto"  # long when a tag and a value column are found, wide otherwise
    LONG = "long"
    WIDE = "wide"


class TimestampFormat(StrEnum):
    AUTO = "auto"  # numbers are epoch (unit by magnitude), text is ISO 8601
    ISO = "iso"
    EPOCH_S = "epoch_s"
    EPOCH_MS = "epoch_ms"
    EPOCH_US = "epoch_us"


class FileFormat(StrEnum):
    CSV = "csv"
    PARQUET = "parquet"


@dataclass(frozen=True)
class ColumnMapping:
    """How a historian export's columns map onto samples.

    ``layout``: ``long`` (timestamp, tag, value [, source] columns), ``wide`` (timestamp
    plus one column per tag) or ``auto`` (long when tag and value columns are found).
    ``timestamp_column`` / ``tag_column`` / ``value_column`` / ``source_column``: header
    names; ``None`` finds common names case-insensitively (``timestamp``/``time``/``ts``,
    ``tag``/``TagName``/``name``, ``value``/``Value``, ``source``).
    ``timestamp_format``: ``auto`` reads numbers as epoch seconds, milliseconds or
    microseconds by magnitude (below 1e11 seconds, below 1e14 milliseconds, else
    microseconds) and text as ISO 8601, or force one of ``iso``, ``epoch_s``,
    ``epoch_ms``, ``epoch_us``. ``timezone``: IANA name for naive ISO timestamps (default
    UTC). ``rename``: export tag name → stored tag name. ``tags``: import only these tags
    (matched against the export's name or the renamed one); in wide layout every listed
    tag must be a column. ``delimiter``: CSV field separator; ``None`` picks the most
    frequent of ``, ; TAB |`` in the header line. ``slash_as``: replace every ``/`` in the
    (renamed) tag names by this text, for historians that name tags by path (Ignition's
    ``Line3/FIC101``); a file in which two export tags become one stored tag only through
    it is refused before anything is stored, while ``rename`` may merge tags on purpose.
    """

    layout: Layout = Layout.AUTO
    timestamp_column: str | None = None
    tag_column: str | None = None
    value_column: str | None = None
    source_column: str | None = None
    timestamp_format: TimestampFormat = TimestampFormat.AUTO
    timezone: str | None = None
    rename: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] | None = None
    delimiter: str | None = None
    slash_as: str | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        try:
            object.__setattr__(self, "layout", Layout(self.layout))
        except ValueError:
            problems.append(f"layout {self.layout!r} is not one of auto, long, wide")
        try:
            object.__setattr__(self, "timestamp_format", TimestampFormat(self.timestamp_format))
        except ValueError:
            problems.append(
                f"timestamp_format {self.timestamp_format!r} is not one of "
                + ", ".join(f.value for f in TimestampFormat)
            )
        if self.timezone is not None:
            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError):
                problems.append(f"timezone {self.timezone!r} is not an IANA zone name")
        object.__setattr__(self, "rename", dict(self.rename))
        if any(not str(k) or not str(v) for k, v in self.rename.items()):
            problems.append("rename maps from or to an empty tag name")
        if self.tags is not None:
            object.__setattr__(self, "tags", tuple(self.tags))
            if not self.tags:
                problems.append("tags is an empty list; leave it out to import every tag")
        if self.delimiter is not None and len(self.delimiter) != 1:
            problems.append(f"delimiter {self.delimiter!r} must be one character")
        if self.slash_as is not None and (why := tag_problem(self.slash_as)) is not None:
            problems.append(f"slash_as {self.slash_as!r}: as part of a tag name it {why}")
        for new in self.rename.values():
            stored = str(new) if self.slash_as is None else str(new).replace("/", self.slash_as)
            if stored and (why := tag_problem(stored)) is not None:
                problems.append(f"rename to {new!r}: the tag name {why}")
        if problems:
            raise ColumnMappingInvalid(
                "invalid column mapping: " + "; ".join(problems), problems=problems
            )

    def tzinfo(self) -> tzinfo:
        return UTC if self.timezone is None else ZoneInfo(self.timezone)


@dataclass(frozen=True)
class RejectedValue:
    """One value not imported: ``line`` is the CSV line number (the header is line 1) or
    the 1-based Parquet row; ``reason`` is a stable key (``bad_timestamp``,
    ``before_epoch``, ``ts_in_future``, ``not_numeric``, ``not_finite``, ``empty``,
    ``empty_tag``, ``bad_tag``: a control character or ``/`` in the stored tag name
    (``slash_as`` replaces ``/``),
    ``unmatched_quote``: a CSV line whose quoted field does not close on it)."""

    line: int
    column: str
    reason: str
    text: str


@dataclass(frozen=True)
class ImportProgress:
    """Reported after every chunk. ``fraction``: share of the file read, when known."""

    rows_read: int
    inserted: int
    duplicates: int
    rejected: int
    fraction: float | None
    seconds: float


@dataclass(frozen=True)
class ImportReport:
    """What an import did.

    ``rows_read``: data rows (header excluded). ``inserted`` / ``duplicates``: samples newly
    stored / already in the buffer. ``rejected``: values not imported (long layout: rows;
    wide: cells), the first :data:`MAX_REJECTED_EXAMPLES` in ``rejected_examples``.
    ``skipped_empty``: empty wide-layout cells. ``filtered_out``: values of tags left out
    by ``tags``. ``rejected_full``: samples the buffer refused because it is full.
    ``tags``: stored tag names seen, sorted; ``tags_not_found``: listed ``tags`` never
    seen. ``first_ts`` / ``last_ts``: time range of the imported values (seconds).
    """

    path: Path
    rows_read: int
    inserted: int
    duplicates: int
    rejected: int
    rejected_examples: tuple[RejectedValue, ...]
    tags: list[str]
    first_ts: float | None
    last_ts: float | None
    seconds: float
    skipped_empty: int = 0
    filtered_out: int = 0
    rejected_full: int = 0
    tags_not_found: list[str] = field(default_factory=list)


class InsertCounts(Protocol):
    """The part of :class:`~fedgate_agent.ingest.buffer.InsertResult` an import reports."""

    @property
    def inserted(self) -> int: ...

    @property
    def duplicates(self) -> int: ...

    @property
    def rejected_full(self) -> int: ...


class CountingSink(Protocol):
    """A :class:`~fedgate_agent.ingest.samples.SampleSink` that says what it stored."""

    def insert(self, samples: Sequence[Sample]) -> InsertCounts: ...


class _Rejected(Exception):
    """A value that does not parse; ``reason`` is the report's key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- values ------------------------------------------------------------------------------


_MICROS_PER_UNIT = {
    TimestampFormat.EPOCH_S: 1e6,
    TimestampFormat.EPOCH_MS: 1e3,
    TimestampFormat.EPOCH_US: 1.0,
}


def _epoch_micros(number: float, unit: TimestampFormat) -> int:
    if not math.isfinite(number):
        raise _Rejected("bad_timestamp")
    if unit is TimestampFormat.AUTO:
        magnitude = abs(number)
        scale = 1e6 if magnitude < 1e11 else 1e3 if magnitude < 1e14 else 1.0
    else:
        scale = _MICROS_PER_UNIT[unit]
    return round(number * scale)


def _datetime_micros(moment: datetime, zone: tzinfo) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return (moment - _EPOCH) // _MICROSECOND


def parse_timestamp(raw: object, fmt: TimestampFormat, zone: tzinfo) -> int:
    """Microseconds since the epoch for a timestamp cell (text, number or datetime)."""
    if type(raw) is str:  # CSV cells: the common case first
        text = raw.strip()
        if not text:
            raise _Rejected("bad_timestamp")
        micros = _parse_timestamp_text(text, fmt, zone)
    elif raw is None:
        raise _Rejected("bad_timestamp")
    elif isinstance(raw, datetime):
        micros = _datetime_micros(raw, zone)
    elif isinstance(raw, int | float | Decimal) and not isinstance(raw, bool):
        if fmt is TimestampFormat.ISO:
            raise _Rejected("bad_timestamp")
        micros = _epoch_micros(float(raw), fmt)
    else:
        text = str(raw).strip()
        if not text:
            raise _Rejected("bad_timestamp")
        micros = _parse_timestamp_text(text, fmt, zone)
    if micros < 0:
        raise _Rejected("before_epoch")
    if micros > MAX_SEQ:
        raise _Rejected("bad_timestamp")
    return micros


def _parse_timestamp_text(text: str, fmt: TimestampFormat, zone: tzinfo) -> int:
    if fmt is not TimestampFormat.ISO:
        try:
            number = float(text)
        except ValueError:
            if fmt is not TimestampFormat.AUTO:
                raise _Rejected("bad_timestamp") from None
        else:
            return _epoch_micros(number, fmt)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _Rejected("bad_timestamp") from None
    return _datetime_micros(moment, zone)


def parse_value(raw: object) -> float:
    """A finite float for a value cell; booleans are 0.0 / 1.0."""
    if type(raw) is str:  # CSV cells: the common case first
        try:
            number = float(raw)
        except ValueError:
            return _parse_value_text(raw)
        if not math.isfinite(number):
            raise _Rejected("not_finite")
        return number
    if raw is None:
        raise _Rejected("empty")
    if isinstance(raw, bool):
        return 1.0 if raw else 0.0
    if isinstance(raw, int | float | Decimal):
        try:
            number = float(raw)
        except OverflowError:
            raise _Rejected("not_finite") from None
    else:
        return _parse_value_text(str(raw))
    if not math.isfinite(number):
        raise _Rejected("not_finite")
    return number


def _parse_value_text(raw: str) -> float:
    text = raw.strip()
    if not text:
        raise _Rejected("empty")
    lowered = text.lower()
    if lowered in ("true", "false"):
        return 1.0 if lowered == "true" else 0.0
    try:
        number = float(text)
    except ValueError:
        raise _Rejected("not_numeric") from None
    if not math.isfinite(number):
        raise _Rejected("not_finite")
    return number


# --- columns -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Columns:
    """Resolved positions: ``wide`` is (position, export tag name, stored tag name)."""

    timestamp: int
    tag: int | None
    value: int | None
    source: int | None
    wide: tuple[tuple[int, str, str], ...]

    @property
    def names_needed(self) -> list[int]:
        positions = [self.timestamp, self.tag, self.value, self.source]
        positions += [p for p, _, _ in self.wide]
        return sorted({p for p in positions if p is not None})


def _find(
    header: Sequence[str],
    explicit: str | None,
    candidates: Sequence[str],
    *,
    role: str,
    path: Path,
) -> int | None:
    if explicit is not None:
        if explicit in header:
            return header.index(explicit)
        folded = [h.strip().casefold() for h in header]
        if explicit.strip().casefold() in folded:
            return folded.index(explicit.strip().casefold())
        raise ImportFailed(
            f"{path}: the {role} column {explicit!r} is not in the file; "
            f"columns found: {list(header)}",
            path=path,
        )
    folded = [h.strip().casefold() for h in header]
    for name in candidates:
        if name in folded:
            return folded.index(name)
    return None


def _stored_tag(mapping: ColumnMapping, tag: str) -> str | None:
    """The tag to store for export tag ``tag``, or ``None`` when ``tags`` leaves it out."""
    renamed = mapping.rename.get(tag, tag)
    stored = renamed if mapping.slash_as is None else renamed.replace("/", mapping.slash_as)
    if mapping.tags is not None and not {tag, renamed, stored} & set(mapping.tags):
        return None
    return stored


def _refuse_slash_collisions(
    export_tags: Iterable[str], mapping: ColumnMapping, path: Path, *, what: str
) -> None:
    """Refuse the file when two export tags become one stored tag only through ``slash_as``
    (``A/B`` and ``A.B`` with ``slash_as = "."``); ``rename`` may merge tags on purpose.

    The whole file is checked before anything is stored, so which tag wins never depends
    on the order of the rows.
    """
    if mapping.slash_as is None:
        return
    renamed_of: dict[str, str] = {}  # stored tag → the renamed export tag it comes from
    for tag in sorted(export_tags):  # the same message whatever the rows' order
        stored = _stored_tag(mapping, tag)
        if stored is None:
            continue
        renamed = mapping.rename.get(tag, tag)
        first = renamed_of.setdefault(stored, renamed)
        if first != renamed:
            raise ImportFailed(
                f"{path}: {what} {first!r} and {renamed!r} would both be stored as tag "
                f"{stored!r} with slash_as {mapping.slash_as!r}; pick another slash_as or "
                "rename one of them; nothing was imported",
                path=path,
            )


def _resolve_columns(header: Sequence[str], mapping: ColumnMapping, path: Path) -> _Columns:
    header = [str(h) for h in header]
    timestamp = _find(
        header, mapping.timestamp_column, TIMESTAMP_NAMES, role="timestamp", path=path
    )
    if timestamp is None:
        raise ImportFailed(
            f"{path}: no timestamp column (looked for {list(TIMESTAMP_NAMES)}); name it with "
            f"timestamp_column; columns found: {header}",
            path=path,
        )
    source = _find(header, mapping.source_column, SOURCE_NAMES, role="source", path=path)
    layout = mapping.layout
    tag = value = None
    if layout is not Layout.WIDE:
        tag = _find(header, mapping.tag_column, TAG_NAMES, role="tag", path=path)
        value = _find(header, mapping.value_column, VALUE_NAMES, role="value", path=path)
        if layout is Layout.AUTO:
            layout = Layout.LONG if tag is not None and value is not None else Layout.WIDE
        elif tag is None or value is None:
            raise ImportFailed(
                f"{path}: long layout needs a tag and a value column (looked for "
                f"{list(TAG_NAMES)} and {list(VALUE_NAMES)}); name them with tag_column / "
                f"value_column; columns found: {header}",
                path=path,
            )
    if layout is Layout.LONG:
        return _Columns(timestamp=timestamp, tag=tag, value=value, source=source, wide=())

    reserved = {timestamp, source}
    wide: list[tuple[int, str, str]] = []
    for position, name in enumerate(header):
        if position in reserved or not name.strip():
            continue
        stored = _stored_tag(mapping, name)
        if stored is not None:
            wide.append((position, name, stored))
    _refuse_slash_collisions((name for _, name, _ in wide), mapping, path, what="columns")
    if mapping.tags is not None:
        seen = {n for _, n, _ in wide} | {s for _, _, s in wide}
        seen |= {mapping.rename.get(n, n) for _, n, _ in wide}
        absent = [t for t in mapping.tags if t not in seen]
        if absent:
            raise ImportFailed(
                f"{path}: tags {absent} are not columns of this wide export; "
                f"columns found: {header}",
                path=path,
            )
    if not wide:
        raise ImportFailed(
            f"{path}: no tag columns besides the timestamp; columns found: {header}",
            path=path,
        )
    return _Columns(timestamp=timestamp, tag=None, value=None, source=source, wide=tuple(wide))


# --- the import loop ---------------------------------------------------------------------


class _Importer:
    """Turns rows into samples, inserts them in chunks and keeps the report's counts."""

    def __init__(
        self,
        *,
        path: Path,
        sink: CountingSink,
        mapping: ColumnMapping,
        columns: _Columns,
        header: Sequence[str],
        chunk_rows: int,
        progress: Callable[[ImportProgress], None] | None,
    ) -> None:
        self.path = path
        self.sink = sink
        self.mapping = mapping
        self.columns = columns
        self.header = [str(h) for h in header]
        self.chunk_rows = chunk_rows
        self.progress = progress
        self.zone = mapping.tzinfo()
        self.started = time.monotonic()
        self.pending: list[Sample] = []
        self.rows_read = 0
        self.inserted = 0
        self.duplicates = 0
        self.rejected_full = 0
        self.rejected = 0
        self.examples: list[RejectedValue] = []
        self.skipped_empty = 0
        self.filtered_out = 0
        self.tags_seen: set[str] = set()
        self.export_tags_seen: set[str] = set()
        self.first_us = MAX_SEQ + 1  # none yet
        self.last_us = -1
        self._stored_tags: dict[str, str | None] = {}
        #: Stored tag names refused (:func:`tag_problem`): their values are ``bad_tag``.
        self._bad_tags = {stored for _, _, stored in columns.wide if tag_problem(stored)}
        # Tag and value positions of the long layout (unused, -1, in the wide layout).
        self._long_positions = (
            -1 if columns.tag is None else columns.tag,
            -1 if columns.value is None else columns.value,
        )
        self._sources: dict[tuple[str, str], str] = {}

    def refuse_line(self, line: int, column: int, reason: str, text: str) -> None:
        """A line that is no row (a quote left open on it): one rejected value."""
        self.rows_read += 1
        self.reject(line, min(column, len(self.header) - 1), reason, text.rstrip("\r\n"))

    def reject(self, line: int, column: int, reason: str, raw: object, count: int = 1) -> None:
        self.rejected += count
        if len(self.examples) < MAX_REJECTED_EXAMPLES:
            text = "" if raw is None else str(raw)
            self.examples.append(
                RejectedValue(line=line, column=self.header[column], reason=reason, text=text[:80])
            )

    def _source(self, origin: str, tag: str) -> str:
        key = (origin, tag)
        source = self._sources.get(key)
        if source is None:
            source = f"import:{origin}/{tag}" if origin else f"import:{tag}"
            self._sources[key] = source
        return source

    def _add(self, micros: int, origin: str, tag: str, value: float) -> None:
        self.pending.append(
            Sample(
                source=self._source(origin, tag), seq=micros, tag=tag, ts=micros / 1e6, value=value
            )
        )
        self.tags_seen.add(tag)
        if micros < self.first_us:
            self.first_us = micros
        if micros > self.last_us:
            self.last_us = micros

    def row(self, line: int, cells: Sequence[object], *, micros_given: bool = False) -> None:
        """One data row. ``micros_given``: the timestamp cell holds exact microseconds
        already (Parquet timestamp columns, converted by pyarrow) or ``None``."""
        self.rows_read += 1
        origin = ""
        if self.columns.source is not None:
            origin = _text(cells[self.columns.source])
        if self.columns.wide:
            self._wide_row(line, cells, origin, micros_given)
        else:
            self._long_row(line, cells, origin, micros_given)

    def _timestamp(self, cells: Sequence[object], micros_given: bool) -> int:
        raw = cells[self.columns.timestamp]
        if micros_given:
            if not isinstance(raw, int):
                raise _Rejected("bad_timestamp")
            if raw < 0:
                raise _Rejected("before_epoch")
            micros = raw
        else:
            micros = parse_timestamp(raw, self.mapping.timestamp_format, self.zone)
        # As for live readings: a time far ahead of this gateway's clock is a wrong clock or
        # a wrong column, and would stretch the windowing grid to that date.
        if too_far_ahead(micros / 1e6):
            raise _Rejected("ts_in_future")
        return micros

    def _long_row(
        self, line: int, cells: Sequence[object], origin: str, micros_given: bool
    ) -> None:
        columns = self.columns
        tag_column, value_column = self._long_positions
        export_tag = _text(cells[tag_column])
        if not export_tag:
            self.reject(line, tag_column, "empty_tag", cells[tag_column])
            return
        self.export_tags_seen.add(export_tag)
        if export_tag in self._stored_tags:
            tag = self._stored_tags[export_tag]
        else:
            tag = self._stored_tags[export_tag] = _stored_tag(self.mapping, export_tag)
            if tag is not None and tag_problem(tag) is not None:
                self._bad_tags.add(tag)
        if tag is None:
            self.filtered_out += 1
            return
        if tag in self._bad_tags:
            self.reject(line, tag_column, "bad_tag", cells[tag_column])
            return
        try:
            micros = self._timestamp(cells, micros_given)
        except _Rejected as rejected:
            self.reject(line, columns.timestamp, rejected.reason, cells[columns.timestamp])
            return
        try:
            value = parse_value(cells[value_column])
        except _Rejected as rejected:
            self.reject(line, value_column, rejected.reason, cells[value_column])
            return
        self._add(micros, origin, tag, value)

    def _wide_row(
        self, line: int, cells: Sequence[object], origin: str, micros_given: bool
    ) -> None:
        present = [
            (position, stored)
            for position, _, stored in self.columns.wide
            if not _is_empty(cells[position])
        ]
        self.skipped_empty += len(self.columns.wide) - len(present)
        if not present:
            return
        try:
            micros = self._timestamp(cells, micros_given)
        except _Rejected as rejected:
            column = self.columns.timestamp
            self.reject(line, column, rejected.reason, cells[column], count=len(present))
            return
        for position, tag in present:
            if tag in self._bad_tags:
                self.reject(line, position, "bad_tag", cells[position])
                continue
            try:
                value = parse_value(cells[position])
            except _Rejected as rejected:
                self.reject(line, position, rejected.reason, cells[position])
                continue
            self._add(micros, origin, tag, value)

    @property
    def chunk_full(self) -> bool:
        return len(self.pending) >= self.chunk_rows

    def flush(self, fraction: float | None) -> None:
        if self.pending:
            result = self.sink.insert(self.pending)
            self.inserted += result.inserted
            self.duplicates += result.duplicates
            self.rejected_full += result.rejected_full
            self.pending = []
        if self.progress is not None:
            self.progress(
                ImportProgress(
                    rows_read=self.rows_read,
                    inserted=self.inserted,
                    duplicates=self.duplicates,
                    rejected=self.rejected,
                    fraction=fraction,
                    seconds=time.monotonic() - self.started,
                )
            )

    def report(self) -> ImportReport:
        not_found: list[str] = []
        if self.mapping.tags is not None and not self.columns.wide:
            renamed = {self.mapping.rename.get(t, t) for t in self.export_tags_seen}
            seen = self.tags_seen | self.export_tags_seen | renamed
            not_found = [t for t in self.mapping.tags if t not in seen]
        return ImportReport(
            path=self.path,
            rows_read=self.rows_read,
            inserted=self.inserted,
            duplicates=self.duplicates,
            rejected=self.rejected,
            rejected_examples=tuple(self.examples),
            tags=sorted(self.tags_seen),
            first_ts=None if self.last_us < 0 else self.first_us / 1e6,
            last_ts=None if self.last_us < 0 else self.last_us / 1e6,
            seconds=time.monotonic() - self.started,
            skipped_empty=self.skipped_empty,
            filtered_out=self.filtered_out,
            rejected_full=self.rejected_full,
            tags_not_found=not_found,
        )


def _text(raw: object) -> str:
    return "" if raw is None else str(raw).strip()


def _is_empty(raw: object) -> bool:
    return raw is None or (isinstance(raw, str) and not raw.strip())


# --- CSV ---------------------------------------------------------------------------------

_DELIMITERS = (",", ";", "\t", "|")


def _open_text(path: Path, raw: IO[bytes]) -> io.TextIOWrapper:
    binary: IO[bytes] = raw
    if path.name.lower().endswith(".gz"):
        binary = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
    # utf-8-sig drops the byte order mark spreadsheet programs put in front of the header.
    return io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")


class _RecordSpansLines(Exception):
    """Raised into :mod:`csv`'s reader when a record asks for a second line."""


class _CsvLines:
    """The lines of a CSV file as :mod:`csv` reads them, one record per line.

    A historian export has one row per line, so a record that asks for a second line has
    a quoted field left open (``"12.5`` for ``12.5``) that would swallow the rows after it.
    That line is not handed out: :class:`_RecordSpansLines` ends the record, the line that
    opened it is refused, and reading goes on with the next one. Every line is read once.
    A legitimate line break inside a quoted field (which no timestamp, tag or value holds)
    costs the line that opened it; the field's other lines are read as rows of their own.
    """

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines
        self._in_record = False
        self.text = ""  # the line of the current record
        self.line = 0  # its number (the header is line 1)

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        if self._in_record:
            raise _RecordSpansLines
        self.text = next(self._lines)
        self.line += 1
        self._in_record = True
        return self.text

    def start_record(self) -> None:
        self._in_record = False


_CSV_READ_ERRORS = (OSError, EOFError, UnicodeDecodeError, csv.Error, zlib.error)


def _unreadable_csv(
    path: Path, lines: _CsvLines | None, exc: BaseException, outcome: str
) -> ImportFailed:
    """``outcome`` follows the cause as written, its separator included."""
    where = f" at line {lines.line}" if lines is not None and lines.line else ""
    return ImportFailed(f"{path}: cannot read the CSV file{where} ({exc}){outcome}", path=path)


def _csv_tag_names(path: Path, delimiter: str, position: int) -> set[str]:
    """The distinct tag names of a long-layout CSV file (a first pass, for ``slash_as``)."""
    names: set[str] = set()
    lines: _CsvLines | None = None
    try:
        with path.open("rb") as raw, _open_text(path, raw) as text:
            lines = _CsvLines(text)
            reader = csv.reader(lines, delimiter=delimiter)
            next(reader, None)  # the header (checked by the import pass)
            for cells in _records(lines, reader):
                if cells is None or len(cells) <= position:
                    continue  # a line whose quote stays open is the import pass's to refuse
                if name := _text(cells[position]):
                    names.add(name)
    except _CSV_READ_ERRORS as exc:
        raise _unreadable_csv(
            path, lines, exc, " while checking its tag names for slash_as; nothing was imported"
        ) from exc
    return names


def _records(lines: _CsvLines, reader: Iterator[list[str]]) -> Iterator[list[str] | None]:
    """The records ``reader`` reads from ``lines``; None for a line that opens a quoted
    field it does not close (``lines.line`` and ``lines.text`` name it)."""
    while True:
        lines.start_record()
        try:
            cells: list[str] | None = next(reader)
        except StopIteration:
            return
        except _RecordSpansLines:
            cells = None
        yield cells


def _open_quote_column(text: str, delimiter: str) -> int:
    """The column of the field whose quote ``text`` leaves open: its last one."""
    cells = next(csv.reader([text.rstrip("\r\n")], delimiter=delimiter), [])
    return max(len(cells) - 1, 0)


def _import_csv(
    path: Path,
    sink: CountingSink,
    mapping: ColumnMapping,
    chunk_rows: int,
    progress: Callable[[ImportProgress], None] | None,
) -> ImportReport:
    size = path.stat().st_size
    lines: _CsvLines | None = None
    try:
        with path.open("rb") as raw, _open_text(path, raw) as text:

            def fraction() -> float | None:
                return min(raw.tell() / size, 1.0) if size else None

            first = text.readline()
            if not first.strip():
                raise ImportFailed(f"{path}: the file is empty (no header line)", path=path)
            delimiter = mapping.delimiter or max(_DELIMITERS, key=first.count)
            lines = _CsvLines(itertools.chain([first], text))
            reader = csv.reader(lines, delimiter=delimiter)
            try:
                header = next(reader)
            except _RecordSpansLines:
                raise ImportFailed(
                    f"{path}: line 1, the header, has a quoted field that does not end on "
                    "it (a quote left open, or a line break in a column name); fix that line",
                    path=path,
                ) from None
            columns = _resolve_columns(header, mapping, path)
            if columns.tag is not None and mapping.slash_as is not None:
                tags = _csv_tag_names(path, delimiter, columns.tag)
                _refuse_slash_collisions(tags, mapping, path, what="tags")
            width = max(columns.names_needed) + 1
            importer = _Importer(
                path=path,
                sink=sink,
                mapping=mapping,
                columns=columns,
                header=header,
                chunk_rows=chunk_rows,
                progress=progress,
            )
            for cells in _records(lines, reader):
                if cells is None:
                    column = _open_quote_column(lines.text, delimiter)
                    importer.refuse_line(lines.line, column, "unmatched_quote", lines.text)
                    continue
                if not cells:
                    continue  # a blank line
                if len(cells) < width:
                    cells = cells + [""] * (width - len(cells))
                importer.row(lines.line, cells)
                if importer.chunk_full:
                    importer.flush(fraction())
            importer.flush(1.0)
    except _CSV_READ_ERRORS as exc:
        raise _unreadable_csv(
            path, lines, exc, "; rows before it were imported and running the import again is safe"
        ) from exc
    return importer.report()


# --- Parquet -----------------------------------------------------------------------------


def _import_pyarrow(path: Path) -> tuple[Any, Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportFailed(
            f"{path}: reading Parquet needs pyarrow: pip install 'fedgate-agent[historian]'",
            path=path,
        ) from exc
    return pa, pc, pq


def _arrow_micros(pa: Any, pc: Any, column: Any, zone_name: str | None) -> list[int | None] | None:
    """Exact microseconds for timestamp / date columns; ``None`` for other types."""
    kind = column.type
    if pa.types.is_date(kind):
        column = column.cast(pa.timestamp("us"))
        kind = column.type
    if not pa.types.is_timestamp(kind):
        return None
    if kind.tz is None and zone_name is not None:
        column = pc.assume_timezone(column, zone_name, ambiguous="earliest", nonexistent="earliest")
    as_micros = pc.cast(column, pa.timestamp("us", tz=column.type.tz), safe=False)
    values: list[int | None] = as_micros.cast(pa.int64()).to_pylist()
    return values


def _import_parquet(
    path: Path,
    sink: CountingSink,
    mapping: ColumnMapping,
    chunk_rows: int,
    progress: Callable[[ImportProgress], None] | None,
) -> ImportReport:
    pa, pc, pq = _import_pyarrow(path)
    row = 0
    try:
        parquet = pq.ParquetFile(path)
        header = list(parquet.schema_arrow.names)
        columns = _resolve_columns(header, mapping, path)
        if columns.tag is not None and mapping.slash_as is not None:
            tag_column = parquet.read(columns=[header[columns.tag]]).column(0)
            tags = (_text(t) for t in pc.unique(tag_column).to_pylist())
            _refuse_slash_collisions(tags, mapping, path, what="tags")
        total = parquet.metadata.num_rows
        importer = _Importer(
            path=path,
            sink=sink,
            mapping=mapping,
            columns=columns,
            header=header,
            chunk_rows=chunk_rows,
            progress=progress,
        )
        needed = columns.names_needed
        for batch in parquet.iter_batches(
            batch_size=chunk_rows, columns=[header[p] for p in needed]
        ):
            arrays = {p: batch.column(i) for i, p in enumerate(needed)}
            micros = _arrow_micros(pa, pc, arrays[columns.timestamp], mapping.timezone)
            values = {
                p: micros if p == columns.timestamp and micros is not None else array.to_pylist()
                for p, array in arrays.items()
            }
            cells: list[object] = [None] * len(header)
            for index in range(batch.num_rows):
                row += 1
                for position in needed:
                    cells[position] = values[position][index]
                importer.row(row, cells, micros_given=micros is not None)
            if importer.chunk_full:
                importer.flush(row / total if total else None)
        importer.flush(1.0)
    except (OSError, pa.ArrowException) as exc:
        where = f" at row {row}" if row else ""
        raise ImportFailed(
            f"{path}: cannot read the Parquet file{where} ({exc}); rows before it were "
            "imported and running the import again is safe",
            path=path,
        ) from exc
    return importer.report()


# --- front door --------------------------------------------------------------------------


def detect_format(path: Path) -> FileFormat:
    """The format implied by ``path``'s suffix; raises :class:`ImportFailed` when unclear."""
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")):
        return FileFormat.CSV
    if name.endswith((".parquet", ".pq", ".parq")):
        return FileFormat.PARQUET
    raise ImportFailed(
        f"{path}: cannot tell the format from the file name; use a .csv, .csv.gz or "
        ".parquet suffix or pass the format explicitly",
        path=path,
    )


def import_history(
    path: Path,
    sink: CountingSink,
    mapping: ColumnMapping,
    *,
    progress: Callable[[ImportProgress], None] | None = None,
    chunk_rows: int = 50_000,
    file_format: FileFormat | str | None = None,
) -> ImportReport:
    """Import the historian export at ``path`` into ``sink`` (an ``IngestBuffer``).

    ``mapping`` says how columns map onto samples (see :class:`ColumnMapping`).
    ``file_format``: ``csv`` (also ``.csv.gz``) or ``parquet``; ``None`` goes by suffix.
    At most ``chunk_rows`` samples go into one transaction, and ``progress`` is called
    after each. Idempotent: a second run of the same file reports everything as
    duplicates. Raises :class:`ImportFailed` when the file cannot be read (rows before the
    failure stay imported) or a mapped column is missing; rows that do not parse are
    counted in the report, not raised.
    """
    if chunk_rows < 1:
        raise ImportFailed(f"chunk_rows is {chunk_rows}; use at least 1", path=path)
    try:
        kind = detect_format(path) if file_format is None else FileFormat(file_format)
    except ValueError:
        raise ImportFailed(
            f"{path}: file_format {file_format!r} is not csv or parquet", path=path
        ) from None
    if not path.is_file():
        raise ImportFailed(f"{path}: no such file", path=path)
    if kind is FileFormat.PARQUET:
        return _import_parquet(path, sink, mapping, chunk_rows, progress)
    return _import_csv(path, sink, mapping, chunk_rows, progress)
