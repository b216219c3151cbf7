"""Historian import (CSV, Parquet; long and wide) into a real ingest buffer."""

from __future__ import annotations

import csv
import gzip
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fedgate_agent.ingest.buffer import BufferSettings, IngestBuffer
from fedgate_agent.ingest.errors import ColumnMappingInvalid, ImportFailed
from fedgate_agent.ingest.historian import (
    ColumnMapping,
    ImportProgress,
    Layout,
    TimestampFormat,
    import_history,
)

T0 = 1_700_000_000  # 2023-11-14T22:13:20Z


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[IngestBuffer]:
    with IngestBuffer.open(BufferSettings(path=tmp_path / "buffer.db")) as opened:
        yield opened


def write_csv(path: Path, rows: Sequence[Sequence[object]], delimiter: str = ",") -> Path:
    """Write ``rows`` (the header first) as a CSV file."""
    with path.open("w", newline="", encoding="utf-8") as stream:
        csv.writer(stream, delimiter=delimiter).writerows(rows)
    return path


def series(buffer: IngestBuffer, tag: str) -> tuple[list[float], list[float]]:
    ts, values = buffer.read_series([tag])[tag]
    return ts.tolist(), values.tolist()


def test_csv_long_epoch_seconds(buffer: IngestBuffer, tmp_path: Path) -> None:
    rows: list[list[object]] = [["timestamp", "tag", "value"]]
    rows += [[T0 + k, "FIC101", 0.5 * k] for k in range(5)]
    rows += [[T0 + k + 0.25, "TIC200", -k] for k in range(3)]
    path = write_csv(tmp_path / "export.csv", rows)
    report = import_history(path, buffer, ColumnMapping(layout=Layout.LONG))
    assert (report.rows_read, report.inserted, report.duplicates, report.rejected) == (8, 8, 0, 0)
    assert report.tags == ["FIC101", "TIC200"]
    assert (report.first_ts, report.last_ts) == (T0, T0 + 4)
    assert series(buffer, "FIC101") == ([T0 + k for k in range(5)], [0.5 * k for k in range(5)])
    assert series(buffer, "TIC200") == ([T0 + k + 0.25 for k in range(3)], [0, -1, -2])


def test_second_import_of_the_same_file_inserts_nothing(
    buffer: IngestBuffer, tmp_path: Path
) -> None:
    rows: list[list[object]] = [["timestamp", "tag", "value"]]
    rows += [[T0 + k, "A", k] for k in range(100)]
    path = write_csv(tmp_path / "export.csv", rows)
    first = import_history(path, buffer, ColumnMapping(), chunk_rows=30)
    again = import_history(path, buffer, ColumnMapping(), chunk_rows=30)
    assert (first.inserted, first.duplicates) == (100, 0)
    assert (again.inserted, again.duplicates) == (0, 100)
    assert len(series(buffer, "A")[0]) == 100


def test_csv_wide_iso_timestamps_with_and_without_offset(
    buffer: IngestBuffer, tmp_path: Path
) -> None:
    path = write_csv(
        tmp_path / "wide.csv",
        [
            ["Time", "XMEAS_1", "XMEAS_2"],
            ["2024-03-01T12:00:00Z", "1.5", "10"],
            ["2024-03-01 13:00:01+01:00", "", "11"],  # = 12:00:01Z; XMEAS_1 not sampled
            ["2024-03-01T12:00:02.250", "1.7", "12"],  # naive: UTC by default
        ],
    )
    report = import_history(path, buffer, ColumnMapping())  # auto: no tag/value columns → wide
    base = datetime(2024, 3, 1, 12, tzinfo=UTC).timestamp()
    assert (report.inserted, report.rejected, report.skipped_empty) == (5, 0, 1)
    assert series(buffer, "XMEAS_1") == ([base, base + 2.25], [1.5, 1.7])
    assert series(buffer, "XMEAS_2") == ([base, base + 1, base + 2.25], [10, 11, 12])


