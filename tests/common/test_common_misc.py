"""Structured logs, reconnect backoff and plain-text tables."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedgate_common.backoff import Backoff
from fedgate_common.logs import LogfmtFormatter, configure_logging, log_event
from fedgate_common.text_table import format_table
from hypothesis import given
from hypothesis import strategies as st

# -- logs ------------------------------------------------------------------------------

_PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^ "]*)(?: |$)')


def parse_logfmt(line: str) -> dict[str, str]:
    """Parse one logfmt line; quoted values are JSON strings. Fails on leftovers."""
    fields: dict[str, str] = {}
    position = 0
    while position < len(line):
        match = _PAIR.match(line, position)
        assert match is not None, f"unparseable at {position}: {line[position:]!r}"
        key, value = match.groups()
        assert key not in fields, f"duplicate key {key}"
        fields[key] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    return fields


def _logger(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.Logger("fedgate.test")
    logger.addHandler(handler)
    return logger, stream


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_logfmt_line_is_parseable_with_quoting() -> None:
    logger, stream = _logger(LogfmtFormatter())
    log_event(
        logger,
        logging.WARNING,
        "message rejected",
        round=3,
        agent="agent-07",
        spaced="a b",
        quoted='say "hi"',
        equals="k=v",
        empty="",
        multiline="one\ntwo",
        tabbed="a\tb",
        loss=0.25,
        nothing=None,
    )
    [line] = _lines(stream)
    fields = parse_logfmt(line)
    assert list(fields) == [
        "ts",
        "level",
        "logger",
        "msg",
        "round",
        "agent",
        "spaced",
        "quoted",
        "equals",
        "empty",
        "multiline",
        "tabbed",
        "loss",
        "nothing",
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", fields["ts"])
    assert fields["level"] == "warning"
    assert fields["logger"] == "fedgate.test"
    assert fields["msg"] == "message rejected"
    assert fields["round"] == "3"
    assert fields["agent"] == "agent-07"
    assert fields["spaced"] == "a b"
    assert fields["quoted"] == 'say "hi"'
    assert fields["equals"] == "k=v"
    assert fields["empty"] == ""
    assert fields["multiline"] == "one\ntwo"
    assert fields["tabbed"] == "a\tb"
    assert fields["loss"] == "0.25"
    assert fields["nothing"] == "None"
    assert " agent=agent-07 " in line  # simple values stay unquoted
    assert 'msg="message rejected"' in line


@given(st.text(max_size=30))
def test_logfmt_values_round_trip_on_one_line(value: str) -> None:
    logger, stream = _logger(LogfmtFormatter())
    log_event(logger, logging.INFO, value, detail=value)
    line = stream.getvalue().removesuffix("\n")
    assert "\n" not in line
    fields = parse_logfmt(line)
    assert fields["msg"] == value
    assert fields["detail"] == value


@given(st.text(max_size=30))
def test_logfmt_lines_carry_no_control_characters(value: str) -> None:
    """A carriage return or an escape sequence from a message must not rewrite a terminal
    line or forge another one."""
    logger, stream = _logger(LogfmtFormatter())
    log_event(logger, logging.INFO, "message rejected", sender=value)
    line = stream.getvalue().removesuffix("\n")
    assert all(c.isprintable() for c in line)


def test_logfmt_keeps_printable_unicode_as_it_is() -> None:
    """An operator greps the logs for the ε a refusal names: printable non-ASCII text is
    written as it is, not as JSON's \\u escapes."""
    logger, stream = _logger(LogfmtFormatter())
    log_event(logger, logging.WARNING, "round not joined", error="ε from 2.956 to 3.038")
    [line] = _lines(stream)
    assert 'error="ε from 2.956 to 3.038"' in line
    assert parse_logfmt(line)["error"] == "ε from 2.956 to 3.038"


def test_logfmt_exception_stays_on_one_line() -> None:
    logger, stream = _logger(LogfmtFormatter())
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("failed %s", "hard")
    [line] = _lines(stream)
    fields = parse_logfmt(line)
    assert fields["msg"] == "failed hard"
    assert fields["level"] == "error"
    assert fields["exc"].startswith("Traceback")
    assert "RuntimeError: boom" in fields["exc"]


def test_plain_logger_calls_have_the_base_fields() -> None:
    logger, stream = _logger(LogfmtFormatter())
    logger.info("started")
    assert set(parse_logfmt(_lines(stream)[0])) == {"ts", "level", "logger", "msg"}


