"""The crash-safe local buffer every source writes into: one SQLite file.

Durability: WAL journal, ``synchronous=FULL`` — :meth:`IngestBuffer.insert` returns only
after its transaction is on disk, so a source may acknowledge what it inserted (MQTT PUBACK)
and a ``kill -9`` or power cut a moment later loses none of it. ``UNIQUE(source, seq)`` makes
a redelivered sample a counted duplicate instead of a second row, so redelivery after a crash
stores nothing twice.

Consistency: the counters (``counters`` table), the per-source and per-tag row counts and the
last rejected payloads are updated in the same transaction as the samples, so after any crash
they still describe exactly the rows in the file.

Size cap (``max_samples``) with one of two policies:

- ``reject_new``: a sample that does not fit is not stored and counted as ``rejected_full``
  (a duplicate of a stored sample is still a duplicate, not a rejection);
- ``drop_oldest``: the new sample is stored and the oldest by arrival (lowest ``id``) are
  deleted and counted as ``dropped_oldest``. A dropped sample that is delivered again is new
  to the buffer and stored again.

Corruption: at open, a file whose header is not SQLite's or that fails ``PRAGMA quick_check``
(with its ``-wal``/``-shm``) is moved to ``<name>.corrupt-<UTC time>``, logged, recorded in the
new file's ``quarantine`` table and exposed as :attr:`IngestBuffer.quarantined`; a new empty
buffer takes its place so ingestion goes on.

Schema (readable with the ``sqlite3`` shell)::

    meta(key PRIMARY KEY, value)                 schema_version, created_at, max_samples, policy
    samples(id, source, seq, tag, ts, value, received_at)   UNIQUE(source, seq), INDEX(tag, ts)
    counters(name PRIMARY KEY, value)            inserted, duplicates, rejected_full,
                                                 dropped_oldest, rejected_<reason>
    sources(source PRIMARY KEY, samples, last_seq, last_ts, last_received_at)
    tags(tag PRIMARY KEY, samples)
    rejected(id, source, reason, payload, payload_bytes, received_at)   the last 1,000, truncated
    quarantine(id, moved_to, reason, detected_at)

``stats()`` works on a second, read-only connection (:meth:`IngestBuffer.open_read_only`)
while another process writes: ``fedgate-agent status`` reads a running agent's buffer.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import mmap
import operator
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
import numpy.typing as npt
from fedgate_common.logs import log_event

from fedgate_agent.ingest.errors import BufferCorrupted, BufferPathForeign, IngestError
from fedgate_agent.ingest.samples import Sample
from fedgate_agent.ingest.wal_check import wal_damage

__all__ = [
    "BufferSettings",
    "BufferStats",
    "CapPolicy",
    "IngestBuffer",
    "InsertResult",
    "QuarantineRecord",
    "RejectedPayload",
    "SampleRow",
    "SourceStats",
]

log = logging.getLogger("fedgate.agent.ingest.buffer")

SCHEMA_VERSION = 1
#: How many rejected payloads are kept for inspection, and how many bytes of each.
REJECTED_KEEP = 1000
REJECTED_PAYLOAD_BYTES = 256
_SQLITE_HEADER = b"SQLite format 3\x00"
# Primary result codes that mean "this file is damaged" (extended codes share the low byte).
_CORRUPTION_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
_BUSY_TIMEOUT_MS = 10_000
#: Buffer files this process holds SQLite connections to: (device, inode) → how many. A
#: file's header is read directly (``_read_header``) only while none is open here, because
#: closing that extra descriptor drops every POSIX lock this process holds on the file
#: (SQLite, "How To Corrupt An SQLite Database File" §2.2). Another process closing the
#: buffer then takes itself for its last user and checkpoints and deletes the WAL that this
#: process goes on appending to: commits no other process sees, lost by a kill -9.
_OPEN_HERE: dict[tuple[int, int], int] = {}
_OPEN_HERE_LOCK = threading.Lock()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples(
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    seq INTEGER NOT NULL,
    tag TEXT NOT NULL,
    ts REAL NOT NULL,
    value REAL NOT NULL,
    received_at REAL NOT NULL,
    UNIQUE(source, seq)
);
CREATE INDEX IF NOT EXISTS samples_by_tag_ts ON samples(tag, ts);
CREATE TABLE IF NOT EXISTS counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sources(
    source TEXT PRIMARY KEY,
    samples INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    last_ts REAL NOT NULL,
    last_received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tags(tag TEXT PRIMARY KEY, samples INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rejected(
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL,
    payload_bytes INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine(
    id INTEGER PRIMARY KEY,
    moved_to TEXT NOT NULL,
    reason TEXT NOT NULL,
    detected_at REAL NOT NULL
);
"""