def test_naive_timestamps_in_a_named_timezone(buffer: IngestBuffer, tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "local.csv",
        [["ts", "T"], ["2024-07-01 08:00:00", 1], ["2024-07-01T10:00:00+00:00", 2]],
    )
    import_history(path, buffer, ColumnMapping(timezone="Europe/Berlin"))
    summer = datetime(2024, 7, 1, 6, tzinfo=UTC).timestamp()  # 08:00 CEST = 06:00Z
    assert series(buffer, "T")[0] == [summer, summer + 4 * 3600]


def test_epoch_milliseconds_are_recognised_and_can_be_forced(
    buffer: IngestBuffer, tmp_path: Path
) -> None:
    auto = write_csv(tmp_path / "ms.csv", [["timestamp", "P"], [T0 * 1000 + 5, 3.0]])
    import_history(auto, buffer, ColumnMapping())
    assert series(buffer, "P")[0] == [T0 + 0.005]
    # Small numbers are seconds unless the format says otherwise.
    forced = write_csv(tmp_path / "small.csv", [["timestamp", "Q"], [1500, 1.0]])
    import_history(forced, buffer, ColumnMapping(timestamp_format=TimestampFormat.EPOCH_MS))
    assert series(buffer, "Q")[0] == [1.5]


def test_common_column_names_semicolons_and_a_byte_order_mark(
    buffer: IngestBuffer, tmp_path: Path
) -> None:
    path = tmp_path / "pi.csv"
    path.write_bytes(
        "\ufeffTagName;TimeStamp;Value;Status\nLT.1;2024-01-01T00:00:00Z;42.5;Good\n".encode()
    )
    report = import_history(path, buffer, ColumnMapping())
    assert (report.inserted, report.tags) == (1, ["LT.1"])
    assert series(buffer, "LT.1") == ([datetime(2024, 1, 1, tzinfo=UTC).timestamp()], [42.5])


def test_rename_and_tag_filter(buffer: IngestBuffer, tmp_path: Path) -> None:
    rows: list[list[object]] = [["timestamp", "tag", "value"]]
    for k in range(3):
        rows += [[T0 + k, "FIC101.PV", k], [T0 + k, "TIC200.PV", 10 + k], [T0 + k, "junk", 0]]
    path = write_csv(tmp_path / "export.csv", rows)
    mapping = ColumnMapping(
        rename={"FIC101.PV": "XMEAS_1", "TIC200.PV": "XMEAS_9"},
        tags=("XMEAS_1", "TIC200.PV", "NEVER_THERE"),  # stored or export names both match
    )
    report = import_history(path, buffer, mapping)
    assert report.tags == ["XMEAS_1", "XMEAS_9"]
    assert (report.inserted, report.filtered_out) == (6, 3)
    assert report.tags_not_found == ["NEVER_THERE"]
    assert sorted(buffer.tags()) == ["XMEAS_1", "XMEAS_9"]
    assert series(buffer, "XMEAS_9")[1] == [10, 11, 12]


def test_slash_as_stores_path_named_tags_and_refuses_what_it_would_merge(
    buffer: IngestBuffer, tmp_path: Path
) -> None:
    rows: list[list[object]] = [["timestamp", "tag", "value"]]
    for k in range(3):
        rows += [[T0 + k, "Line3/FIC101", k], [T0 + k, "Line3.FIC101", 100 + k]]
        rows += [[T0 + k, "old/TIC", 10 + k], [T0 + k + 0.5, "TIC", 20 + k]]
    path = write_csv(tmp_path / "ignition.csv", rows)
    with IngestBuffer.open(BufferSettings(path=tmp_path / "plain.db")) as other:
        plain = import_history(path, other, ColumnMapping())
    assert plain.tags == ["Line3.FIC101", "TIC"]  # without slash_as, '/' is refused
    assert {e.reason for e in plain.rejected_examples} == {"bad_tag"}
    assert plain.rejected == 6
    # The real "Line3.FIC101" and "Line3/FIC101" would become one tag through the
    # replacement alone: the file is refused before anything is stored, in either row order.
    for order in (path, write_csv(tmp_path / "reversed.csv", [rows[0], *rows[:0:-1]])):
        with pytest.raises(ImportFailed, match=r"'Line3/FIC101' .*nothing was imported"):
            import_history(order, buffer, ColumnMapping(slash_as="."))
    assert buffer.tags() == []
    mapping = ColumnMapping(slash_as="_", rename={"old/TIC": "TIC"})  # a deliberate merge
    report = import_history(path, buffer, mapping)
    assert report.tags == ["Line3.FIC101", "Line3_FIC101", "TIC"]
    assert report.rejected == 0
    assert series(buffer, "Line3_FIC101")[1] == [0, 1, 2]
    assert series(buffer, "Line3.FIC101")[1] == [100, 101, 102]
    _, values = series(buffer, "TIC")
    assert values == [10, 20, 11, 21, 12, 22]  # rename merged the two on purpose


