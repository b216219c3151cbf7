"""Tables of the coordinator store (SQLAlchemy 2 declarative, portable SQLite/PostgreSQL).

The Alembic migrations in ``fedgate_coordinator/migrations/versions`` create exactly these
tables; a test compares the two. Every timestamp is stored and returned as aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "AgentRow",
    "Base",
    "CloudAggregateRow",
    "DecisionRow",
    "EventRow",
    "EvidenceRow",
    "ModelRow",
    "PrivacyLedgerRow",
    "RoundParticipantRow",
    "RoundRow",
    "RoundStageRow",
    "UTCDateTime",
    "VoteRow",
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
UNIT_LENGTH = 32  # a unit of privacy: site or record
AGENT_ID_LENGTH = 64  # an agent id (fedgate_common.identifiers: 1-64 characters)
CLOUD_LENGTH = 64  # a cloud id (fedgate_common.identifiers: 1-64 characters)
STEP_LENGTH = 16  # a consensus step: proposal, prevote, precommit
_STEP_CHECK = "step IN ('proposal', 'prevote', 'precommit')"


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
    """What one round spent of one unit's privacy budget; one row per (round, unit, agent).

    ``unit`` is ``site`` for site-level DP (one agent's whole contribution to a round), with
    ``agent`` empty, or ``record`` for one agent's self-reported record-level DP-SGD.
    Every ε is stated at ``delta``: ``epsilon_round`` for this round alone,
    ``epsilon_total`` for all recorded rounds up to this one, against ``target_epsilon``.
    ``noise_multiplier`` is the configured z, ``effective_noise_multiplier`` what the
    released sum carried; ``inputs`` were summed (``min_inputs`` needed).
    """

    __tablename__ = "privacy_ledger"
    __table_args__ = (
        UniqueConstraint("round", "unit", "agent"),
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
    agent: Mapped[str] = mapped_column(String(AGENT_ID_LENGTH), server_default="")
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


class CloudAggregateRow(Base):
    """A signed per-cloud aggregate received (or sent) for one height: its metadata only.

    ``digest`` is the SHA-256 (hex) of the signed aggregate message; the raw delta is not
    stored. ``base_digest`` is the global model the cloud's round started from, ``norm``
    the L2 norm of its delta, ``participants`` its agents (0: the cloud's round aborted).
    One cloud may appear twice at a height only with different digests (an equivocating
    cloud), which the unique (height, cloud, digest) keeps visible.
    """

    __tablename__ = "cloud_aggregates"
    __table_args__ = (
        UniqueConstraint("height", "cloud", "digest"),
        CheckConstraint("height >= 0", name="height"),
        CheckConstraint("participants >= 0", name="participants"),
        CheckConstraint("norm >= 0", name="norm"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    height: Mapped[int] = mapped_column(Integer)
    cloud: Mapped[str] = mapped_column(String(CLOUD_LENGTH))
    base_digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    participants: Mapped[int] = mapped_column(Integer)
    norm: Mapped[float] = mapped_column(Float)
    digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class VoteRow(Base):
    """One signed consensus message: a proposal, prevote or precommit of ``voter``.

    ``value`` is the digest voted for (``''`` for a nil vote); ``own`` marks the votes this
    coordinator signed, ``envelope`` is the signed message exactly as sent or received.
    The partial unique index ``ix_votes_own_vote_once`` lets this coordinator hold at most
    one own vote per (height, round, step): it never signs two different values there.
    """

    __tablename__ = "votes"
    __table_args__ = (
        UniqueConstraint("height", "round", "step", "voter", "value"),
        CheckConstraint("height >= 0 AND round >= 0", name="height_round"),
        CheckConstraint(_STEP_CHECK, name="step"),
        Index(
            "ix_votes_own_vote_once",
            "height",
            "round",
            "step",
            unique=True,
            sqlite_where=text("own"),
            postgresql_where=text("own"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    height: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer)
    step: Mapped[str] = mapped_column(String(STEP_LENGTH))
    voter: Mapped[str] = mapped_column(String(CLOUD_LENGTH))
    value: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    own: Mapped[bool] = mapped_column(Boolean)
    envelope: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class DecisionRow(Base):
    """The global model decided at one height, with its commit certificate.

    ``value`` is the decided global model's digest, ``round`` the consensus round of the
    certificate, ``signers`` the clouds whose precommits it holds (comma-separated, sorted)
    and ``certificate`` the encoded commit certificate. One decision per height, never
    replaced.
    """

    __tablename__ = "decisions"
    __table_args__ = (CheckConstraint("height >= 0 AND round >= 0", name="height_round"),)

    height: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    round: Mapped[int] = mapped_column(Integer)
    value: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    signers: Mapped[str] = mapped_column(Text)
    certificate: Mapped[bytes] = mapped_column(LargeBinary)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime())


class EvidenceRow(Base):
    """Two conflicting signed messages of one ``voter`` for the same (height, round, step).

    The pair is kept in a canonical order (``first_value`` sorts before ``second_value``,
    checked by the store), so the same equivocation is recorded once whichever message
    arrived first; both signed envelopes are kept as proof.
    """

    __tablename__ = "evidence"
    __table_args__ = (
        UniqueConstraint("voter", "height", "round", "step", "first_value", "second_value"),
        CheckConstraint("height >= 0 AND round >= 0", name="height_round"),
        CheckConstraint(_STEP_CHECK, name="step"),
        CheckConstraint("first_value <> second_value", name="values_differ"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    voter: Mapped[str] = mapped_column(String(CLOUD_LENGTH))
    height: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer)
    step: Mapped[str] = mapped_column(String(STEP_LENGTH))
    first_value: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    second_value: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    first_envelope: Mapped[bytes] = mapped_column(LargeBinary)
    second_envelope: Mapped[bytes] = mapped_column(LargeBinary)
    detected_at: Mapped[datetime] = mapped_column(UTCDateTime())