_INSERT_SAMPLE = (
    "INSERT OR IGNORE INTO samples(source, seq, tag, ts, value, received_at) "
    "VALUES (?, ?, ?, ?, ?, {received_at})"
)
_SOURCE_AND_TAG = operator.itemgetter(0, 2)
_SEQ = operator.itemgetter(1)
_TS = operator.itemgetter(3)
_ADD_COUNTER = (
    "INSERT INTO counters(name, value) VALUES (?, ?) "
    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value"
)
_ADD_SOURCE = (
    "INSERT INTO sources(source, samples, last_seq, last_ts, last_received_at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(source) DO UPDATE SET "
    "samples = samples + excluded.samples, last_seq = max(last_seq, excluded.last_seq), "
    "last_ts = max(last_ts, excluded.last_ts), last_received_at = excluded.last_received_at"
)
_ADD_TAG = (
    "INSERT INTO tags(tag, samples) VALUES (?, ?) "
    "ON CONFLICT(tag) DO UPDATE SET samples = samples + excluded.samples"
)


class CapPolicy(StrEnum):
    """What a full buffer does with a new sample."""

    REJECT_NEW = "reject_new"
    DROP_OLDEST = "drop_oldest"


@dataclass(frozen=True)
class BufferSettings:
    """Where the buffer lives and how big it may grow (in samples)."""

    path: Path
    max_samples: int = 5_000_000
    policy: CapPolicy = CapPolicy.REJECT_NEW

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise IngestError(f"max_samples must be at least 1, not {self.max_samples}")


@dataclass(frozen=True)
class InsertResult:
    """What one :meth:`IngestBuffer.insert` did; every sample is in exactly one of the first
    three counts, ``dropped_oldest`` counts older rows deleted to make room."""

    inserted: int
    duplicates: int
    rejected_full: int
    dropped_oldest: int


@dataclass(frozen=True)
class RejectedPayload:
    """A payload a source refused (``reason`` is a :class:`MalformedPayload` reason)."""

    source: str
    reason: str
    payload: bytes
    size: int | None = None  # the payload's length, when ``payload`` is only its head


@dataclass(frozen=True)
class SourceStats:
    samples: int
    last_seq: int
    last_ts: float
    last_received_at: float


@dataclass(frozen=True)
class QuarantineRecord:
    moved_to: Path
    reason: str
    detected_at: float


@dataclass(frozen=True)
class BufferStats:
    """A consistent snapshot (one read transaction) of the buffer's state."""

    path: Path
    samples: int
    max_samples: int
    policy: CapPolicy
    counters: dict[str, int]
    sources: dict[str, SourceStats]
    quarantined: tuple[QuarantineRecord, ...]
    db_bytes: int
    last_rejected: tuple[RejectedPayload, ...] = field(default=())


#: ``(source, seq, tag, ts, value)``: a :class:`Sample` as a plain tuple (bulk inserts).
SampleRow = tuple[str, int, str, float, float]


