"""The on-disk outbox: every reading is durable before it counts as produced.

One SQLite file (``<state_dir>/outbox.db``) in WAL mode with ``synchronous=FULL``:

* ``messages``: readings waiting for their PUBACK, oldest first (``id`` grows forever,
  ``AUTOINCREMENT`` never reuses one), ``UNIQUE(topic, seq)``;
* ``streams``: the next sequence number of each topic;
* ``counters``: what the size cap dropped or rejected, kept across restarts;
* ``parked``: readings the broker refused for good (MQTT 5 PUBACK "not authorized",
  "topic name invalid", "payload format invalid"), kept with the broker's reason instead of
  being deleted. Every start moves them back into ``messages`` under their old ids, so once
  the broker's ACL is fixed a restart sends them, oldest first.

A batch of readings and the sequence numbers it consumes are written in ONE transaction, so
after a crash (kill -9, power cut) either both are on disk or neither is: a sequence number
is never reused and never skipped by a reading that was produced. Rows leave the outbox
only after the broker acknowledged them (:meth:`Outbox.remove`).

The size cap ``max_messages`` counts waiting and parked rows together, so moving parked
rows back at a start never takes the outbox over its cap. When full, the oldest parked rows
make room first, whatever the policy (counted in ``dropped_parked``); then the policy
decides: ``drop_oldest`` deletes the oldest waiting rows (their
numbers leave a visible gap, counted in ``dropped_oldest``), ``reject_new`` refuses the new
readings before they get a number (counted in ``rejected_new``).

Write failures that pass (the file locked by another process for longer than the busy
timeout, a full disk, an I/O error) raise :class:`OutboxError` with ``transient=True``;
:class:`AsyncOutbox` retries those with backoff, so the bridge waits instead of exiting.

:class:`Outbox` is synchronous; :class:`AsyncOutbox` runs it on one dedicated thread so
that fsyncs never stall the event loop and every SQLite call comes from the same thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
from fedgate_common.backoff import Backoff

from fedgate_bridge.counters import FailureLog, OutboxHealth
from fedgate_bridge.errors import OutboxError

__all__ = [
    "AppendResult",
    "AsyncOutbox",
    "Outbox",
    "OutboxMessage",
    "OutboxSummary",
    "ParkedTopic",
    "Reading",
    "encode_payload",
    "read_outbox_summary",
    "read_parked_topics",
]

POLICIES: Final = ("drop_oldest", "reject_new")
_SCHEMA_VERSION: Final = 2  # 2 added ``parked``; a version 1 file is upgraded in place
_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        seq INTEGER NOT NULL,
        payload BLOB NOT NULL,
        UNIQUE (topic, seq))""",
    "CREATE TABLE IF NOT EXISTS streams (topic TEXT PRIMARY KEY, next_seq INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS parked (
        id INTEGER PRIMARY KEY,
        topic TEXT NOT NULL,
        seq INTEGER NOT NULL,
        payload BLOB NOT NULL,
        reason TEXT NOT NULL,
        parked_at REAL NOT NULL)""",
)
# SQLite result codes (the low byte of an extended code) of failures that can pass: another
# process holds the lock, the disk is full, an I/O error, the file turned read-only.
_TRANSIENT_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_CANTOPEN,
    }
)
_T = TypeVar("_T")
log = logging.getLogger("fedgate.bridge.outbox")


class Reading(msgspec.Struct, frozen=True, kw_only=True):
    """One value read from a source, before it has a sequence number."""

    topic: str  # <topic_prefix>/<source>/<tag>
    ts: float  # Unix seconds (UTC) when read
    value: float
    unit: str = ""


class OutboxMessage(msgspec.Struct, frozen=True):
    """One stored reading, ready to publish."""

    id: int
    topic: str
    seq: int
    payload: bytes


class AppendResult(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`Outbox.append` did with a batch."""

    stored: int  # readings now in the outbox, each with its stream's next seq
    dropped_oldest: int  # older rows deleted to make room (policy drop_oldest)
    rejected_new: int  # readings refused, no seq consumed (policy reject_new)


class OutboxSummary(msgspec.Struct, frozen=True, kw_only=True):
    """Depth and counters of an outbox file (what ``fedgate-bridge status`` shows)."""

    depth: int
    oldest_id: int | None
    streams: int
    dropped_oldest: int
    rejected_new: int
    parked: int = 0  # refused by the broker for good; sent again after a restart
    dropped_parked: int = 0  # parked rows deleted to make room for new readings


