"""The SQLite ingest buffer on real files: dedup, both cap policies, counters consistent with
the rows (also across kill -9), read-only stats beside a writer, corruption quarantined."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fedgate_agent.ingest.buffer import (
    FILE_MODE,
    REJECTED_KEEP,
    REJECTED_PAYLOAD_BYTES,
    BufferSettings,
    CapPolicy,
    IngestBuffer,
    InsertResult,
    RejectedPayload,
)
from fedgate_agent.ingest.errors import BufferCorrupted, BufferPathForeign, IngestError
from fedgate_agent.ingest.samples import Sample
from fedgate_agent.ingest.wal_check import wal_damage


def sample(seq: int, *, source: str = "mqtt:a", tag: str = "T1", ts: float | None = None) -> Sample:
    return Sample(
        source=source, seq=seq, tag=tag, ts=1000.0 + seq if ts is None else ts, value=seq * 0.5
    )


def open_buffer(
    path: Path, max_samples: int = 1000, policy: CapPolicy = CapPolicy.REJECT_NEW
) -> IngestBuffer:
    return IngestBuffer.open(BufferSettings(path, max_samples=max_samples, policy=policy))


def rows(path: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT source, seq FROM samples ORDER BY id").fetchall()


def assert_consistent(path: Path) -> dict[str, int]:
    """Counters, per-source and per-tag counts all agree with the rows in the file."""
    with sqlite3.connect(path) as db:
        stored = db.execute("SELECT count(*) FROM samples").fetchone()[0]
        counters = dict(db.execute("SELECT name, value FROM counters").fetchall())
        by_source = dict(
            db.execute("SELECT source, count(*) FROM samples GROUP BY source").fetchall()
        )
        sources = dict(
            db.execute("SELECT source, samples FROM sources WHERE samples > 0").fetchall()
        )
        by_tag = dict(db.execute("SELECT tag, count(*) FROM samples GROUP BY tag").fetchall())
        tags = dict(db.execute("SELECT tag, samples FROM tags WHERE samples > 0").fetchall())
    assert counters.get("inserted", 0) - counters.get("dropped_oldest", 0) == stored
    assert sources == by_source
    assert tags == by_tag
    return counters


def test_duplicates_are_counted_not_stored(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with open_buffer(path) as buffer:
        assert buffer.insert([sample(0), sample(1), sample(2)]) == InsertResult(3, 0, 0, 0)
        # a redelivery of 1 and 2, a new 3, and 3 again inside the same batch
        assert buffer.insert([sample(1), sample(2), sample(3), sample(3)]) == InsertResult(
            1, 3, 0, 0
        )
        # the same seq on another source is another sample
        assert buffer.insert([sample(1, source="mqtt:b")]) == InsertResult(1, 0, 0, 0)
        stats = buffer.stats()
    assert stats.samples == 5
    assert stats.counters == {"inserted": 5, "duplicates": 3}
    assert stats.sources["mqtt:a"].samples == 4
    assert stats.sources["mqtt:a"].last_seq == 3
    assert stats.sources["mqtt:a"].last_ts == 1003.0
    assert stats.sources["mqtt:b"].samples == 1
    assert rows(path) == [("mqtt:a", 0), ("mqtt:a", 1), ("mqtt:a", 2), ("mqtt:a", 3), ("mqtt:b", 1)]
    assert_consistent(path)


def test_reject_new_refuses_what_does_not_fit_but_still_recognises_duplicates(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buffer.db"
    with open_buffer(path, max_samples=5) as buffer:
        assert buffer.insert([sample(i) for i in range(3)]) == InsertResult(3, 0, 0, 0)
        # room for 2: 0 is a duplicate (takes no room), 3 and 4 fit, 5 and 6 do not
        result = buffer.insert([sample(0), sample(3), sample(4), sample(5), sample(6)])
        assert result == InsertResult(inserted=2, duplicates=1, rejected_full=2, dropped_oldest=0)
        # full: a redelivered stored sample is a duplicate, a new one is refused
        assert buffer.insert([sample(4), sample(7), sample(7)]) == InsertResult(0, 2, 1, 0)
        stats = buffer.stats()
    assert stats.samples == 5
    assert stats.policy is CapPolicy.REJECT_NEW
    assert stats.counters == {"inserted": 5, "duplicates": 3, "rejected_full": 3}
    assert [seq for _, seq in rows(path)] == [0, 1, 2, 3, 4]
    assert_consistent(path)


def test_drop_oldest_keeps_the_newest_and_counts_what_it_dropped(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with open_buffer(path, max_samples=5, policy=CapPolicy.DROP_OLDEST) as buffer:
        buffer.insert([sample(i, tag="OLD") for i in range(3)])
        result = buffer.insert([sample(i, source="mqtt:b", tag="NEW") for i in range(4)])
        assert result == InsertResult(inserted=4, duplicates=0, rejected_full=0, dropped_oldest=2)
        assert buffer.tags() == ["NEW", "OLD"]
        # a batch larger than the cap keeps its own newest rows
        result = buffer.insert([sample(i, source="mqtt:c", tag="NEWEST") for i in range(7)])
        assert result == InsertResult(7, 0, 0, 7)
        assert buffer.tags() == ["NEWEST"]
        stats = buffer.stats()
    assert stats.samples == 5
    assert stats.counters == {"inserted": 14, "dropped_oldest": 9}
    assert stats.sources["mqtt:a"].samples == 0
    assert rows(path) == [("mqtt:c", i) for i in range(2, 7)]
    assert_consistent(path)


def test_read_series_per_tag_sorted_by_time_within_bounds(tmp_path: Path) -> None:
    with open_buffer(tmp_path / "buffer.db") as buffer:
        # arrives out of order, two tags, two sources for T1
        buffer.insert([sample(2, ts=30.0), sample(0, ts=10.0), sample(1, tag="T2", ts=5.0)])
        buffer.insert([sample(7, source="mqtt:b", ts=20.0)])
        series = buffer.read_series(["T1", "T2", "NONE"])
        window = buffer.read_series(["T1"], start=10.0, end=30.0)
        assert buffer.tags() == ["T1", "T2"]
    ts, values = series["T1"]
    assert ts.dtype == np.float64
    assert ts.tolist() == [10.0, 20.0, 30.0]
    assert values.tolist() == [0.0, 3.5, 1.0]
    assert series["T2"][0].tolist() == [5.0]
    assert series["NONE"][0].shape == (0,)
    assert series["NONE"][1].shape == (0,)
    assert window["T1"][0].tolist() == [10.0, 20.0]  # start inclusive, end exclusive


def test_rejected_payloads_are_counted_and_the_last_kept_truncated(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with open_buffer(path) as buffer:
        buffer.count_rejected("mqtt:a", "not_json", b"x" * 5000)
        buffer.count_rejected("mqtt:a", "not_finite", b"NaN", n=3)
        with sqlite3.connect(path) as db:
            kept = db.execute("SELECT length(payload), payload_bytes FROM rejected").fetchall()
        assert kept == [(REJECTED_PAYLOAD_BYTES, 5000), (3, 3), (3, 3), (3, 3)]
        flood = [
            RejectedPayload("mqtt:b", "wrong_type", str(i).encode())
            for i in range(REJECTED_KEEP + 5)
        ]
        result = buffer.insert([sample(0)], rejected=flood)
        assert result.inserted == 1
        stats = buffer.stats()
    assert stats.counters["rejected_not_json"] == 1
    assert stats.counters["rejected_not_finite"] == 3
    assert stats.counters["rejected_wrong_type"] == REJECTED_KEEP + 5
    newest = RejectedPayload("mqtt:b", "wrong_type", str(REJECTED_KEEP + 4).encode())
    assert stats.last_rejected[0] == newest
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM rejected").fetchone()[0] == REJECTED_KEEP
        oldest = db.execute("SELECT payload FROM rejected ORDER BY id LIMIT 1").fetchone()[0]
    assert oldest == b"5"  # the 1,000 newest of the flood


def test_read_only_stats_beside_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with open_buffer(path, max_samples=77, policy=CapPolicy.DROP_OLDEST) as writer:
        writer.insert([sample(i) for i in range(10)])
        with IngestBuffer.open_read_only(path) as reader:
            assert reader.stats().samples == 10
            writer.insert([sample(i) for i in range(10, 15)])
            stats = reader.stats()
            assert stats.samples == 15
            assert stats.max_samples == 77
            assert stats.policy is CapPolicy.DROP_OLDEST
            assert stats.counters["inserted"] == 15
            assert stats.db_bytes > 0
            assert reader.read_series(["T1"])["T1"][0].size == 15
            with pytest.raises(IngestError, match="read-only"):
                reader.insert([sample(99)])
    with pytest.raises(IngestError, match="no buffer"):
        IngestBuffer.open_read_only(tmp_path / "missing.db")


def test_schema_is_plain_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    open_buffer(path).close()
    with sqlite3.connect(path) as db:
        tables = {
            name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        journal = db.execute("PRAGMA journal_mode").fetchone()[0]
        plan = " ".join(
            str(row[-1])
            for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT ts, value FROM samples "
                "WHERE tag = 'x' AND ts >= 0 ORDER BY ts"
            )
        )
    assert {"samples", "counters", "rejected", "meta", "sources", "tags", "quarantine"} <= tables
    assert meta["schema_version"] == "1"
    assert journal == "wal"
    assert "samples_by_tag_ts" in plan


def _corrupt_pages(path: Path, first: int = 1) -> None:
    """Keep SQLite's header (and the pages before ``first``), overwrite the first bytes of
    every later page with junk."""
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    for offset in range(first * page_size, len(data), page_size):
        data[offset : offset + 64] = b"\xa5" * 64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["not_sqlite", "damaged_pages"])
def test_a_corrupted_file_is_quarantined_and_a_new_buffer_works(
    tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "buffer.db"
    with open_buffer(path) as buffer:
        buffer.insert([sample(i) for i in range(3000)])
    if damage == "not_sqlite":
        path.write_bytes(os.urandom(8192))
    else:
        _corrupt_pages(path)
    if damage == "not_sqlite":  # (SQLite itself discards an invalid WAL of a sound header)
        (tmp_path / "buffer.db-wal").write_bytes(b"stale wal")
    original = path.read_bytes()

    with open_buffer(path) as buffer:
        moved = buffer.quarantined
        assert moved is not None
        assert moved.name.startswith("buffer.db.corrupt-")
        assert moved.read_bytes() == original
        if damage == "not_sqlite":
            assert Path(f"{moved}-wal").read_bytes() == b"stale wal"
        assert buffer.insert([sample(1)]) == InsertResult(1, 0, 0, 0)
        stats = buffer.stats()
    assert stats.samples == 1
    assert [q.moved_to for q in stats.quarantined] == [moved]
    assert stats.quarantined[0].reason
    # the next start finds a sound file and moves nothing
    with open_buffer(path) as buffer:
        assert buffer.quarantined is None
        assert buffer.stats().samples == 1


def test_a_file_that_was_never_a_buffer_is_left_as_it_is(tmp_path: Path) -> None:
    """A mistyped buffer path naming some other file (not SQLite, not whole pages) is
    refused, not moved aside; another application's SQLite database is not written."""
    text = tmp_path / "line3.csv"
    text.write_text("timestamp,T1\n2026-11-01T00:00:00Z,1.5\n" * 31)
    before = text.read_bytes()
    with pytest.raises(BufferPathForeign, match="not an SQLite database, nor a damaged one"):
        open_buffer(text)
    assert text.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["line3.csv"]

    other = tmp_path / "historian.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE readings(ts REAL, value REAL)")
        db.execute("INSERT INTO readings VALUES (1.0, 2.0)")
    db.close()
    before = other.read_bytes()
    with pytest.raises(BufferPathForeign, match=r"another SQLite database \(tables readings\)"):
        open_buffer(other)
    with sqlite3.connect(other) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master")]
    db.close()
    assert tables == ["readings"]
    assert not list(tmp_path.glob("historian.db.corrupt-*"))