class IngestBuffer:
    """The SQLite buffer; thread-safe (one connection behind a lock). Several instances,
    in one process or several, may write the same file: SQLite serialises their
    transactions and each reads the stored count inside its own.

    Open with :meth:`open` (read-write; creates, checks, quarantines) or
    :meth:`open_read_only` (for status readers; never changes the file).
    """

    def __init__(
        self,
        *,
        connection: sqlite3.Connection,
        settings: BufferSettings,
        read_only: bool,
        quarantined: Path | None,
    ) -> None:
        self._db = connection
        self._settings = settings
        self._read_only = read_only
        self._lock = threading.Lock()
        self._closed = False
        self.quarantined = quarantined
        self._file_key = _register_open(settings.path)

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, settings: BufferSettings, *, check_log: bool = True) -> IngestBuffer:
        """Open (or create) the buffer at ``settings.path`` for writing.

        A corrupted file is moved aside and a new buffer is created in its place; the
        returned buffer's :attr:`quarantined` says where the old file went. ``check_log``:
        look for a damaged write-ahead log first; only when no other process may be
        writing the buffer (a log read while another process restarts it would look
        damaged).
        """
        path = settings.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _OPEN_HERE_LOCK:
                return cls._open_checked(settings, check_log=check_log)
        except (sqlite3.Error, OSError) as exc:
            raise IngestError(f"cannot open the buffer at {path}: {exc}") from exc

    @classmethod
    def _open_checked(cls, settings: BufferSettings, *, check_log: bool) -> IngestBuffer:
        path = settings.path
        quarantined: Path | None = None
        # Before SQLite replays (and cuts) the log.
        wal_copy = _keep_a_damaged_wal(path) if check_log else None
        try:
            connection = _connect(path, read_only=False)
            _check_integrity(connection, path)
        except BufferCorrupted as exc:
            _refuse_a_foreign_file(path)
            quarantined = _quarantine(path)
            log_event(
                log,
                logging.ERROR,
                "buffer file corrupted; moved aside, starting a new buffer",
                path=str(path),
                moved_to=str(quarantined),
                reason=str(exc),
            )
            connection = _connect(path, read_only=False)
            _create_schema(connection, settings)
            _record_quarantine(connection, quarantined, str(exc))
        else:
            _create_schema(connection, settings)
        if wal_copy is not None:
            copy, reason = wal_copy
            _record_quarantine(connection, copy, reason)
            # A new log: what is left beyond the damage must not be reported again.
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            quarantined = quarantined or copy
        return cls(
            connection=connection, settings=settings, read_only=False, quarantined=quarantined
        )

    @classmethod
    def open_read_only(cls, path: Path) -> IngestBuffer:
        """Open an existing buffer for :meth:`stats`, :meth:`tags` and :meth:`read_series`
        only, beside a process that may be writing it. Raises :class:`BufferCorrupted` (the
        file is left where it is) or :class:`IngestError` when there is no buffer at ``path``.
        """
        if not path.is_file():
            raise IngestError(f"no buffer at {path}")
        with _OPEN_HERE_LOCK:
            try:
                connection = _connect(path, read_only=True)
                _check_integrity(connection, path, full=False)
                meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
            except sqlite3.Error as exc:
                raise IngestError(f"cannot read the buffer at {path}: {exc}") from exc
            settings = BufferSettings(
                path=path,
                max_samples=int(meta.get("max_samples", BufferSettings.max_samples)),
                policy=CapPolicy(meta.get("policy", CapPolicy.REJECT_NEW)),
            )
            return cls(connection=connection, settings=settings, read_only=True, quarantined=None)

    @property
    def settings(self) -> BufferSettings:
        return self._settings

    # -- writing ---------------------------------------------------------------------------

    def insert(
        self, samples: Sequence[Sample], *, rejected: Sequence[RejectedPayload] = ()
    ) -> InsertResult:
        """Store ``samples`` and record ``rejected`` payloads in ONE transaction, durable when
        this returns. Duplicates of stored ``(source, seq)`` are counted, not stored; the cap
        policy applies to the rest."""
        return self.insert_rows(
            [(s.source, s.seq, s.tag, s.ts, s.value) for s in samples], rejected=rejected
        )

    def insert_rows(
        self, rows: Sequence[SampleRow], *, rejected: Sequence[RejectedPayload] = ()
    ) -> InsertResult:
        """:meth:`insert` for samples already as ``(source, seq, tag, ts, value)`` tuples —
        the bulk path of high-rate sources, which skips one object per sample. The caller
        guarantees what :class:`Sample` documents (finite values, 0 ≤ seq ≤ MAX_SEQ)."""
        received_at = time.time()
        with self._lock, self._write_transaction():
            result = self._insert_locked(rows, received_at)
            if rejected:
                self._record_rejected(rejected, received_at)
        return result

    def count_rejected(self, source: str, reason: str, payload: bytes, n: int = 1) -> None:
        """Count ``n`` refused payloads of ``source`` under ``rejected_<reason>`` and keep the
        (truncated) payload for inspection; its own durable transaction."""
        received_at = time.time()
        with self._lock, self._write_transaction():
            self._record_rejected([RejectedPayload(source, reason, payload)] * n, received_at)

    def _insert_locked(self, rows: Sequence[SampleRow], received_at: float) -> InsertResult:
        # Read inside the write transaction: other connections (other sources, other
        # processes) may have written since this one last did.
        stored = self._stored_count()
        free = self._settings.max_samples - stored
        if self._settings.policy is CapPolicy.REJECT_NEW and len(rows) > free:
            inserted, duplicates, rejected_full = self._insert_until_full(rows, free, received_at)
        else:
            inserted = self._insert_rows(rows, received_at)
            duplicates, rejected_full = len(rows) - inserted, 0
        stored += inserted
        dropped = 0
        if stored > self._settings.max_samples:
            dropped = self._drop_oldest(stored - self._settings.max_samples)
        self._add_counters(
            inserted=inserted,
            duplicates=duplicates,
            rejected_full=rejected_full,
            dropped_oldest=dropped,
        )
        return InsertResult(inserted, duplicates, rejected_full, dropped)

    def _insert_rows(self, rows: Sequence[SampleRow], received_at: float) -> int:
        """Insert (ignoring duplicates) and update per-source/per-tag counts; returns the
        number of new rows. Each run of rows with one (source, tag) is one ``executemany`` so
        SQLite's change count says how many of that run were new."""
        db = self._db
        # The batch's arrival time is written into the statement (a float's repr is exact)
        # rather than into every row tuple.
        statement = _INSERT_SAMPLE.format(received_at=repr(received_at))
        per_source: dict[str, list[float]] = {}  # source → [new, max seq, max ts]
        per_tag: dict[str, int] = {}
        total = 0
        for (source, tag), run in itertools.groupby(rows, key=_SOURCE_AND_TAG):
            group = list(run)
            before = db.total_changes
            db.executemany(statement, group)
            new = db.total_changes - before
            total += new
            # A duplicate's (seq, ts) is stored already, so the maximum over the whole run,
            # duplicates included, is the maximum over what is stored.
            top_seq = max(map(_SEQ, group))
            top_ts = max(map(_TS, group))
            known = per_source.get(source)
            if known is None:
                per_source[source] = [new, top_seq, top_ts]
            else:
                known[0] += new
                known[1] = max(known[1], top_seq)
                known[2] = max(known[2], top_ts)
            if new:
                per_tag[tag] = per_tag.get(tag, 0) + new
        db.executemany(
            _ADD_SOURCE,
            [
                (source, int(n), int(seq), ts, received_at)
                for source, (n, seq, ts) in per_source.items()
            ],
        )
        db.executemany(_ADD_TAG, per_tag.items())
        return total

    def _insert_until_full(
        self, rows: Sequence[SampleRow], free: int, received_at: float
    ) -> tuple[int, int, int]:
        """``reject_new`` near the cap: fill the free room, then tell duplicates (stored or
        earlier in this batch) from samples that do not fit."""
        inserted = duplicates = rejected_full = 0
        seen: set[tuple[str, int]] = set()
        for row in rows:
            key = (row[0], row[1])
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            if free > inserted:
                new = self._insert_rows([row], received_at)
                inserted += new
                duplicates += 1 - new
            elif self._db.execute(
                "SELECT 1 FROM samples WHERE source = ? AND seq = ?", key
            ).fetchone():
                duplicates += 1
            else:
                rejected_full += 1
        return inserted, duplicates, rejected_full

    def _drop_oldest(self, excess: int) -> int:
        db = self._db
        last_id = db.execute(
            "SELECT id FROM samples ORDER BY id LIMIT 1 OFFSET ?", (excess - 1,)
        ).fetchone()[0]
        groups = db.execute(
            "SELECT source, tag, count(*) FROM samples WHERE id <= ? GROUP BY source, tag",
            (last_id,),
        ).fetchall()
        db.execute("DELETE FROM samples WHERE id <= ?", (last_id,))
        db.executemany(
            "UPDATE sources SET samples = samples - ? WHERE source = ?",
            [(n, source) for source, _, n in groups],
        )
        db.executemany(
            "UPDATE tags SET samples = samples - ? WHERE tag = ?",
            [(n, tag) for _, tag, n in groups],
        )
        return sum(n for _, _, n in groups)

    def _record_rejected(self, rejected: Sequence[RejectedPayload], received_at: float) -> None:
        by_reason: dict[str, int] = {}
        for item in rejected:
            by_reason[item.reason] = by_reason.get(item.reason, 0) + 1
        self._add_counters(**{f"rejected_{reason}": n for reason, n in by_reason.items()})
        kept = rejected[-REJECTED_KEEP:]
        self._db.executemany(
            "INSERT INTO rejected(source, reason, payload, payload_bytes, received_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                (
                    item.source,
                    item.reason,
                    item.payload[:REJECTED_PAYLOAD_BYTES],
                    len(item.payload) if item.size is None else item.size,
                    received_at,
                )
                for item in kept
            ],
        )
        self._db.execute(
            "DELETE FROM rejected WHERE id <= (SELECT max(id) FROM rejected) - ?",
            (REJECTED_KEEP,),
        )

    def _add_counters(self, **deltas: int) -> None:
        self._db.executemany(_ADD_COUNTER, [(k, v) for k, v in deltas.items() if v])

    @contextlib.contextmanager
    def _write_transaction(self) -> Iterator[None]:
        if self._read_only:
            raise IngestError(f"the buffer at {self._settings.path} is open read-only")
        if self._closed:
            raise IngestError(f"the buffer at {self._settings.path} is closed")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- reading ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The lock and the connection for one read. A damaged page the read runs into is a
        :class:`BufferCorrupted`; the file stays where it is (a reader may sit beside the
        running agent), and `run` or `import` move it aside when they open it."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.DatabaseError as exc:
                if not _is_corruption(exc):
                    raise
                raise BufferCorrupted(
                    f"cannot read the buffer at {self._settings.path}: {exc} (damaged; "
                    "`fedgate-agent run` or `import` moves it aside and starts a new one)",
                    path=self._settings.path,
                ) from exc

    def stats(self) -> BufferStats:
        """Counters, per-source state, cap, quarantines and file size, read in one snapshot."""
        with self._reading() as db:
            db.execute("BEGIN")
            try:
                counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
                sources = {
                    row[0]: SourceStats(*row[1:])
                    for row in db.execute(
                        "SELECT source, samples, last_seq, last_ts, last_received_at "
                        "FROM sources ORDER BY source"
                    )
                }
                quarantined = tuple(
                    QuarantineRecord(Path(moved_to), reason, at)
                    for moved_to, reason, at in db.execute(
                        "SELECT moved_to, reason, detected_at FROM quarantine ORDER BY id"
                    )
                )
                last_rejected = tuple(
                    RejectedPayload(source, reason, bytes(payload))
                    for source, reason, payload in db.execute(
                        "SELECT source, reason, payload FROM rejected ORDER BY id DESC LIMIT 10"
                    )
                )
                page_count = db.execute("PRAGMA page_count").fetchone()[0]
                page_size = db.execute("PRAGMA page_size").fetchone()[0]
            finally:
                db.execute("COMMIT")
        return BufferStats(
            path=self._settings.path,
            samples=sum(s.samples for s in sources.values()),
            max_samples=self._settings.max_samples,
            policy=self._settings.policy,
            counters=counters,
            sources=sources,
            quarantined=quarantined,
            db_bytes=page_count * page_size + _file_size(_sidecar(self._settings.path, "-wal")),
            last_rejected=last_rejected,
        )

    def tags(self) -> list[str]:
        """Tags that have at least one stored sample, sorted."""
        with self._reading() as db:
            return [
                tag for (tag,) in db.execute("SELECT tag FROM tags WHERE samples > 0 ORDER BY tag")
            ]

    def read_series(
        self, tags: Sequence[str], start: float | None = None, end: float | None = None
    ) -> dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
        """Per tag, ``(ts, value)`` arrays sorted by ``ts`` with ``start <= ts < end``
        (either bound may be None). A tag without samples gets two empty arrays."""
        low = -math.inf if start is None else start
        high = math.inf if end is None else end
        series: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]] = {}
        with self._reading() as db:
            for tag in tags:
                rows = db.execute(
                    "SELECT ts, value FROM samples WHERE tag = ? AND ts >= ? AND ts < ? "
                    "ORDER BY ts",
                    (tag, low, high),
                ).fetchall()
                pairs = np.array(rows, dtype=np.float64).reshape(len(rows), 2)
                series[tag] = (pairs[:, 0].copy(), pairs[:, 1].copy())
        return series

    def _stored_count(self) -> int:
        """Rows in ``samples``, from the counters kept in step with them (two key lookups
        instead of a count over millions of rows)."""
        value = self._db.execute(
            "SELECT coalesce(sum(CASE name WHEN 'inserted' THEN value ELSE -value END), 0) "
            "FROM counters WHERE name IN ('inserted', 'dropped_oldest')"
        ).fetchone()[0]
        return int(value)

    # -- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()
                _unregister_open(self._file_key)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


