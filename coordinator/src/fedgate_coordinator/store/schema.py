"""Tables of the coordinator store (SQLAlchemy 2 declarative, portable SQLite/PostgreSQL).

The Alembic migrations in ``fedgate_coordinator/migrations/versions`` create exactly these
tables; a test compares the two. Every timestamp is stored and returned as aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "AgentRow",
    "Base",
    "EventRow",
    "ModelRow",
    "PrivacyLedgerRow",
    "RoundParticipantRow",
    "RoundRow",
    "RoundStageRow",
    "UTCDateTime",
]

# Deterministic constraint names, so later migrations can refer to them on both backends.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DIGEST_LENGTH = 64  # SHA-256 hex
STAGE_LENGTH = 32  # a protocol stage name: keys, shares, masked, confirm, reveal, update
UNIT_LENGTH = 32  # a unit of privacy: site


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that refuses naive values and always returns aware UTC.

    SQLite keeps no offset, so values are converted to UTC before they are written.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps aware UTC times")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the database, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class AgentRow(Base):
    """An enrolled agent and its signing key."""

    __tablename__ = "agents"
    __table_args__ = (CheckConstraint("status IN ('active', 'revoked')", name="status"),)

    agent_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(Text)
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16))


class ModelRow(Base):
    """One global model; ``digest`` covers ``parent_digest``, so the rows form a hash chain.

    ``parent_digest`` is unique: the chain cannot fork, and only one genesis (``""``) exists.
    """

    __tablename__ = "models"

    digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH), primary_key=True)
    parent_digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH), unique=True)
    round: Mapped[int] = mapped_column(Integer, unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    spec: Mapped[bytes] = mapped_column(LargeBinary)
    weights: Mapped[bytes] = mapped_column(LargeBinary)
    num_parameters: Mapped[int] = mapped_column(BigInteger)


class RoundRow(Base):
    """One training round, from start to completion or abort.

    ``aggregation`` says how updates travelled: ``plaintext`` (FedAvg of signed updates) or
    ``secagg`` (SecAgg+ masking); ``threshold`` (t of Shamir's t-of-n), ``graph_degree``
    (neighbours per agent in the round) and ``word_bits`` (the modulus 2^b) are set for
    ``secagg`` rounds only. The aggregation check is a column constraint, so migration 0002
    can add it with ``ALTER TABLE ... ADD COLUMN`` instead of rebuilding the table on SQLite.

    ``clip_norm`` is the L2 norm the round clipped every input to; ``within_clip`` the
    fraction of inputs within it, noisy under site-level DP (NULL when not measured).
    """

    __tablename__ = "rounds"
    __table_args__ = (
        CheckConstraint("status IN ('running', 'completed', 'aborted')", name="status"),
    )

    round: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(String(16))
    base_digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    model_digest: Mapped[str | None] = mapped_column(ForeignKey("models.digest"))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    selected: Mapped[int] = mapped_column(Integer)
    min_participants: Mapped[int] = mapped_column(Integer)
    participants: Mapped[int | None] = mapped_column(Integer)
    abort_reason: Mapped[str | None] = mapped_column(Text)
    mean_train_loss: Mapped[float | None] = mapped_column(Float)
    bytes_down_per_agent: Mapped[int | None] = mapped_column(BigInteger)
    aggregation: Mapped[str] = mapped_column(
        String(16),
        CheckConstraint("aggregation IN ('plaintext', 'secagg')", name="aggregation"),
        server_default="plaintext",
    )
    threshold: Mapped[int | None] = mapped_column(Integer)
    graph_degree: Mapped[int | None] = mapped_column(Integer)
    word_bits: Mapped[int | None] = mapped_column(Integer)
    clip_norm: Mapped[float | None] = mapped_column(Float)
    within_clip: Mapped[float | None] = mapped_column(Float)


class RoundParticipantRow(Base):
    """What one agent contributed to a round at one stage: metadata, never the update.

    ``num_samples`` and ``train_loss`` are NULL for ``secagg`` rounds: the coordinator never
    learns them; the row then records only the agent, the stage and the bytes received.
    """

    __tablename__ = "round_participants"

    round: Mapped[int] = mapped_column(ForeignKey("rounds.round"), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    stage: Mapped[str] = mapped_column(String(STAGE_LENGTH), primary_key=True)
    num_samples: Mapped[int | None] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float)
    bytes_up: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RoundStageRow(Base):
    """How one protocol stage of a round went: agents expected and heard from, bytes, time.

    ``bytes_in`` sums what agents sent at this stage; ``bytes_out`` sums what the
    coordinator published for it, over all recipients. The number of agents that dropped at
    the stage is ``expected - received``; it is not stored (see ``RoundStageRecord.dropped``).
    """

    __tablename__ = "round_stages"
    __table_args__ = (
        CheckConstraint("received >= 0 AND received <= expected", name="received"),
        CheckConstraint("bytes_in >= 0 AND bytes_out >= 0", name="bytes"),
        CheckConstraint("seconds >= 0", name="seconds"),
    )

    round: Mapped[int] = mapped_column(ForeignKey("rounds.round"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(STAGE_LENGTH), primary_key=True)
    expected: Mapped[int] = mapped_column(Integer)
    received: Mapped[int] = mapped_column(Integer)
    bytes_in: Mapped[int] = mapped_column(BigInteger)
    bytes_out: Mapped[int] = mapped_column(BigInteger)
    seconds: Mapped[float] = mapped_column(Float)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PrivacyLedgerRow(Base):
    """What one round spent of one unit's privacy budget; one row per (round, unit).

    ``unit`` is ``site`` for site-level DP (one agent's whole contribution to a round).
    Every ε is stated at ``delta``: ``epsilon_round`` for this round alone,
    ``epsilon_total`` for all recorded rounds up to this one, against ``target_epsilon``.
    ``noise_multiplier`` is the configured z, ``effective_noise_multiplier`` what the
    released sum carried; ``inputs`` were summed (``min_inputs`` needed).
    """

    __tablename__ = "privacy_ledger"
    __table_args__ = (
        UniqueConstraint("round", "unit"),
        CheckConstraint("delta > 0 AND delta < 1", name="delta"),
        CheckConstraint(
            "noise_multiplier >= 0 AND effective_noise_multiplier >= 0 AND count_noise >= 0",
            name="noise",
        ),
        CheckConstraint("clip_norm > 0", name="clip_norm"),
        CheckConstraint("inputs >= 0 AND min_inputs >= 0", name="inputs"),
        CheckConstraint(
            "epsilon_round >= 0 AND epsilon_total >= 0 AND target_epsilon > 0", name="epsilon"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round: Mapped[int] = mapped_column(ForeignKey("rounds.round"))
    unit: Mapped[str] = mapped_column(String(UNIT_LENGTH))
    accountant: Mapped[str] = mapped_column(Text)
    delta: Mapped[float] = mapped_column(Float)
    noise_multiplier: Mapped[float] = mapped_column(Float)
    effective_noise_multiplier: Mapped[float] = mapped_column(Float)
    clip_norm: Mapped[float] = mapped_column(Float)
    count_noise: Mapped[float] = mapped_column(Float)
    min_inputs: Mapped[int] = mapped_column(Integer)
    inputs: Mapped[int] = mapped_column(Integer)
    epsilon_round: Mapped[float] = mapped_column(Float)
    epsilon_total: Mapped[float] = mapped_column(Float)
    target_epsilon: Mapped[float] = mapped_column(Float)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime())


class EventRow(Base):
    """A notable event (a rejected message, a round abort, ...), counted by ``kind``."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(64), index=True)
    round: Mapped[int | None] = mapped_column(Integer)
    # Text, not String(64): events also name unknown senders, whatever they claim to be.
    agent_id: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[str] = mapped_column(Text)