def test_read_only_open_reports_corruption_without_moving_the_file(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    path.write_bytes(b"definitely not SQLite" * 100)
    with pytest.raises(IngestError, match="not an SQLite database"):
        IngestBuffer.open_read_only(path)
    assert path.exists()


def test_read_only_reads_of_damaged_pages_are_buffer_corrupted(tmp_path: Path) -> None:
    """The read-only open checks the header only; the damaged pages show when a read reaches
    them, and that is a typed error naming the way out, with the file left in place."""
    path = tmp_path / "buffer.db"
    with open_buffer(path) as buffer:
        buffer.insert([sample(i) for i in range(3000)])
    _corrupt_pages(path, first=4)  # the schema and meta still read: the open succeeds
    damaged = path.read_bytes()
    with IngestBuffer.open_read_only(path) as buffer:
        with pytest.raises(BufferCorrupted, match="moves it aside"):
            buffer.stats()
        with pytest.raises(BufferCorrupted):
            buffer.tags()
        with pytest.raises(BufferCorrupted):
            buffer.read_series([sample(0).tag])
    assert path.read_bytes() == damaged


WRITER = """
import sys
from pathlib import Path
from fedgate_agent.ingest.buffer import BufferSettings, CapPolicy, IngestBuffer
from fedgate_agent.ingest.samples import Sample
settings = BufferSettings(Path(sys.argv[1]), max_samples=4000, policy=CapPolicy(sys.argv[2]))
buffer = IngestBuffer.open(settings)
seq = 0
print("ready", flush=True)
while True:
    # every batch repeats the previous batch's last 50 (redeliveries) and adds 200 new
    seqs = range(max(0, seq - 50), seq + 200)
    buffer.insert([Sample("mqtt:k", s, "K", 1.0 + s, float(s)) for s in seqs])
    seq += 200
"""


@pytest.mark.parametrize("policy", [CapPolicy.REJECT_NEW, CapPolicy.DROP_OLDEST])
def test_counters_stay_consistent_with_rows_across_kill_9(
    tmp_path: Path, policy: CapPolicy
) -> None:
    path = tmp_path / "buffer.db"
    for _ in range(3):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), policy.value], stdout=subprocess.PIPE
        )
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"ready\n"
        time.sleep(0.3)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        counters = assert_consistent(path)
        assert counters["inserted"] > 0
    with open_buffer(path, max_samples=4000, policy=policy) as buffer:
        assert buffer.quarantined is None
        assert buffer.stats().samples == len(rows(path))