# -- opening, checking and quarantining files (module functions: no buffer state) ---------


#: Mode of a new buffer file.
FILE_MODE = 0o640


def _connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    if read_only:
        connection = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        # Plant data is the site's own: owner and the service's group only (SQLite gives the
        # -wal and -shm files the database file's mode). An empty file is an empty database.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    return connection


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """Whether SQLite says the file is damaged or not a database (not busy, not full)."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _CORRUPTION_CODES


def _check_integrity(connection: sqlite3.Connection, path: Path, *, full: bool = True) -> None:
    """Raise :class:`BufferCorrupted` when ``path`` is not a sound SQLite file.

    The header check catches files that are not SQLite at all (cheap, before SQLite reads
    anything); ``quick_check`` walks every page of every b-tree (seconds for millions of
    rows, once per start). Read-only openers skip the full walk: a running agent checked it.
    """
    try:
        header = _read_header(path) if _file_key(path) not in _OPEN_HERE else b""
        if header and not _header_is_sound(header):
            raise BufferCorrupted(f"{path} is not an SQLite database (bad header)", path=path)
        if not full:
            return
        problems = [row[0] for row in connection.execute("PRAGMA quick_check(10)")]
    except sqlite3.DatabaseError as exc:
        if _is_corruption(exc):
            connection.close()
            raise BufferCorrupted(f"{path}: {exc}", path=path) from exc
        raise
    except BufferCorrupted:
        connection.close()
        raise
    if problems != ["ok"]:
        connection.close()
        raise BufferCorrupted(f"{path} failed quick_check: {'; '.join(problems)}", path=path)


def _file_key(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()  # no descriptor opened: nobody's locks are touched
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _register_open(path: Path) -> tuple[int, int] | None:
    """Count a connection to ``path`` (called with ``_OPEN_HERE_LOCK`` held by the opener)."""
    key = _file_key(path)
    if key is not None:
        _OPEN_HERE[key] = _OPEN_HERE.get(key, 0) + 1
    return key


def _unregister_open(key: tuple[int, int] | None) -> None:
    with _OPEN_HERE_LOCK:
        if key is not None and key in _OPEN_HERE:
            _OPEN_HERE[key] -= 1
            if not _OPEN_HERE[key]:
                del _OPEN_HERE[key]


def _read_header(path: Path) -> bytes:
    """The first 100 bytes, read directly — only while this process has no connection to
    the file (see ``_OPEN_HERE``)."""
    try:
        with path.open("rb") as file:
            return file.read(100)
    except FileNotFoundError:
        return b""


def _header_is_sound(header: bytes) -> bool:
    if len(header) < 100 or not header.startswith(_SQLITE_HEADER):
        return False
    page_size = int.from_bytes(header[16:18], "big")
    return page_size == 1 or (512 <= page_size <= 32768 and page_size & (page_size - 1) == 0)


def _refuse_a_foreign_file(path: Path) -> None:
    """Raise :class:`BufferPathForeign` when the file at ``path`` cannot be a damaged buffer:
    no SQLite header and not whole pages (an SQLite file is always a whole number of pages
    of 512 bytes or more). A mistyped ``ingest.buffer_file`` naming some other file must
    not have that file moved aside and replaced."""
    header = _read_header(path)
    size = path.stat().st_size
    if header.startswith(_SQLITE_HEADER) or size % 512 == 0:
        return
    raise BufferPathForeign(
        f"{path} is not an SQLite database, nor a damaged one ({size:,} bytes, not whole "
        "pages): ingest.buffer_file names some other file? It was left as it is; correct "
        "the path, or move the file away to start a new buffer there"
    )


def _refuse_a_foreign_database(connection: sqlite3.Connection, path: Path) -> None:
    """Raise :class:`BufferPathForeign` (and roll back) when ``path`` is an SQLite database
    with tables but no buffer ``meta`` table: another application's, not to be written."""
    names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    if not names or "meta" in names:
        return
    connection.execute("ROLLBACK")
    connection.close()
    shown = ", ".join(sorted(names)[:5])
    raise BufferPathForeign(
        f"{path} is another SQLite database (tables {shown}), not an agent's buffer: "
        "ingest.buffer_file names the wrong file? It was not changed"
    )