def test_json_mode_gives_valid_json_with_the_extra_fields() -> None:
    logger, stream = _logger(LogfmtFormatter(as_json=True))
    log_event(
        logger,
        logging.INFO,
        'round "3" done',
        round=3,
        loss=0.5,
        agent="a b",
        path=Path("/var/lib/fedgate"),  # not JSON-serialisable: written as str
        nothing=None,
    )
    logger.info("plain")
    first, second = (json.loads(line) for line in _lines(stream))
    assert first["msg"] == 'round "3" done'
    assert first["level"] == "info"
    assert first["logger"] == "fedgate.test"
    assert first["round"] == 3
    assert first["loss"] == 0.5
    assert first["agent"] == "a b"
    assert first["path"] == "/var/lib/fedgate"
    assert first["nothing"] is None
    assert set(second) == {"ts", "level", "logger", "msg"}


def test_json_mode_includes_exceptions() -> None:
    logger, stream = _logger(LogfmtFormatter(as_json=True))
    try:
        raise ValueError("bad")
    except ValueError:
        logger.exception("oops")
    record = json.loads(stream.getvalue())
    assert "ValueError: bad" in record["exc"]


@pytest.fixture
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("_restore_root_logger")
@pytest.mark.parametrize(("level", "as_json"), [("debug", False), ("warning", True)])
def test_configure_logging(level: str, as_json: bool) -> None:
    configure_logging(level, as_json=as_json)
    root = logging.getLogger()
    assert root.level == getattr(logging, level.upper())
    [handler] = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    assert handler.stream is sys.stderr
    assert isinstance(handler.formatter, LogfmtFormatter)
    assert handler.formatter.as_json is as_json


# -- backoff ---------------------------------------------------------------------------

ALMOST_ONE = math.nextafter(1.0, 0.0)


def test_backoff_explicit_ceilings() -> None:
    backoff = Backoff(initial_s=1.0, factor=2.0, max_s=10.0)
    ceilings = [backoff.delay(attempt, ALMOST_ONE) for attempt in range(7)]
    assert ceilings == pytest.approx([1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0])
    floors = [backoff.delay(attempt, 0.0) for attempt in range(7)]
    assert floors == pytest.approx([0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0])


def test_backoff_defaults() -> None:
    backoff = Backoff()
    assert backoff.delay(0, 0.0) == pytest.approx(0.25)
    assert backoff.delay(0, ALMOST_ONE) == pytest.approx(0.5)
    assert backoff.delay(10**9, ALMOST_ONE) == pytest.approx(30.0)  # no overflow


BACKOFFS = st.builds(
    Backoff,
    initial_s=st.floats(0.001, 10.0),
    factor=st.floats(1.0, 10.0),
    max_s=st.floats(10.0, 3600.0),
)


@given(BACKOFFS, st.integers(0, 10_000), st.floats(0.0, 1.0, exclude_max=True))
def test_backoff_is_monotone_capped_and_jittered(
    backoff: Backoff, attempt: int, jitter: float
) -> None:
    ceiling = min(backoff.max_s, backoff.initial_s * backoff.factor ** min(attempt, 64))
    delay = backoff.delay(attempt, jitter)
    assert ceiling / 2 <= delay < ceiling or delay == pytest.approx(ceiling)
    assert delay <= backoff.max_s
    assert delay > 0
    # the ceiling never shrinks from one attempt to the next
    assert backoff.delay(attempt + 1, jitter) >= delay


# -- text tables -----------------------------------------------------------------------


def test_table_alignment_and_missing_values() -> None:
    """A missing value ('-') keeps a number column right-aligned."""
    table = format_table(
        ["name", "count", "loss", "ok"],
        [["a", 1, 0.5, True], ["bbb", 22, None, False], ["cc", 333, 12.25, None]],
    )
    assert table.splitlines() == [
        "name  count     loss  ok",
        "----  -----  -------  -----",
        "a         1   0.5000  True",
        "bbb      22        -  False",
        "cc      333  12.2500  -",
    ]


def test_table_numbers_are_right_aligned_text_left_aligned() -> None:
    table = format_table(["round", "loss", "model"], [[1, 0.25, "ab12"], [10, 12.5, "c"]])
    assert table.splitlines() == [
        "round     loss  model",
        "-----  -------  -----",
        "    1   0.2500  ab12",
        "   10  12.5000  c",
    ]


def test_table_without_rows_has_header_and_rule() -> None:
    assert format_table(["a", "bb"], []) == "a  bb\n-  --"


def test_table_lines_have_no_trailing_spaces() -> None:
    table = format_table(["name", "detail"], [["x", ""], ["longer name", None]])
    assert all(line == line.rstrip() for line in table.splitlines())
    assert table.splitlines()[-1] == "longer name  -"
