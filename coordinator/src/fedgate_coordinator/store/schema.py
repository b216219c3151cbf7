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
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "AgentRow",
    "Base",
    "EventRow",
    "ModelRow",
    "RoundParticipantRow",
    "RoundRow",
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
    """One training round, from start to completion or abort."""

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


class RoundParticipantRow(Base):
    """What one agent contributed to a round at one stage: metadata, never the update."""

    __tablename__ = "round_participants"

    round: Mapped[int] = mapped_column(ForeignKey("rounds.round"), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    stage: Mapped[str] = mapped_column(String(32), primary_key=True)
    num_samples: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float] = mapped_column(Float)
    bytes_up: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


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
