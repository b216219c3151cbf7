"""Reconnect delays: capped exponential backoff with jitter (pure computation)."""

from __future__ import annotations

import contextlib

import msgspec


class Backoff(msgspec.Struct, frozen=True, kw_only=True):
    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 30.0

    def delay(self, attempt: int, jitter: float) -> float:
        """Delay before reconnect ``attempt`` (0-based): between half and all of the capped
        exponential ceiling ("equal jitter"); ``jitter`` in [0, 1) comes from the caller."""
        ceiling = self.max_s
        with contextlib.suppress(OverflowError):
            ceiling = min(self.max_s, self.initial_s * self.factor ** min(attempt, 64))
        return ceiling * (0.5 + 0.5 * jitter)