def _create_schema(connection: sqlite3.Connection, settings: BufferSettings) -> None:
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = FULL")
    connection.execute("PRAGMA journal_size_limit = 67108864")
    connection.execute("PRAGMA cache_size = -16384")
    connection.execute("BEGIN IMMEDIATE")
    _refuse_a_foreign_database(connection, settings.path)
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            connection.execute(statement)
    version = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if version is not None and int(version[0]) != SCHEMA_VERSION:
        connection.execute("ROLLBACK")
        connection.close()
        raise IngestError(
            f"{settings.path} has buffer schema version {version[0]}; this agent reads "
            f"version {SCHEMA_VERSION}: move the file aside or use a matching agent"
        )
    connection.executemany(
        "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)",
        [
            ("schema_version", str(SCHEMA_VERSION)),
            ("created_at", datetime.now(UTC).isoformat(timespec="seconds")),
        ],
    )
    connection.executemany(
        "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
        [("max_samples", str(settings.max_samples)), ("policy", settings.policy.value)],
    )
    connection.execute("COMMIT")


def _record_quarantine(connection: sqlite3.Connection, moved_to: Path, reason: str) -> None:
    connection.execute("BEGIN IMMEDIATE")
    connection.execute(
        "INSERT INTO quarantine(moved_to, reason, detected_at) VALUES (?, ?, ?)",
        (str(moved_to), reason, time.time()),
    )
    connection.execute("COMMIT")