class ParkedTopic(msgspec.Struct, frozen=True, kw_only=True):
    """Parked readings of one topic (``fedgate-bridge status`` lists them)."""

    topic: str
    count: int
    reason: str  # the broker's reason for the newest of them
    last_parked_at: float  # Unix seconds


class _Payload(msgspec.Struct, frozen=True, omit_defaults=True):
    ts: float
    value: float
    seq: int
    unit: str = ""


_ENCODER: Final = msgspec.json.Encoder()


def encode_payload(reading: Reading, seq: int) -> bytes:
    """The MQTT payload: ``{"ts": .., "value": .., "seq": ..}`` plus ``"unit"`` if set."""
    return _ENCODER.encode(_Payload(ts=reading.ts, value=reading.value, seq=seq, unit=reading.unit))


def _connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        connection = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        # Owner and the service's group only; SQLite gives -wal and -shm the same mode.
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA busy_timeout = 5000")
    return connection


class Outbox:
    """The outbox file, opened for writing by one bridge process (synchronous API)."""

    def __init__(self, path: Path, *, max_messages: int, policy: str = "drop_oldest") -> None:
        if policy not in POLICIES:
            raise OutboxError(f"outbox policy {policy!r} is not one of {' | '.join(POLICIES)}")
        if max_messages < 1:
            raise OutboxError(f"outbox max_messages must be at least 1, got {max_messages}")
        self.path = path
        self.max_messages = max_messages
        self.policy = policy
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            self._db = _connect(path)
            self._open()
        except sqlite3.Error as exc:
            raise OutboxError(
                f"outbox {path} cannot be opened ({exc}); if the file is damaged, move it "
                "aside and set a new topic_prefix (sequence numbers restart at 0)"
            ) from None
        except OSError as exc:
            raise OutboxError(f"outbox directory {path.parent} is not usable: {exc}") from None

    def _open(self) -> None:
        db = self._db
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OutboxError(f"outbox {self.path} cannot use WAL mode (got {mode})")
        db.execute("PRAGMA synchronous = FULL")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise OutboxError(
                f"outbox {self.path} is damaged ({check}); move it aside and set a new "
                "topic_prefix (sequence numbers restart at 0)"
            )
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, 1, _SCHEMA_VERSION):
            raise OutboxError(
                f"outbox {self.path} has schema version {version}; this bridge knows "
                f"{_SCHEMA_VERSION}"
            )
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            self.requeued = _requeue_parked(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._depth = int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def depth(self) -> int:
        """Readings waiting for their PUBACK."""
        return self._depth

    def _write(self, work: Callable[[sqlite3.Connection], _T], *, durable: bool = True) -> _T:
        """Run ``work`` in one immediate transaction; any SQLite failure is an OutboxError.

        ``durable=False`` commits without waiting for the disk (``synchronous=NORMAL``):
        the next durable commit or checkpoint persists it. Used for deleting acknowledged
        rows, where losing the delete in a power cut only means sending them again.
        """
        with self._lock:
            db = self._db
            try:
                if not durable:
                    db.execute("PRAGMA synchronous = NORMAL")
                db.execute("BEGIN IMMEDIATE")
                try:
                    result = work(db)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise OutboxError(
                    f"outbox {self.path} write failed: {exc}", transient=_is_transient(exc)
                ) from None
            finally:
                if not durable:
                    db.execute("PRAGMA synchronous = FULL")
            return result

    def append(self, readings: Sequence[Reading]) -> AppendResult:
        """Store ``readings`` with their streams' next sequence numbers, in one transaction.

        When the outbox is full, the policy decides (see the module docstring).
        """
        if not readings:
            return AppendResult(stored=0, dropped_oldest=0, rejected_new=0)

        def work(db: sqlite3.Connection) -> AppendResult:
            depth = int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
            parked = int(db.execute("SELECT COUNT(*) FROM parked").fetchone()[0])
            batch = list(readings)
            dropped = rejected = 0
            # Parked rows make room first, whatever the policy: they wait for an operator,
            # the new readings can be delivered now.
            evicted = _delete_oldest(
                db, "parked", min(parked, depth + parked + len(batch) - self.max_messages)
            )
            _add_counter(db, "dropped_parked", evicted)
            held = depth + parked - evicted
            overflow = held + len(batch) - self.max_messages
            if overflow > 0 and self.policy == "reject_new":
                rejected = min(overflow, len(batch))
                batch = batch[: len(batch) - rejected]
            elif overflow > 0:
                if len(batch) > self.max_messages:  # keep the newest readings of a huge batch
                    dropped = len(batch) - self.max_messages
                    batch = batch[dropped:]
                # Every parked row has gone by now: only waiting rows are left to drop.
                dropped += _delete_oldest(db, "messages", held + len(batch) - self.max_messages)
            next_seq: dict[str, int] = {}
            rows: list[tuple[str, int, bytes]] = []
            for reading in batch:
                seq = next_seq.get(reading.topic)
                if seq is None:
                    row = db.execute(
                        "SELECT next_seq FROM streams WHERE topic = ?", (reading.topic,)
                    ).fetchone()
                    seq = 0 if row is None else int(row[0])
                rows.append((reading.topic, seq, encode_payload(reading, seq)))
                next_seq[reading.topic] = seq + 1
            db.executemany("INSERT INTO messages (topic, seq, payload) VALUES (?, ?, ?)", rows)
            db.executemany(
                "INSERT INTO streams (topic, next_seq) VALUES (?, ?) "
                "ON CONFLICT (topic) DO UPDATE SET next_seq = excluded.next_seq",
                list(next_seq.items()),
            )
            _add_counter(db, "dropped_oldest", dropped)
            _add_counter(db, "rejected_new", rejected)
            self._depth = int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
            return AppendResult(stored=len(batch), dropped_oldest=dropped, rejected_new=rejected)

        return self._write(work)

    def pending(self, *, after_id: int = 0, limit: int = 100) -> list[OutboxMessage]:
        """Up to ``limit`` stored messages with ``id > after_id``, oldest first."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, topic, seq, payload FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(
                    f"outbox {self.path} read failed: {exc}", transient=_is_transient(exc)
                ) from None
        return [OutboxMessage(int(r[0]), str(r[1]), int(r[2]), bytes(r[3])) for r in rows]

    def remove(self, ids: Iterable[int]) -> int:
        """Delete acknowledged messages; ids already gone (dropped by the cap) are ignored.

        Not fsynced on its own (see :meth:`_write`): after a power cut a deleted row may
        come back and be sent again, which the consumer's (topic, seq) dedup absorbs.
        """
        wanted = [(int(i),) for i in ids]
        if not wanted:
            return 0

        def work(db: sqlite3.Connection) -> int:
            before = db.total_changes
            db.executemany("DELETE FROM messages WHERE id = ?", wanted)
            removed = db.total_changes - before
            self._depth = int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
            return removed

        return self._write(work, durable=False)

    def park(self, refused: Sequence[tuple[int, str]]) -> int:
        """Move rows the broker refused for good (``(id, reason)``) to ``parked``.

        Durable: a parked row must not come back as pending after a power cut only to be
        refused again, nor be lost. Ids already gone are ignored. Returns the rows moved.
        """
        if not refused:
            return 0
        now = time.time()

        def work(db: sqlite3.Connection) -> int:
            moved = 0
            for row_id, reason in refused:
                moved += db.execute(
                    "INSERT INTO parked (id, topic, seq, payload, reason, parked_at) "
                    "SELECT id, topic, seq, payload, ?, ? FROM messages WHERE id = ?",
                    (reason, now, int(row_id)),
                ).rowcount
                db.execute("DELETE FROM messages WHERE id = ?", (int(row_id),))
            self._depth = int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
            return moved

        return self._write(work)

    def requeue(
        self, topic: str, reasons: Collection[str], *, limit: int | None = None
    ) -> list[int]:
        """Move ``topic``'s rows parked for one of ``reasons`` back to waiting, under their
        old ids, the oldest ``limit`` of them (all by default: the broker accepts the topic
        again; one: to try the topic); returns their ids, oldest first."""
        wanted = sorted(set(reasons))
        marks = ", ".join("?" * len(wanted))

        def work(db: sqlite3.Connection) -> list[int]:
            picked = (
                f"SELECT id FROM parked WHERE topic = ? AND reason IN ({marks}) ORDER BY id LIMIT ?"
            )
            params = (topic, *wanted, -1 if limit is None else limit)
            ids = [int(row_id) for (row_id,) in db.execute(picked, params)]
            db.execute(
                "INSERT INTO messages (id, topic, seq, payload) "
                f"SELECT id, topic, seq, payload FROM parked WHERE id IN ({picked}) ORDER BY id",
                params,
            )
            db.execute(f"DELETE FROM parked WHERE id IN ({picked})", params)
            self._depth = int(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
            return ids

        return self._write(work)

    def parked_topics(self) -> list[ParkedTopic]:
        """Parked readings grouped by topic, the most recently parked first."""
        with self._lock:
            return _parked_topics(self._db)

    def next_seqs(self) -> dict[str, int]:
        """The next sequence number of every stream seen so far."""
        with self._lock:
            rows = self._db.execute("SELECT topic, next_seq FROM streams").fetchall()
        return {str(topic): int(seq) for topic, seq in rows}

    def summary(self) -> OutboxSummary:
        with self._lock:
            return _summary(self._db)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _is_transient(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # no code: judge by the message SQLite gave
        return "locked" in str(exc) or "disk" in str(exc)
    return (int(code) & 0xFF) in _TRANSIENT_CODES


def _add_counter(db: sqlite3.Connection, name: str, amount: int) -> None:
    if amount:
        db.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (name, amount),
        )


def _requeue_parked(db: sqlite3.Connection) -> int:
    """Move every parked row back into ``messages`` under its old id (inside a transaction).

    A conflict cannot happen (ids and (topic, seq) are unique over both tables); should one
    appear, the INSERT fails and the outbox is not opened rather than a row deleted.
    """
    moved = db.execute(
        "INSERT INTO messages (id, topic, seq, payload) "
        "SELECT id, topic, seq, payload FROM parked ORDER BY id"
    ).rowcount
    db.execute("DELETE FROM parked")
    return int(moved)


def _delete_oldest(db: sqlite3.Connection, table: str, count: int) -> int:
    """Delete the ``count`` oldest rows of ``table`` (``messages`` or ``parked``; none when
    ``count`` <= 0); returns how many went."""
    if count <= 0:
        return 0
    assert table in ("messages", "parked")
    return int(
        db.execute(
            f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT ?)",
            (count,),
        ).rowcount
    )


def _parked_topics(db: sqlite3.Connection) -> list[ParkedTopic]:
    if db.execute(_HAS_PARKED_TABLE).fetchone() is None:
        return []  # a version 1 file that no bridge has opened since the upgrade
    rows = db.execute(
        "SELECT topic, COUNT(*), MAX(parked_at), "
        "(SELECT reason FROM parked AS p WHERE p.topic = parked.topic "
        " ORDER BY parked_at DESC, id DESC LIMIT 1) "
        "FROM parked GROUP BY topic ORDER BY MAX(parked_at) DESC, topic"
    ).fetchall()
    return [
        ParkedTopic(topic=str(t), count=int(n), reason=str(r), last_parked_at=float(at))
        for t, n, at, r in rows
    ]


def _summary(db: sqlite3.Connection) -> OutboxSummary:
    depth, oldest = db.execute("SELECT COUNT(*), MIN(id) FROM messages").fetchone()
    streams = db.execute("SELECT COUNT(*) FROM streams").fetchone()[0]
    counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
    parked = 0
    if db.execute(_HAS_PARKED_TABLE).fetchone() is not None:
        parked = int(db.execute("SELECT COUNT(*) FROM parked").fetchone()[0])
    return OutboxSummary(
        depth=int(depth),
        oldest_id=None if oldest is None else int(oldest),
        streams=int(streams),
        dropped_oldest=int(counters.get("dropped_oldest", 0)),
        rejected_new=int(counters.get("rejected_new", 0)),
        parked=parked,
        dropped_parked=int(counters.get("dropped_parked", 0)),
    )


def read_outbox_summary(path: Path) -> OutboxSummary | None:
    """Depth and counters of the outbox at ``path``, read-only; None if it does not exist.

    Safe while a bridge is running (WAL readers do not block the writer).
    """
    if not path.exists():
        return None
    try:
        db = _connect(path, read_only=True)
        try:
            if db.execute(_HAS_MESSAGES_TABLE).fetchone() is None:
                return None  # a bridge is creating the file right now
            return _summary(db)
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise OutboxError(f"outbox {path} cannot be read: {exc}") from None


def read_parked_topics(path: Path) -> list[ParkedTopic]:
    """The outbox's parked readings by topic, read-only; [] if there is no outbox."""
    if not path.exists():
        return []
    try:
        db = _connect(path, read_only=True)
        try:
            return _parked_topics(db)
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise OutboxError(f"outbox {path} cannot be read: {exc}") from None


_HAS_MESSAGES_TABLE = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
_HAS_PARKED_TABLE = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'parked'"


class AsyncOutbox:
    """An :class:`Outbox` used from asyncio: every call runs on one dedicated thread.

    ``async with AsyncOutbox.open(...) as outbox:`` opens the file on that thread and
    closes it (and the thread) on exit. A call that fails transiently (see the module
    docstring) is retried with backoff until it succeeds; each failure is counted in
    :attr:`health` and logged rate-limited. The caller simply waits: a source stops polling
    and the publisher stops sending until the outbox can be written again.
    """

    def __init__(
        self,
        outbox: Outbox,
        executor: ThreadPoolExecutor,
        *,
        backoff: Backoff | None = None,
        health: OutboxHealth | None = None,
    ) -> None:
        self.outbox = outbox
        self._executor = executor
        self._backoff = backoff or Backoff(initial_s=0.5, max_s=30.0)
        self.health = OutboxHealth() if health is None else health
        self._failures = FailureLog(log, what="outbox", path=str(outbox.path))
        self._last_summary: OutboxSummary | None = None

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        max_messages: int,
        policy: str,
        backoff: Backoff | None = None,
        health: OutboxHealth | None = None,
    ) -> AsyncOutbox:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedgate-outbox")
        loop = asyncio.get_running_loop()
        try:
            outbox = await loop.run_in_executor(
                executor, lambda: Outbox(path, max_messages=max_messages, policy=policy)
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(outbox, executor, backoff=backoff, health=health)

    async def __aenter__(self) -> AsyncOutbox:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.outbox.close)
        self._executor.shutdown(wait=True)

    async def _once(self, work: Callable[[], _T]) -> _T:
        # Shielded: a cancelled caller must not leave a transaction half-observed; the
        # thread finishes the call either way and the result is simply dropped.
        future = asyncio.get_running_loop().run_in_executor(self._executor, work)
        future.add_done_callback(_retrieve)  # an abandoned call's error is not "unretrieved"
        return await asyncio.shield(future)

    async def _call(self, work: Callable[[], _T], *, writes: bool = True) -> _T:
        """Run ``work``, retrying transient failures; only a write that succeeds ends a
        failing streak (in WAL mode reads go on working while writes are locked out)."""
        attempt = 0
        while True:
            try:
                result = await self._once(work)
            except OutboxError as exc:
                if not exc.transient:
                    raise
                self._failed(str(exc))
                await asyncio.sleep(self._backoff.delay(attempt, random.random()))
                attempt += 1
                continue
            if writes and self.health.failing:
                self.health.failing = False
                self._failures.success()
            return result

    def _failed(self, error: str) -> None:
        health = self.health
        health.failing = True
        health.failures += 1
        health.last_error = error
        health.last_error_at = time.time()
        self._failures.failure(error)

    @property
    def depth(self) -> int:
        return self.outbox.depth

    async def append(self, readings: Sequence[Reading]) -> AppendResult:
        return await self._call(lambda: self.outbox.append(readings))

    async def pending(self, *, after_id: int = 0, limit: int = 100) -> list[OutboxMessage]:
        return await self._call(
            lambda: self.outbox.pending(after_id=after_id, limit=limit), writes=False
        )

    async def remove(self, ids: Sequence[int]) -> int:
        return await self._call(lambda: self.outbox.remove(ids))

    async def park(self, refused: Sequence[tuple[int, str]]) -> int:
        return await self._call(lambda: self.outbox.park(refused))

    async def requeue(
        self, topic: str, reasons: Collection[str], *, limit: int | None = None
    ) -> list[int]:
        return await self._call(lambda: self.outbox.requeue(topic, reasons, limit=limit))

    async def summary(self) -> OutboxSummary:
        """The current summary; while the outbox fails, the last one read (not retried:
        ``status.json`` must go on being written)."""
        try:
            summary = await self._once(self.outbox.summary)
        except (OutboxError, sqlite3.Error) as exc:
            if self._last_summary is None:
                raise OutboxError(f"outbox {self.outbox.path} cannot be read: {exc}") from None
            return self._last_summary
        self._last_summary = summary
        return summary
