"""Per-identity rate limiting of inbound agent messages (IO-free: the caller passes the time).

What an honest agent sends is small and known: one message per agent stage of the
running round (``update``, or ``keys`` ``shares`` ``masked`` ``confirm`` ``reveal``).
The first such message of each selected agent and stage is always examined
("expected"); every other message (a second one on the same stage, other rounds, agents
not selected, unknown senders) is "extra" and takes a token from its sender's bucket.
An empty bucket drops the message before the signature check, the decoder and the store
ever see it, so one flooding gateway costs the coordinator a dictionary lookup per
message and cannot delay the round for the others (decision 0040).

The sender is the last level of the topic, the only identity known before the signature
check; the broker ACL makes it the authenticated certificate name (decision 0038).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import msgspec
from fedgate_common.messages import AGENT_STAGES

OVERFLOW = "*"  # one shared bucket once ``max_identities`` buckets are in use
MALFORMED = "-"  # topics without a sender level, or with one no agent id can be
MAX_ID_LENGTH = 64  # validate_identifier's limit: longer levels share the MALFORMED bucket


class RateLimitSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[rate_limit]`` in coordinator.toml: the budget of *extra* messages per sender.

    An honest agent sends none, except QoS 1 redeliveries after a reconnect (each at most
    once per stage): ``burst`` 20 covers several rounds of those, ``extra_per_s`` refills.
    """

    enabled: bool = True
    burst: int = 20
    extra_per_s: float = 0.5
    max_identities: int = 1_000
    report_every_s: float = 10.0


def rate_limit_problems(settings: RateLimitSettings) -> list[str]:
    problems = []
    if not 1 <= settings.burst <= 1_000_000:
        problems.append("rate_limit.burst must be 1..1000000")
    if not 0 < settings.extra_per_s <= 1_000_000:
        problems.append("rate_limit.extra_per_s must be in (0, 1000000]")
    if not 1 <= settings.max_identities <= 10_000_000:
        problems.append("rate_limit.max_identities must be 1..10000000")
    if not 0 < settings.report_every_s <= 86_400:
        problems.append("rate_limit.report_every_s must be in (0, 86400]")
    return problems


class Admission(enum.Enum):
    EXPECTED = "expected"  # first message of a selected agent for a stage of this round
    EXTRA = "extra"  # anything else, within the sender's budget
    DROPPED = "dropped"  # over budget: never examined


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class RateLimiter:
    """Token buckets per sender, plus the "expected" pass for the running round."""

    def __init__(self, settings: RateLimitSettings) -> None:
        self.settings = settings
        self._buckets: dict[str, _Bucket] = {}
        self._round: int | None = None
        self._selected: frozenset[str] = frozenset()
        self._seen: set[tuple[str, str]] = set()
        self.dropped: dict[str, int] = {}
        self._unreported: dict[str, int] = {}
        self._reported_at: dict[str, float] = {}

    def start_round(self, number: int | None, selected: Iterable[str] = ()) -> None:
        """A new round is running (``None``: none is); its selected agents get a pass."""
        if number != self._round:
            self._round = number
            self._selected = frozenset(selected)
            self._seen = set()

    def admit(self, topic: str, now: float, *, room: bool = True) -> Admission:
        """Decide for a message on an agent round topic, before anything else looks at it.

        ``room=False``: the inbound queue is full. An expected message is still taken (a
        round cannot lose it); anything else is dropped and counted like a sender over its
        budget, so a flood spread over many identities cannot crowd honest messages out.
        """
        parts = topic.split("/")
        sender = parts[6] if len(parts) == 7 and 0 < len(parts[6]) <= MAX_ID_LENGTH else MALFORMED
        if not self.settings.enabled:
            return Admission.EXTRA
        if (
            len(parts) == 7
            and self._round is not None
            and sender in self._selected
            and parts[5] in AGENT_STAGES
            and parts[4] == str(self._round)
            and (sender, parts[5]) not in self._seen
        ):
            self._seen.add((sender, parts[5]))
            return Admission.EXPECTED
        if not room:
            self._count_drop(sender)
            return Admission.DROPPED
        sender, bucket = self._bucket(sender, now)
        bucket.tokens = min(
            float(self.settings.burst),
            bucket.tokens + (now - bucket.updated) * self.settings.extra_per_s,
        )
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return Admission.EXTRA
        self._count_drop(sender)
        return Admission.DROPPED

    def _bucket(self, sender: str, now: float) -> tuple[str, _Bucket]:
        """The sender's bucket, or the shared one when ``max_identities`` are in use."""
        bucket = self._buckets.get(sender)
        if bucket is not None:
            return sender, bucket
        if len(self._buckets) >= self.settings.max_identities:
            self._forget_full_buckets(now)
        if len(self._buckets) >= self.settings.max_identities:
            sender = OVERFLOW
            bucket = self._buckets.get(OVERFLOW)
            if bucket is not None:
                return sender, bucket
        bucket = _Bucket(float(self.settings.burst), now)
        self._buckets[sender] = bucket
        return sender, bucket

    def _forget_full_buckets(self, now: float) -> None:
        """A bucket that has refilled holds no state worth keeping."""
        rate, burst = self.settings.extra_per_s, self.settings.burst
        full = [
            name
            for name, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * rate >= burst
        ]
        for name in full:
            del self._buckets[name]

    def _count_drop(self, sender: str) -> None:
        if sender not in self.dropped and len(self.dropped) >= self.settings.max_identities:
            sender = OVERFLOW
        self.dropped[sender] = self.dropped.get(sender, 0) + 1
        self._unreported[sender] = self._unreported.get(sender, 0) + 1

    def due_reports(self, now: float) -> list[tuple[str, int]]:
        """(sender, drops since its last report) for senders whose report is due: the first
        drop at once, then at most one report per ``report_every_s``."""
        due = []
        for sender, count in list(self._unreported.items()):
            last = self._reported_at.get(sender)
            if last is None or now - last >= self.settings.report_every_s:
                due.append((sender, count))
                self._reported_at[sender] = now
                del self._unreported[sender]
        return due

    @property
    def pending(self) -> bool:
        """Drops not reported yet."""
        return bool(self._unreported)

    @property
    def identities(self) -> int:
        return len(self._buckets)
