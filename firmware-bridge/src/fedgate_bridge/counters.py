"""What the bridge counts, and failure logging that does not flood the journal.

A Modbus device that is switched off fails every poll; logging each failure would bury
everything else. :class:`FailureLog` logs the first failure of a streak, then at most one
summary per ``every_s`` seconds, and one line when the streak ends. Every failure is still
counted, so ``fedgate-bridge status`` shows the real numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from fedgate_common.logs import log_event

__all__ = ["FailureLog", "OutboxHealth", "PublisherCounters", "SourceCounters"]


class SourceCounters(msgspec.Struct, kw_only=True):
    """Counters of one source (mutable; the source task updates them)."""

    name: str
    kind: str  # "modbus" | "opcua"
    connected: bool = False
    reads: int = 0  # successful polls, or data-change notifications
    readings: int = 0  # readings stored in the outbox (each consumed one seq)
    errors: int = 0  # failed connects and reads (no seq consumed)
    blocks_refused: int = 0  # Modbus reads answered with an exception; the rest of the poll kept
    non_finite: int = 0  # values that decoded to NaN / infinity, not published
    non_numeric: int = 0  # OPC-UA values that are not numbers, not published
    rejected: int = 0  # readings refused by a full outbox (policy reject_new)
    reconnects: int = 0  # connections established after the first one
    last_error: str = ""
    last_error_at: float | None = None  # Unix seconds
    last_read_at: float | None = None  # Unix seconds


class PublisherCounters(msgspec.Struct, kw_only=True):
    """Counters of the MQTT publisher (mutable)."""

    connected: bool = False
    connects: int = 0  # successful CONNACKs
    connect_failures: int = 0
    disconnects: int = 0  # established connections that were lost
    sent: int = 0  # PUBLISH packets handed to the connection, resends included
    resent: int = 0  # of those, rows already sent on an earlier connection
    acked: int = 0  # successful PUBACKs; each deleted its outbox row
    refused: int = 0  # PUBACKs with an MQTT 5 failure reason code
    parked: int = 0  # rows parked: refused for good, or held back while their topic is
    # blocked after a refusal (a running total; rows sent again later stay counted)
    inflight: int = 0  # sent and awaiting PUBACK
    last_refusal: str = ""  # "<topic>: <reason>"
    last_refusal_at: float | None = None
    last_error: str = ""
    last_error_at: float | None = None


class OutboxHealth(msgspec.Struct, kw_only=True):
    """Write failures of the outbox that the bridge waited out (mutable)."""

    failing: bool = False  # the last call failed; sources and publisher are waiting
    failures: int = 0  # failed calls, each retried (locked, disk full, I/O error)
    last_error: str = ""
    last_error_at: float | None = None  # Unix seconds


class _PeriodicLog:
    """What the logs below share: a logger, what they log about, at most one line per
    ``every_s`` for one thing, and fields added to every line."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        what: str,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        **fields: object,
    ) -> None:
        self._logger = logger
        self._what = what
        self._every_s = every_s
        self._clock = clock
        self._fields = fields


class FailureLog(_PeriodicLog):
    """Logs a streak of failures of one thing: first one, periodic summaries, recovery."""

    def __init__(self, logger: logging.Logger, *, what: str, **options: Any) -> None:
        super().__init__(logger, what=what, **options)
        self._streak = 0
        self._suppressed = 0
        self._last_logged = 0.0

    @property
    def failing(self) -> bool:
        return self._streak > 0

    def failure(self, error: str, **fields: object) -> bool:
        """Record one failure; returns True if it was logged."""
        now = self._clock()
        self._streak += 1
        if self._streak > 1 and now - self._last_logged < self._every_s:
            self._suppressed += 1
            return False
        log_event(
            self._logger,
            logging.WARNING,
            f"{self._what} failed" if self._streak == 1 else f"{self._what} still failing",
            error=error,
            failures=self._streak,
            not_logged=self._suppressed,
            **self._fields,
            **fields,
        )
        self._suppressed = 0
        self._last_logged = now
        return True

    def success(self, **fields: object) -> None:
        """End a streak (logged once, with its length); a no-op when nothing failed."""
        if self._streak:
            log_event(
                self._logger,
                logging.INFO,
                f"{self._what} recovered",
                failures=self._streak,
                **self._fields,
                **fields,
            )
        self._streak = 0
        self._suppressed = 0


class RefusalLog(_PeriodicLog):
    """Logs values a source refuses, per (tag, reason): the first at once, then at most one
    line per ``every_s`` with how many were refused since. Counters say how many; this says
    which tag and why, without a line per reading."""

    def __init__(self, logger: logging.Logger, *, what: str, **options: Any) -> None:
        super().__init__(logger, what=what, **options)
        # (tag, reason) → (when last logged, refused since then)
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}

    def refused(self, tag: str, reason: str, detail: str) -> bool:
        """Record one refused value; returns True if it was logged."""
        now = self._clock()
        last, since = self._seen.get((tag, reason), (None, 0))
        if last is not None and now - last < self._every_s:
            self._seen[(tag, reason)] = (last, since + 1)
            return False
        log_event(
            self._logger,
            logging.WARNING,
            self._what,
            tag=tag,
            reason=reason,
            detail=detail,
            refused_since_last_line=since,
            **self._fields,
        )
        self._seen[(tag, reason)] = (now, 0)
        return True
