"""The on-disk outbox: sequence numbers, durability, the size cap, damaged files."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fedgate_bridge.errors import OutboxError
from fedgate_bridge.outbox import (
    AsyncOutbox,
    Outbox,
    Reading,
    read_outbox_summary,
    read_parked_topics,
)
from fedgate_common.backoff import Backoff


def readings(*topics: str, ts: float = 1.0, value: float = 2.5, unit: str = "") -> list[Reading]:
    return [Reading(topic=topic, ts=ts, value=value, unit=unit) for topic in topics]


def test_seq_counts_per_topic_from_zero_and_payload_has_the_contract_fields(
    tmp_path: Path,
) -> None:
    with Outbox(tmp_path / "outbox.db", max_messages=100) as outbox:
        result = outbox.append(readings("p/s/a", "p/s/b", "p/s/a"))
        assert (result.stored, result.dropped_oldest, result.rejected_new) == (3, 0, 0)
        outbox.append([Reading(topic="p/s/a", ts=1700000000.25, value=-1.5, unit="bar")])
        rows = outbox.pending()
    assert [(r.topic, r.seq) for r in rows] == [
        ("p/s/a", 0),
        ("p/s/b", 0),
        ("p/s/a", 1),
        ("p/s/a", 2),
    ]
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert json.loads(rows[0].payload) == {"ts": 1.0, "value": 2.5, "seq": 0}  # no empty unit
    assert json.loads(rows[3].payload) == {
        "ts": 1700000000.25,
        "value": -1.5,
        "seq": 2,
        "unit": "bar",
    }


def test_seq_survives_reopen_and_is_never_reused_after_rows_are_acknowledged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, max_messages=100) as outbox:
        outbox.append(readings("t/x", "t/x", "t/y"))
        first_ids = [r.id for r in outbox.pending()]
        assert outbox.remove(first_ids) == 3
        assert outbox.depth == 0
    with Outbox(path, max_messages=100) as outbox:
        assert outbox.next_seqs() == {"t/x": 2, "t/y": 1}
        outbox.append(readings("t/x", "t/y"))
        rows = outbox.pending()
        assert [(r.topic, r.seq) for r in rows] == [("t/x", 2), ("t/y", 1)]
        assert min(r.id for r in rows) > max(first_ids)  # ids are never reused either
        assert outbox.remove([*first_ids, rows[0].id]) == 1  # already-gone ids are ignored
        assert outbox.depth == 1


def test_pending_pages_oldest_first(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_messages=100) as outbox:
        outbox.append(readings(*[f"t/{i}" for i in range(10)]))
        page1 = outbox.pending(limit=4)
        page2 = outbox.pending(after_id=page1[-1].id, limit=4)
        page3 = outbox.pending(after_id=page2[-1].id, limit=4)
    assert [r.topic for r in page1 + page2 + page3] == [f"t/{i}" for i in range(10)]


def test_wal_and_full_synchronous(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_messages=10) as outbox:
        db = outbox._db
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        outbox.append(readings("t/a"))
        with pytest.raises(sqlite3.IntegrityError):  # UNIQUE(topic, seq) backs the counter
            db.execute("INSERT INTO messages (topic, seq, payload) VALUES ('t/a', 0, x'00')")


def test_drop_oldest_keeps_the_newest_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, max_messages=5, policy="drop_oldest") as outbox:
        for _ in range(3):
            outbox.append(readings("t/a", "t/a", "t/a"))
        assert outbox.depth == 5
        assert [r.seq for r in outbox.pending()] == [4, 5, 6, 7, 8]
        big = outbox.append(readings(*["t/b"] * 7))  # a batch larger than the whole cap
        assert big.stored == 5
        assert [r.topic for r in outbox.pending()] == ["t/b"] * 5
        assert outbox.depth == 5
    summary = read_outbox_summary(path)
    assert summary is not None
    assert summary.depth == 5
    assert summary.dropped_oldest == 4 + 5 + 2
    assert summary.rejected_new == 0


def test_reject_new_refuses_without_consuming_seq(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_messages=4, policy="reject_new") as outbox:
        outbox.append(readings("t/a", "t/a", "t/a"))
        result = outbox.append(readings("t/a", "t/a", "t/a"))
        assert (result.stored, result.rejected_new) == (1, 2)
        assert outbox.append(readings("t/a")).rejected_new == 1
        outbox.remove([r.id for r in outbox.pending()])
        outbox.append(readings("t/a"))
        assert [r.seq for r in outbox.pending()] == [4]  # 0..3 stored, rejected got none
        assert outbox.summary().rejected_new == 3


def test_damaged_or_foreign_files_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError, match="cannot be opened"):
        Outbox(garbage, max_messages=10)
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(OutboxError, match="schema version 99"):
        Outbox(newer, max_messages=10)
    with pytest.raises(OutboxError, match="policy"):
        Outbox(tmp_path / "x.db", max_messages=10, policy="keep_all")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutboxError, match="not usable"):
        Outbox(blocker / "sub" / "o.db", max_messages=10)


def test_summary_reads_a_live_outbox_read_only(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    assert read_outbox_summary(path) is None
    with Outbox(path, max_messages=10) as outbox:
        outbox.append(readings("t/a", "t/b"))
        summary = read_outbox_summary(path)
        assert summary is not None
        assert (summary.depth, summary.streams) == (2, 2)
        outbox.append(readings("t/c"))  # the reader did not lock the writer out
    assert (read_outbox_summary(path) or summary).depth == 3


async def test_async_outbox_runs_on_its_own_thread(tmp_path: Path) -> None:
    async with await AsyncOutbox.open(
        tmp_path / "o.db", max_messages=10, policy="drop_oldest"
    ) as outbox:
        await outbox.append(readings("t/a", "t/a"))
        rows = await outbox.pending()
        assert [r.seq for r in rows] == [0, 1]
        assert await outbox.remove([rows[0].id]) == 1
        assert outbox.depth == 1
        assert (await outbox.summary()).depth == 1


def test_parked_rows_wait_apart_and_return_under_their_ids_at_the_next_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, max_messages=4) as outbox:
        outbox.append(readings("t/ok", "t/no", "t/ok", "t/no"))
        rows = outbox.pending()
        refused = [(r.id, "Not authorized") for r in rows if r.topic == "t/no"]
        assert outbox.park(refused) == 2
        assert outbox.park(refused) == 0  # already parked: nothing moves twice
        assert [r.topic for r in outbox.pending()] == ["t/ok", "t/ok"]
        assert outbox.depth == 2
        summary = outbox.summary()
        assert (summary.depth, summary.parked) == (2, 2)
        [topic] = outbox.parked_topics()
        assert (topic.topic, topic.count, topic.reason) == ("t/no", 2, "Not authorized")
        outbox.remove([r.id for r in outbox.pending()])
        # The cap counts parked rows too: 2 parked + 3 new is one over, and the oldest
        # parked row makes room (the new readings can be delivered, it cannot for now).
        result = outbox.append(readings("t/no", "t/no", "t/no"))
        assert (result.stored, result.dropped_oldest) == (3, 0)
        outbox.park([(r.id, "Topic Name invalid") for r in outbox.pending()])
        summary = outbox.summary()
        assert (summary.depth, summary.parked, summary.dropped_parked) == (0, 4, 1)
        assert outbox.parked_topics()[0].reason == "Topic Name invalid"  # the newest reason
    with Outbox(path, max_messages=4) as outbox:  # a restart: parked rows go again
        assert outbox.requeued == 4
        again = outbox.pending()
        assert [(r.topic, r.seq) for r in again] == [("t/no", n) for n in (1, 2, 3, 4)]
        assert [r.id for r in again] == [rows[3].id + n for n in range(4)]  # the old ids
        assert outbox.summary().parked == 0
        assert outbox.next_seqs() == {"t/ok": 2, "t/no": 5}  # no seq reused or skipped
        # Back under the cap they came from: the next reading drops one, not four.
        assert outbox.append(readings("t/ok")).dropped_oldest == 1
        assert outbox.depth == 4


def test_parked_rows_never_crowd_out_new_readings(tmp_path: Path) -> None:
    for policy in ("reject_new", "drop_oldest"):
        with Outbox(tmp_path / f"{policy}.db", max_messages=4, policy=policy) as outbox:
            outbox.append(readings("t/ok", "t/no", "t/no", "t/no"))
            outbox.park([(r.id, "Not authorized") for r in outbox.pending() if r.topic == "t/no"])
            result = outbox.append(readings("t/ok", "t/ok"))  # full: 1 waiting + 3 parked
            assert (result.stored, result.rejected_new, result.dropped_oldest) == (2, 0, 0)
            summary = outbox.summary()
            assert (summary.depth, summary.parked, summary.dropped_parked) == (3, 1, 2)
            result = outbox.append(readings("t/ok", "t/ok"))  # only then the policy acts
            assert (result.rejected_new + result.dropped_oldest) == 1, policy
            assert outbox.summary().parked == 0


def test_a_topic_accepted_again_gets_its_parked_rows_back(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_messages=10) as outbox:
        outbox.append(readings("t/a", "t/b", "t/a", "t/a"))
        rows = outbox.pending()
        outbox.park([(r.id, "Not authorized") for r in rows[:3]])
        outbox.park([(rows[3].id, "Payload format invalid")])  # not a topic-wide refusal
        assert outbox.requeue("t/a", {"Not authorized", "Topic name invalid"}) == [
            rows[0].id,
            rows[2].id,
        ]
        assert [(r.id, r.topic) for r in outbox.pending()] == [
            (rows[0].id, "t/a"),
            (rows[2].id, "t/a"),
        ]
        assert outbox.summary().parked == 2  # t/b, and the payload the broker cannot take


def test_a_topic_is_tried_with_its_oldest_parked_row(tmp_path: Path) -> None:
    refusals = {"Not authorized", "Topic name invalid"}
    with Outbox(tmp_path / "o.db", max_messages=10) as outbox:
        outbox.append(readings("t/a", "t/a", "t/a"))
        rows = outbox.pending()
        outbox.park([(r.id, "Not authorized") for r in rows])
        assert outbox.requeue("t/a", refusals, limit=1) == [rows[0].id]
        assert [r.id for r in outbox.pending()] == [rows[0].id]
        assert outbox.summary().parked == 2
        assert outbox.requeue("t/a", refusals) == [rows[1].id, rows[2].id]
        assert outbox.summary().parked == 0


def test_a_version_1_outbox_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, max_messages=10) as outbox:
        outbox.append(readings("t/a"))
    with sqlite3.connect(path) as db:  # what a bridge before the parked table left behind
        db.execute("DROP TABLE parked")
        db.execute("PRAGMA user_version = 1")
    assert read_parked_topics(path) == []
    summary = read_outbox_summary(path)
    assert summary is not None
    assert (summary.depth, summary.parked) == (1, 0)
    with Outbox(path, max_messages=10) as outbox:
        assert [r.seq for r in outbox.pending()] == [0]
        assert outbox.parked_topics() == []
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2


async def test_a_full_disk_is_waited_out_and_the_batch_stored(tmp_path: Path) -> None:
    fast = Backoff(initial_s=0.02, factor=2.0, max_s=0.1)
    async with await AsyncOutbox.open(
        tmp_path / "o.db", max_messages=100_000, policy="drop_oldest", backoff=fast
    ) as outbox:
        await outbox.append(readings("t/a"))
        db = outbox.outbox._db
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk is full"
        big = [Reading(topic="t/a", ts=1.0, value=float(i)) for i in range(5_000)]
        storing = asyncio.create_task(outbox.append(big))
        await asyncio.sleep(0.5)
        assert not storing.done()  # waiting, not failed
        assert outbox.health.failing
        assert "full" in outbox.health.last_error
        assert (await outbox.summary()).depth == 1  # the status still reads
        db.execute("PRAGMA max_page_count = 1073741823")  # space again
        result = await asyncio.wait_for(storing, 10)
        assert result.stored == 5_000
        assert not outbox.health.failing
        assert outbox.health.failures >= 2
        assert outbox.depth == 5_001


def test_only_failures_that_can_pass_are_transient(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, max_messages=10) as outbox:
        locker = sqlite3.connect(path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        outbox._db.execute("PRAGMA busy_timeout = 50")
        try:
            with pytest.raises(OutboxError, match="locked") as locked:
                outbox.append(readings("t/a"))
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert locked.value.transient
        outbox._db.execute("DROP TABLE streams")  # a damaged schema: retrying cannot help
        with pytest.raises(OutboxError, match="no such table") as broken:
            outbox.append(readings("t/a"))
        assert not broken.value.transient


WRITER = """
import sys
from pathlib import Path
from fedgate_bridge.outbox import Outbox, Reading
outbox = Outbox(Path(sys.argv[1]), max_messages=10_000_000)
batch = 0
while True:
    outbox.append([Reading(topic=f"t/{i}", ts=float(batch), value=1.0) for i in range(3)])
    print(batch, flush=True)  # after COMMIT returned: this batch counts as produced
    batch += 1
"""


def test_kill_9_loses_no_committed_reading_and_reuses_no_seq(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    deadline = time.monotonic() + 20
    confirmed = -1
    while confirmed < 200 and time.monotonic() < deadline:
        confirmed = int(writer.stdout.readline())
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    # The writer goes on committing while this process reads (under load, far ahead of it):
    # what it printed before the kill is still in the pipe, and its last line is the last
    # batch committed. A line cut by the kill has no newline and does not count.
    printed = writer.stdout.read()
    complete = printed[: printed.rfind("\n") + 1].split()
    if complete:
        confirmed = int(complete[-1])
    with Outbox(path, max_messages=10_000_000) as outbox:
        seqs = outbox.next_seqs()
        rows = outbox.pending(limit=10_000_000)
        # Every confirmed batch is there; at most the one in flight is too.
        assert all(confirmed + 1 <= seqs[f"t/{i}"] <= confirmed + 2 for i in range(3))
        for i in range(3):
            stream = [r.seq for r in rows if r.topic == f"t/{i}"]
            assert stream == list(range(seqs[f"t/{i}"]))  # contiguous, nothing reused
        outbox.append(readings("t/0"))
        assert outbox.pending(after_id=rows[-1].id)[0].seq == seqs["t/0"]