def test_slash_as_tag_filter_by_renamed_name(buffer: IngestBuffer, tmp_path: Path) -> None:
    mapping = ColumnMapping(slash_as=".", rename={"X": "p/q"}, tags=("p/q",))
    long_rows: list[list[object]] = [["timestamp", "tag", "value"]]
    long_rows += [[T0 + k, "X", k] for k in range(3)] + [[T0, "Y", 9]]
    report = import_history(write_csv(tmp_path / "long.csv", long_rows), buffer, mapping)
    assert (report.tags, report.tags_not_found, report.inserted) == (["p.q"], [], 3)
    wide_rows: list[list[object]] = [["time", "X", "Y"], [T0 + 5, 1, 2]]
    wide = import_history(write_csv(tmp_path / "wide.csv", wide_rows), buffer, mapping)
    assert wide.tags == ["p.q"]


def test_slash_as_in_a_wide_export(buffer: IngestBuffer, tmp_path: Path) -> None:
    rows: list[list[object]] = [["time", "Line3/FIC101", "Line3/TIC200"]]
    rows += [[T0 + k, k, 2 * k] for k in range(4)]
    path = write_csv(tmp_path / "wide.csv", rows)
    report = import_history(path, buffer, ColumnMapping(slash_as="__"))
    assert report.tags == ["Line3__FIC101", "Line3__TIC200"]
    assert report.inserted == 8
    clash = write_csv(tmp_path / "clash.csv", [["time", "a/b", "a.b"], [T0, 1, 2]])
    with pytest.raises(ImportFailed, match=r"columns 'a\.b' and 'a/b' would both be stored"):
        import_history(clash, buffer, ColumnMapping(slash_as="."))