def test_unusable_paths_and_foreign_schema_versions_are_ingest_errors(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="cannot open the buffer"):
        open_buffer(tmp_path)  # a directory
    path = tmp_path / "buffer.db"
    open_buffer(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(IngestError, match="schema version 99"):
        open_buffer(path)
    assert path.exists()  # not corrupt: left alone, not quarantined


def test_two_writers_on_one_file_share_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    with open_buffer(path, max_samples=5) as first, open_buffer(path, max_samples=5) as second:
        assert first.insert([sample(i) for i in range(3)]).inserted == 3
        result = second.insert([sample(i, source="mqtt:b") for i in range(3)])
        assert result == InsertResult(inserted=2, duplicates=0, rejected_full=1, dropped_oldest=0)
        assert first.insert([sample(9)]).rejected_full == 1
        assert first.stats() == second.stats()
    assert_consistent(path)


def test_a_new_buffer_file_is_not_world_readable(tmp_path: Path) -> None:
    path = tmp_path / "ingest" / "buffer.db"
    with IngestBuffer.open(BufferSettings(path)) as buffer:
        buffer.insert([Sample("mqtt:a", 0, "A", 1.0, 1.0)])
        assert path.stat().st_mode & 0o777 == FILE_MODE & ~_umask()
        wal = path.with_name(path.name + "-wal")
        assert not wal.exists() or wal.stat().st_mode & 0o007 == 0


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


BATCHES = """
import sys, time
from pathlib import Path
from fedgate_agent.ingest.buffer import BufferSettings, IngestBuffer
from fedgate_agent.ingest.samples import Sample
buffer = IngestBuffer.open(BufferSettings(Path(sys.argv[1]), max_samples=10_000))
for batch in range(60):  # 60 transactions, each synced: acknowledged readings
    buffer.insert([Sample("mqtt:w", batch, "W", 1.0 + batch, float(batch))])
print("committed", flush=True)
time.sleep(60)
"""


def _killed_after_60_commits(path: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", BATCHES, str(path)], stdout=subprocess.PIPE)
    assert writer.stdout is not None
    assert writer.stdout.readline() == b"committed\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait()


def _frame_offset(wal: bytes, frame: int) -> int:
    page_size = int.from_bytes(wal[8:12], "big")
    return 32 + (frame - 1) * (24 + page_size)


@pytest.mark.parametrize("damage", ["none", "torn tail", "frame 3", "salt of frame 3", "header"])
def test_a_damaged_write_ahead_log_is_reported_and_kept(tmp_path: Path, damage: str) -> None:
    """SQLite replays a log only up to a damaged frame and drops the committed transactions
    after it without a word; the buffer used to open as if nothing had happened."""
    path = tmp_path / "buffer.db"
    _killed_after_60_commits(path)
    wal_path = tmp_path / "buffer.db-wal"
    wal = bytearray(wal_path.read_bytes())
    assert wal_damage(bytes(wal)) is None  # a sound log after kill -9
    if damage == "torn tail":  # a frame of a transaction the crash cut off before its commit
        page_size = int.from_bytes(wal[8:12], "big")
        last = wal[-(24 + page_size) :]
        torn = last[:4] + (0).to_bytes(4, "big") + last[8:24] + os.urandom(page_size)
        wal += torn
    elif damage == "frame 3":
        wal[_frame_offset(bytes(wal), 3) + 24 + 200] ^= 0xFF
    elif damage == "salt of frame 3":
        wal[_frame_offset(bytes(wal), 3) + 8] ^= 0x01
    elif damage == "header":  # SQLite then ignores the whole log
        wal[17] ^= 0x01
    wal_path.write_bytes(bytes(wal))
    with open_buffer(path) as buffer:
        samples = buffer.stats().samples
        quarantined = buffer.quarantined
    if damage not in ("none", "torn tail"):
        assert samples < 60  # what SQLite dropped
        assert quarantined is not None
        assert quarantined.name.startswith("buffer.db.wal-damaged-")
        assert Path(f"{quarantined}-wal").read_bytes() == bytes(wal)  # the evidence, whole
        _killed_after_60_commits(path)  # more readings, another crash: nothing new to report
        with open_buffer(path) as buffer:
            assert buffer.stats().samples == 60  # the same 60 again: what was lost is back
        assert len(list(tmp_path.glob("*wal-damaged*[!l]"))) == 1
    else:
        assert samples == 60
        assert quarantined is None
        assert not list(tmp_path.glob("*wal-damaged*"))