def _keep_a_damaged_wal(path: Path) -> tuple[Path, str] | None:
    """When ``path``'s write-ahead log is damaged with committed transactions after the
    damage (:mod:`.wal_check`), copy the database and its log to
    ``<name>.wal-damaged-<UTC time>`` before SQLite drops those transactions; return the
    copy and why. A buffer already open in this process is not looked at."""
    wal = _sidecar(path, "-wal")
    if _file_key(path) in _OPEN_HERE or _file_size(wal) == 0:
        return None
    with wal.open("rb") as raw, mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ) as view:
        damage = wal_damage(view)  # paged in as it is read, not loaded whole
    if damage is None:
        return None
    copy = _free_name(path, "wal-damaged")
    shutil.copy2(path, copy)
    shutil.copy2(wal, _sidecar(copy, "-wal"))
    reason = (
        f"frame {damage.frame} of {damage.frames} in {wal.name} is damaged and "
        f"{damage.commits_after} committed transaction(s) follow it: SQLite replays the log "
        "only up to the damage, so their readings are gone from the buffer"
    )
    log_event(
        log,
        logging.ERROR,
        "buffer log damaged; committed readings lost, copy kept",
        path=str(path),
        copy=str(copy),
        reason=reason,
    )
    return copy, reason


def _free_name(path: Path, what: str) -> Path:
    """``<name>.<what>-<UTC time>``, with ``-n`` added while that name is taken."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.{what}-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.{what}-{stamp}-{n}")
        n += 1
    return target


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _quarantine(path: Path) -> Path:
    """Move ``path`` and its ``-wal``/``-shm`` to ``<name>.corrupt-<UTC time>[-n]``."""
    target = _free_name(path, "corrupt")
    os.replace(path, target)
    for suffix in ("-wal", "-shm"):
        sidecar = _sidecar(path, suffix)
        if sidecar.exists():
            os.replace(sidecar, _sidecar(target, suffix))
    return target


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