def test_slash_as_first_pass_says_nothing_was_imported(
    buffer: IngestBuffer, tmp_path: Path
) -> None:
    body = "".join(f"{T0 + k},a/b,{k}\n" for k in range(20_000))
    packed = gzip.compress(("timestamp,tag,value\n" + body).encode())
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(packed[: len(packed) // 2])  # a transfer that stopped halfway
    with pytest.raises(ImportFailed, match=r"at line \d+ .*slash_as; nothing was imported"):
        import_history(path, buffer, ColumnMapping(slash_as="."))
    assert buffer.tags() == []


@pytest.mark.parametrize("bad", ["/", "", "\n", "a\u202eb"])
def test_slash_as_must_itself_be_usable_in_a_tag_name(bad: str) -> None:
    with pytest.raises(ColumnMappingInvalid, match="slash_as"):
        ColumnMapping(slash_as=bad)


def test_bad_rows_are_counted_with_line_numbers_not_fatal(
    buffer: IngestBuffer, tmp_path: Path
) -> None:
    path = write_csv(
        tmp_path / "dirty.csv",
        [
            ["timestamp", "tag", "value"],
            [T0, "A", 1],
            ["yesterday", "A", 2],  # line 3
            [T0 + 2, "A", "n/a"],  # line 4
            [T0 + 3, "A", "nan"],  # line 5
            [T0 + 4, "A", ""],  # line 6
            [T0 + 5, "", 7],  # line 7
            ["1969-12-31T00:00:00Z", "A", 8],  # line 8
            [T0 + 9, "A", "true"],
            ["9999-12-31T00:00:00Z", "A", 10],  # line 10: past the gateway's clock + 1 h
        ],
    )
    report = import_history(path, buffer, ColumnMapping())
    assert (report.rows_read, report.inserted, report.rejected) == (9, 2, 7)
    assert [(r.line, r.reason, r.column) for r in report.rejected_examples] == [
        (3, "bad_timestamp", "timestamp"),
        (4, "not_numeric", "value"),
        (5, "not_finite", "value"),
        (6, "empty", "value"),
        (7, "empty_tag", "tag"),
        (8, "before_epoch", "timestamp"),
        (10, "ts_in_future", "timestamp"),
    ]
    assert report.rejected_examples[1].text == "n/a"
    assert series(buffer, "A") == ([T0, T0 + 9], [1.0, 1.0])


def test_tag_names_with_control_characters_or_a_slash_are_rejected_rows(
    buffer: IngestBuffer, tmp_path: Path
) -> None:
    """Long layout: the row is refused (``bad_tag``), the rest of the file is imported;
    wide layout: the column's values are; a rename can give such a tag a usable name."""
    long = write_csv(
        tmp_path / "long.csv",
        [
            ["timestamp", "tag", "value"],
            [T0, "A", 1],
            [T0 + 1, "B\x00", 2],  # line 3
            [T0 + 2, "C\x1b[2J", 3],  # line 4
            [T0 + 3, "line/2", 4],  # line 5: would make import:<source>/<tag> ambiguous
            [T0 + 4, "A", 5],
            [T0 + 5, "D\u202eE", 6],  # line 7: a bidi override reverses what follows
            [T0 + 6, "F\u2028G", 7],  # line 8: a line separator
        ],
    )
    report = import_history(long, buffer, ColumnMapping())
    assert (report.rows_read, report.inserted, report.rejected) == (7, 2, 5)
    assert [(r.line, r.reason, r.column, r.text) for r in report.rejected_examples] == [
        (3, "bad_tag", "tag", "B\x00"),
        (4, "bad_tag", "tag", "C\x1b[2J"),
        (5, "bad_tag", "tag", "line/2"),
        (7, "bad_tag", "tag", "D\u202eE"),
        (8, "bad_tag", "tag", "F\u2028G"),
    ]
    assert report.tags == ["A"]
    assert buffer.tags() == ["A"]
    renamed = import_history(long, buffer, ColumnMapping(rename={"line/2": "line_2"}))
    assert (renamed.inserted, renamed.rejected) == (1, 4)
    assert series(buffer, "line_2") == ([T0 + 3], [4.0])

    wide = write_csv(
        tmp_path / "wide.csv", [["timestamp", "X", "Y\x1b"], [T0, 1, 2], [T0 + 1, 3, 4]]
    )
    report = import_history(wide, buffer, ColumnMapping(layout=Layout.WIDE))
    assert (report.inserted, report.rejected, report.tags) == (2, 2, ["X"])
    assert {(r.line, r.reason, r.column) for r in report.rejected_examples} == {
        (2, "bad_tag", "Y\x1b"),
        (3, "bad_tag", "Y\x1b"),
    }
    with pytest.raises(ColumnMappingInvalid, match=r"rename to 'a\\tb'.*control character U\+0009"):
        ColumnMapping(rename={"A": "a\tb"})


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def test_a_quote_left_open_refuses_its_line_and_keeps_the_rows_after(
    buffer: IngestBuffer, tmp_path: Path
) -> None:
    """csv alone reads a field from an unmatched quote to the next quote or the end of
    the file: every row in between would be swallowed into one rejected value."""
    path = write_text(
        tmp_path / "quote.csv",
        "timestamp,tag,value\n"
        f"{T0},A,1\n"
        f'{T0 + 1},A,"2\n'  # line 3: the quote is never closed
        f"{T0 + 2},A,3\n"
        f'{T0 + 3},"B,4\n'  # line 5: closed by the quote on line 7
        f"{T0 + 4},B,5\r\n"
        f'{T0 + 5},B,"6"\n'  # line 7: a quoted field closed on its own line is fine
        f'{T0 + 6},A,"7',  # line 8: open at the end of the file, no line break
    )
    report = import_history(path, buffer, ColumnMapping())
    assert [(r.line, r.reason, r.column, r.text) for r in report.rejected_examples] == [
        (3, "unmatched_quote", "value", f'{T0 + 1},A,"2'),
        (5, "unmatched_quote", "tag", f'{T0 + 3},"B,4'),
        (8, "unmatched_quote", "value", f'{T0 + 6},A,"7'),
    ]
    assert (report.rows_read, report.inserted, report.rejected) == (7, 4, 3)
    assert series(buffer, "A") == ([T0, T0 + 2], [1.0, 3.0])
    assert series(buffer, "B") == ([T0 + 4, T0 + 5], [5.0, 6.0])

    for first in ('timestamp,"tag,value', 'timestamp,"tag\n(name)",value'):
        header = write_text(tmp_path / "header.csv", f"{first}\n{T0},A,1\n")
        with pytest.raises(ImportFailed, match="line 1, the header, has a quoted field"):
            import_history(header, buffer, ColumnMapping())


def test_lines_that_each_open_a_quote_are_each_refused_once(
    buffer: IngestBuffer, tmp_path: Path
) -> None:
    """Every line opens a quote whether it is read on its own or inside another's field
    (``ts",A,"v``): each is refused once and read once. Reading the lines a field swallowed
    again made such a file quadratic (16,000 lines took 25 s)."""
    lines = 5_000
    rows = "".join(f'{T0 + k}",A,"{k}\n' for k in range(lines))
    path = write_text(tmp_path / "quotes.csv", f"timestamp,tag,value\n{rows}{T0 - 1},A,1\n")
    report = import_history(path, buffer, ColumnMapping())
    assert (report.rows_read, report.rejected, report.inserted) == (lines + 1, lines, 1)
    assert {r.reason for r in report.rejected_examples} == {"unmatched_quote"}
    assert [r.line for r in report.rejected_examples[:3]] == [2, 3, 4]


def test_a_quote_left_open_before_more_than_the_csv_field_limit_is_one_rejected_line(
    buffer: IngestBuffer, tmp_path: Path
) -> None:
    rows = "".join(f"{T0 + k},A,{k}\n" for k in range(2, 12_000))  # > 131,072 characters
    path = write_text(tmp_path / "long.csv", f'timestamp,tag,value\n{T0},A,"1\n{rows}')
    report = import_history(path, buffer, ColumnMapping())
    assert [(r.line, r.reason) for r in report.rejected_examples] == [(2, "unmatched_quote")]
    assert (report.rejected, report.inserted) == (1, 11_998)


def test_a_missing_mapped_column_names_the_columns_found(
    buffer: IngestBuffer, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "export.csv", [["when", "name", "reading"], [T0, "A", 1]])
    with pytest.raises(ImportFailed, match=r"no timestamp column.*\['when', 'name', 'reading'\]"):
        import_history(path, buffer, ColumnMapping())
    with pytest.raises(ImportFailed, match=r"'Wert' is not in the file.*\['when', 'name'"):
        import_history(path, buffer, ColumnMapping(timestamp_column="when", value_column="Wert"))
    wide = write_csv(tmp_path / "wide.csv", [["timestamp", "A"], [T0, 1]])
    with pytest.raises(ImportFailed, match=r"tags \['B'\] are not columns.*\['timestamp', 'A'\]"):
        import_history(wide, buffer, ColumnMapping(layout=Layout.WIDE, tags=("A", "B")))


def test_unreadable_files_raise_import_failed(buffer: IngestBuffer, tmp_path: Path) -> None:
    garbage = tmp_path / "export.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    with pytest.raises(ImportFailed, match="cannot read the Parquet file"):
        import_history(garbage, buffer, ColumnMapping())
    binary = tmp_path / "export.csv"
    binary.write_bytes(b"timestamp,tag,value\n\xff\xfe\x00\x81garbage\n")
    with pytest.raises(ImportFailed, match="cannot read the CSV file"):
        import_history(binary, buffer, ColumnMapping())
    with pytest.raises(ImportFailed, match="no such file"):
        import_history(tmp_path / "absent.csv", buffer, ColumnMapping())
    with pytest.raises(ImportFailed, match="cannot tell the format"):
        import_history(tmp_path / "export.xlsx", buffer, ColumnMapping())


def test_gzipped_csv_with_a_source_column(buffer: IngestBuffer, tmp_path: Path) -> None:
    path = tmp_path / "export.csv.gz"
    with gzip.open(path, "wt", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["source", "timestamp", "tag", "value"])
        for k in range(50):
            writer.writerow(["siteA", T0 + k, "A", k])
            writer.writerow(["siteB", T0 + k, "A", -k])  # same tag and time, another source
    report = import_history(path, buffer, ColumnMapping())
    assert (report.inserted, report.duplicates) == (100, 0)
    assert len(series(buffer, "A")[0]) == 100


def test_progress_after_every_chunk(buffer: IngestBuffer, tmp_path: Path) -> None:
    rows: list[list[object]] = [["timestamp", "tag", "value"]]
    rows += [[T0 + k, "A", k] for k in range(20_000)]
    path = write_csv(tmp_path / "export.csv", rows)
    seen: list[ImportProgress] = []
    import_history(path, buffer, ColumnMapping(), chunk_rows=5_000, progress=seen.append)
    assert [p.inserted for p in seen] == [5_000, 10_000, 15_000, 20_000, 20_000]
    fractions = [p.fraction if p.fraction is not None else -1.0 for p in seen]
    assert fractions == sorted(fractions)
    assert 0 < fractions[0] < 0.5
    assert fractions[-1] == 1.0


def test_parquet_long_with_a_timestamp_column(buffer: IngestBuffer, tmp_path: Path) -> None:
    start = datetime(2024, 5, 1, tzinfo=timezone(timedelta(hours=2)))
    table = pa.table(
        {
            "Timestamp": pa.array(
                [start + timedelta(milliseconds=250 * k) for k in range(6)],
                pa.timestamp("ns", tz="+02:00"),
            ),
            "TagName": pa.array(["A", "B"] * 3).dictionary_encode(),
            "Value": pa.array([1.0, 2.0, None, 4.0, float("inf"), 6.0]),
        }
    )
    path = tmp_path / "long.parquet"
    pq.write_table(table, path, row_group_size=4)
    report = import_history(path, buffer, ColumnMapping(), chunk_rows=2)
    assert (report.rows_read, report.inserted, report.rejected) == (6, 4, 2)
    assert {(r.line, r.reason) for r in report.rejected_examples} == {
        (3, "empty"),
        (5, "not_finite"),
    }
    base = start.timestamp()
    assert series(buffer, "A") == ([base], [1.0])
    assert series(buffer, "B") == ([base + 0.25, base + 0.75, base + 1.25], [2.0, 4.0, 6.0])
    again = import_history(path, buffer, ColumnMapping())
    assert (again.inserted, again.duplicates) == (0, 4)


def test_parquet_wide_with_epoch_milliseconds(buffer: IngestBuffer, tmp_path: Path) -> None:
    n = 1000
    stamps = (T0 * 1000 + np.arange(n) * 100).astype(np.int64)
    table = pa.table(
        {
            "ts": stamps,
            "XMEAS_1": np.sin(np.arange(n)),
            "XMV_3": pa.array([float(k) if k % 2 else None for k in range(n)]),
            "FAULT": pa.array([k >= 500 for k in range(n)]),
        }
    )
    path = tmp_path / "wide.parquet"
    pq.write_table(table, path)
    report = import_history(path, buffer, ColumnMapping(rename={"XMV_3": "XMV_03"}))
    assert report.tags == ["FAULT", "XMEAS_1", "XMV_03"]
    assert (report.inserted, report.skipped_empty, report.rejected) == (2500, 500, 0)
    ts, values = series(buffer, "FAULT")
    assert ts[0] == T0
    assert ts[-1] == pytest.approx(T0 + 99.9)
    assert sum(values) == 500
    np.testing.assert_allclose(series(buffer, "XMEAS_1")[1], np.sin(np.arange(n)))


def test_parquet_without_pyarrow_says_what_to_install(
    buffer: IngestBuffer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "export.parquet"
    pq.write_table(pa.table({"timestamp": [T0], "A": [1.0]}), path)
    for name in ("pyarrow", "pyarrow.compute", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ImportFailed, match=r"pip install 'fedgate-agent\[historian\]'"):
        import_history(path, buffer, ColumnMapping())


def test_invalid_mappings_list_every_problem() -> None:
    with pytest.raises(ColumnMappingInvalid) as caught:
        ColumnMapping(layout="tall", timezone="Mars/Olympus", delimiter=";;")  # type: ignore[arg-type]
    assert len(caught.value.problems) == 3
    assert "Mars/Olympus" in str(caught.value)
