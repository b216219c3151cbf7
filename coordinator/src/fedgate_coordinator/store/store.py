"""The coordinator store: agents, rounds, the model hash chain, the privacy ledger, cross-cloud
consensus (per-cloud aggregates, votes, decisions, evidence) and events in one database.

Works the same on a SQLite file (the embedded default), in-memory SQLite (tests) and
PostgreSQL. Every public method is one transaction; multi-row changes such as
:meth:`Store.complete_round` are recorded entirely or not at all.
"""

from __future__ import annotations

import math
import numbers
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import msgspec
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from fedgate_common.digests import GENESIS_PARENT, model_digest
from fedgate_common.errors import FedgateError, InvalidIdentifier
from fedgate_common.identifiers import validate_identifier
from sqlalchemy import (
    URL,
    ColumnElement,
    Connection,
    Engine,
    Select,
    case,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker
from sqlalchemy.pool import StaticPool

from fedgate_coordinator.errors import (
    AgentConflict,
    AgentNotEnrolled,
    AgentRevoked,
    ChainBroken,
    RoundStateError,
    StoreError,
)
from fedgate_coordinator.store.records import (
    CONSENSUS_STEPS,
    NIL_VALUE,
    AgentRecord,
    AgentStatus,
    AggregateRecord,
    Aggregation,
    DecisionRecord,
    EventRecord,
    EvidenceRecord,
    ModelRecord,
    ModelSummary,
    ParticipantRecord,
    PrivacyLedgerEntry,
    RoundRecord,
    RoundStageRecord,
    RoundStatus,
    VoteRecord,
    stage_order,
)
from fedgate_coordinator.store.schema import (
    AGENT_ID_LENGTH,
    STAGE_LENGTH,
    UNIT_LENGTH,
    AgentRow,
    Base,
    CloudAggregateRow,
    DecisionRow,
    EventRow,
    EvidenceRow,
    ModelRow,
    PrivacyLedgerRow,
    RoundParticipantRow,
    RoundRow,
    RoundStageRow,
    VoteRow,
)

__all__ = [
    "MIGRATIONS_DIR",
    "Store",
    "alembic_config",
    "head_revision",
    "missing_sqlite_file",
    "normalize_url",
    "sqlite_file",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# How long a transaction waits for a lock another process holds before it fails with a
# StoreError (SQLite's busy timeout; PostgreSQL's lock_timeout), so that a command never
# hangs behind a forgotten shell transaction.
STORE_LOCK_WAIT_MS = 5000
_LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE when lock_timeout expires
_DIGEST = re.compile(r"[0-9a-f]{64}")
_STAGE = re.compile(rf"[a-z][a-z0-9_]{{0,{STAGE_LENGTH - 1}}}")
_UNIT = re.compile(rf"[a-z][a-z0-9_]{{0,{UNIT_LENGTH - 1}}}")
MAX_WORD_BITS = 64
_BEGIN_OPTION = "fedgate_sqlite_begin"  # an execution option: how a SQLite transaction begins
_RowT = TypeVar("_RowT", bound=Base)


def normalize_url(url: str | URL) -> URL:
    """Parse ``url``; plain ``postgresql://`` (or ``postgres://``) selects psycopg 3."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"invalid database URL {url!r}: {exc}") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic configuration for the store's migrations, built in code (no ``.ini``)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if url is not None:
        rendered = normalize_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest migration revision shipped with this version of the coordinator."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise StoreError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def known_revisions() -> set[str]:
    """Every migration revision shipped with this version of the coordinator."""
    return {
        script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()
    }


def _now() -> datetime:
    return datetime.now(UTC)


def sqlite_file(url: str) -> Path | None:
    """The file an SQLite ``url`` names, or None when it names none (another back end,
    memory, an SQLite ``file:`` URI with its own rules)."""
    parsed = normalize_url(url)
    if _is_sqlite_memory(parsed) or parsed.get_backend_name() != "sqlite":
        return None
    database = str(parsed.database)
    return None if database.startswith("file:") else Path(database)


def missing_sqlite_file(url: str) -> Path | None:
    """The file an SQLite ``url`` names when it does not exist (connecting would create an
    empty one), else None (it exists, or the URL names no file)."""
    path = sqlite_file(url)
    return None if path is None or path.exists() else path


def _is_sqlite_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _create_engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        # Added to the URL's own options (a search_path, say), before them: a lock_timeout
        # the operator sets there wins.
        given = url.query.get("options", ())
        options = [f"-c lock_timeout={STORE_LOCK_WAIT_MS}"]
        options += [given] if isinstance(given, str) else list(given)
        url = url.update_query_dict({"options": " ".join(options)})
        return create_engine(url, pool_pre_ping=True)
    memory = _is_sqlite_memory(url)
    if memory:
        # One connection for every session, so all of them see the same in-memory database.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        engine = create_engine(url)

    def configure_connection(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        # Let SQLAlchemy emit BEGIN itself (see "begin" below): the sqlite3 driver's legacy
        # mode would not start a transaction before SELECT or DDL.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={STORE_LOCK_WAIT_MS}")
            if not memory:
                cursor.execute("PRAGMA journal_mode=WAL")
        finally:
            cursor.close()

    def begin_transaction(connection: Connection) -> None:
        # A transaction that reads and then writes must take the write lock at its start:
        # in WAL mode a deferred one whose snapshot another commit has overtaken gets
        # SQLITE_BUSY at its first write at once, without the busy timeout.
        mode = connection.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    event.listen(engine, "connect", configure_connection)
    event.listen(engine, "begin", begin_transaction)
    return engine


class Store:
    """Persistent state of one coordinator. Create with :meth:`open`; close with :meth:`close`.

    Safe to share between threads, except an in-memory SQLite store (one shared connection),
    which is meant for tests.
    """

    def __init__(self, *, engine: Engine) -> None:
        self._engine = engine
        writer = engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})
        self._sessions = sessionmaker(writer, expire_on_commit=False)
        self._read_sessions = sessionmaker(engine, expire_on_commit=False)

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> Store:
        """Connect to ``url`` and, when ``migrate``, upgrade the schema to the newest revision.

        ``sqlite:///path/file.db``, ``sqlite://`` (memory) and ``postgresql://...`` URLs are
        accepted. Raises :class:`StoreError` if the database cannot be reached or migrated.
        """
        parsed = normalize_url(url)
        shown = parsed.render_as_string(hide_password=True)
        try:
            engine = _create_engine(parsed)
        except (SQLAlchemyError, ImportError) as exc:
            raise StoreError(f"cannot use database {shown}: {exc}") from exc
        store = cls(engine=engine)
        try:
            with engine.connect():
                pass
            store._refuse_unknown_revision(shown)
            if migrate:
                store.upgrade_schema()
        except (SQLAlchemyError, CommandError) as exc:
            engine.dispose()
            raise StoreError(f"cannot open store at {shown}: {exc}") from exc
        except BaseException:
            engine.dispose()
            raise
        return store

    def close(self) -> None:
        """Release every database connection (an in-memory database is gone afterwards)."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for maintenance tools and tests)."""
        return self._engine

    def upgrade_schema(self, revision: str = "head") -> None:
        """Run the Alembic migrations up to ``revision`` in one transaction."""
        config = alembic_config(self._engine.url)
        with self._engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)

    def schema_revision(self) -> str | None:
        """The Alembic revision of the database, ``None`` if it was never migrated."""
        with self._engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()

    def _refuse_unknown_revision(self, shown: str) -> None:
        revision = self.schema_revision()
        if revision is not None and revision not in known_revisions():
            raise StoreError(
                f"the store at {shown} is at schema revision {revision}, which this "
                f"fedgate-coordinator does not know (it knows up to {head_revision()}): a "
                "newer version migrated it; install that version, or restore the backup "
                "taken before the upgrade"
            )

    def require_schema(self) -> None:
        """Refuse a database that holds no coordinator store (never migrated): only `init`
        creates one. A mistyped database_url, or a restore into an empty database that
        skipped `pg_restore`, would otherwise get a new, empty store."""
        if self.schema_revision() is None:
            raise self._no_store()

    def _no_store(self) -> StoreError:
        shown = self._engine.url.render_as_string(hide_password=True)
        return StoreError(
            f"the database {shown} holds no coordinator store: run `fedgate-coordinator "
            "init`, or check database_url in coordinator.toml"
        )

    def require_current_schema(self) -> None:
        """For commands that only read: refuse a store that is not at this version's
        newest revision instead of migrating it (a backup being inspected stays as it is,
        and a running older ``serve`` is not migrated under)."""
        revision, head = self.schema_revision(), head_revision()
        if revision == head:
            return
        if revision is None:
            raise self._no_store()
        shown = self._engine.url.render_as_string(hide_password=True)
        raise StoreError(
            f"the store at {shown} is at schema revision {revision} and this "
            f"fedgate-coordinator needs {head}; commands that only read do not migrate it: "
            "back it up, then start `serve` once, which migrates it (operations.md section 10)"
        )

    @contextmanager
    def _transaction(self, *, writes: bool = True) -> Iterator[Session]:
        """A session in one transaction; database failures become :class:`StoreError`.

        ``writes=False`` for transactions that only read: on SQLite they do not take the
        write lock, so they never wait for the service's writes nor hold them up.
        """
        sessions = self._sessions if writes else self._read_sessions
        try:
            with sessions.begin() as session:
                yield session
        except OperationalError as exc:
            if "database is locked" in str(exc.orig):
                raise StoreError(
                    f"the store stayed locked by another process for {STORE_LOCK_WAIT_MS} ms "
                    "(a sqlite3 shell with an open transaction? a backup?); try again"
                ) from exc
            if getattr(exc.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
                raise StoreError(
                    f"the store stayed locked by another session for {STORE_LOCK_WAIT_MS} "
                    "ms (a psql session with an open transaction? a LOCK TABLE? see "
                    "pg_locks); try again"
                ) from exc
            raise StoreError(f"database error: {exc}") from exc
        except SQLAlchemyError as exc:
            raise StoreError(f"database error: {exc}") from exc

    # -- agents ------------------------------------------------------------------------

    def enroll_agent(self, agent_id: str, public_key: str) -> AgentRecord:
        """Enroll an agent; enrolling the same id with the same key again changes nothing.

        Raises :class:`AgentRevoked` if ``agent_id`` was revoked (with any key; it is not
        enrolled again, and no broker login is issued for it), :class:`AgentConflict` if it is
        enrolled with another key, and ``InvalidIdentifier`` if it cannot be used in a topic.
        """
        validate_identifier(agent_id, what="agent id")
        if not public_key:
            raise StoreError(f"agent {agent_id!r}: empty public key")
        with self._transaction() as session:
            row = session.get(AgentRow, agent_id)
            if row is None:
                row = AgentRow(
                    agent_id=agent_id,
                    public_key=public_key,
                    enrolled_at=_now(),
                    last_seen_at=None,
                    status=AgentStatus.ACTIVE.value,
                )
                session.add(row)
                session.flush()
            elif row.status == AgentStatus.REVOKED.value:
                raise AgentRevoked(agent_id)
            elif row.public_key != public_key:
                raise AgentConflict(agent_id)
            return _agent_record(row)

    def get_agent(self, agent_id: str) -> AgentRecord | None:
        with self._transaction(writes=False) as session:
            row = session.get(AgentRow, agent_id)
            return None if row is None else _agent_record(row)

    def list_agents(self) -> list[AgentRecord]:
        """Every enrolled agent (active and revoked), by id."""
        with self._transaction(writes=False) as session:
            rows = session.scalars(select(AgentRow).order_by(AgentRow.agent_id))
            return [_agent_record(row) for row in rows]

    def touch_agent(self, agent_id: str) -> None:
        """Set the agent's ``last_seen_at`` to now."""
        with self._transaction() as session:
            self._agent_row(session, agent_id).last_seen_at = _now()

    def revoke_agent(self, agent_id: str) -> None:
        """Mark an agent revoked; its row (and key) is kept for the audit trail."""
        with self._transaction() as session:
            self._agent_row(session, agent_id).status = AgentStatus.REVOKED.value

    @staticmethod
    def _agent_row(session: Session, agent_id: str) -> AgentRow:
        row = session.get(AgentRow, agent_id)
        if row is None:
            raise AgentNotEnrolled(agent_id)
        return row

    # -- models ------------------------------------------------------------------------

    def add_model(self, model: ModelRecord) -> None:
        """Append ``model`` to the hash chain (see :meth:`_append_model` for the checks)."""
        with self._transaction() as session:
            self._append_model(session, model)

    def head_model(self) -> ModelRecord | None:
        """The newest model (highest round), ``None`` before the genesis model exists."""
        with self._transaction(writes=False) as session:
            row = session.scalars(select(ModelRow).order_by(ModelRow.round.desc()).limit(1)).first()
            return None if row is None else _model_record(row)

    def history_marks(self) -> tuple[str | None, int]:
        """(genesis digest, enrolled agents) read with plain SQL, at any schema revision and
        before migrating: whether this store holds a coordinator's history, and whose.
        (None, 0) for a database no migration ever ran on. Tables are found as the store's
        own queries find them (PostgreSQL: the whole search_path)."""
        if self.schema_revision() is None:  # Alembic's table, found as every query finds it
            return None, 0
        try:
            with self._engine.connect() as connection:
                genesis = connection.execute(
                    text("SELECT digest FROM models WHERE parent_digest = '' LIMIT 1")
                ).scalar()
                agents = connection.execute(text("SELECT count(*) FROM agents")).scalar()
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read the store: {exc}") from exc
        return (None if genesis is None else str(genesis)), int(agents or 0)

    def get_model(self, digest: str) -> ModelRecord | None:
        with self._transaction(writes=False) as session:
            row = session.get(ModelRow, digest)
            return None if row is None else _model_record(row)

    def list_models(self) -> list[ModelSummary]:
        """Every model without its weights, in chain order (genesis first)."""
        query = select(
            ModelRow.digest,
            ModelRow.parent_digest,
            ModelRow.round,
            ModelRow.created_at,
            ModelRow.num_parameters,
        ).order_by(ModelRow.round)
        with self._transaction(writes=False) as session:
            return [
                ModelSummary(
                    digest=digest,
                    parent_digest=parent,
                    round=round,
                    created_at=created_at,
                    num_parameters=num_parameters,
                )
                for digest, parent, round, created_at, num_parameters in session.execute(query)
            ]

    def verify_chain(self) -> int:
        """Recompute every digest from genesis to head and check every parent link.

        Returns the chain length (0 when empty); raises :class:`ChainBroken` naming the
        first round whose model does not verify.
        """
        length = 0
        expected_parent = GENESIS_PARENT
        # Stream a few rows at a time: a long chain of large models need not fit in memory.
        query = select(ModelRow).order_by(ModelRow.round).execution_options(yield_per=4)
        with self._transaction(writes=False) as session, session.scalars(query) as rows:
            for row in rows:
                model = _model_record(row)
                if model.parent_digest != expected_parent:
                    raise ChainBroken(
                        f"parent is {model.parent_digest!r}, expected {expected_parent!r}",
                        round=model.round,
                    )
                _check_contents(model)
                session.expunge(row)
                expected_parent = model.digest
                length += 1
        return length

    def _append_model(self, session: Session, model: ModelRecord) -> None:
        """Check ``model`` against the chain head and its own contents, then insert it.

        The genesis model has parent ``""`` and is allowed only while no model exists; every
        other model names the current head as parent, has a higher round, and its digest
        is :func:`fedgate_common.digests.model_digest` over its parent, round, spec and
        weights. The unique ``parent_digest`` column stops two writers forking the chain.
        """
        head = session.scalars(select(ModelRow).order_by(ModelRow.round.desc()).limit(1)).first()
        if head is None:
            if model.parent_digest != GENESIS_PARENT:
                raise ChainBroken(
                    "the store has no models yet, so this must be a genesis model "
                    f"(parent ''), not a child of {model.parent_digest!r}",
                    round=model.round,
                )
        else:
            if model.parent_digest != head.digest:
                raise ChainBroken(
                    f"parent {model.parent_digest!r} is not the head {head.digest!r} "
                    f"(round {head.round})",
                    round=model.round,
                )
            if model.round <= head.round:
                raise ChainBroken(
                    f"round {model.round} is not after the head's round {head.round}",
                    round=model.round,
                )
        _check_contents(model)
        session.add(
            ModelRow(
                digest=model.digest,
                parent_digest=model.parent_digest,
                round=model.round,
                created_at=model.created_at or _now(),
                spec=model.spec,
                weights=model.weights,
                num_parameters=model.num_parameters,
            )
        )
        session.flush()

    # -- rounds ------------------------------------------------------------------------

    def next_round_number(self) -> int:
        """One more than any round ever begun (any status) or modelled; 1 when none.

        Round numbers are never reused, even after an abort.
        """
        with self._transaction(writes=False) as session:
            return self._next_round_number(session)

    @staticmethod
    def _next_round_number(session: Session) -> int:
        last_round = session.scalar(select(func.max(RoundRow.round)))
        last_model = session.scalar(select(func.max(ModelRow.round)))
        return max(last_round or 0, last_model or 0) + 1

    def begin_round(
        self,
        *,
        round: int,
        base_digest: str,
        selected: int,
        min_participants: int,
        aggregation: str = "plaintext",
        threshold: int | None = None,
        graph_degree: int | None = None,
        word_bits: int | None = None,
    ) -> None:
        """Record round ``round`` as running.

        ``aggregation`` is ``"plaintext"`` or ``"secagg"`` (see :class:`Aggregation`). A
        ``secagg`` round needs its SecAgg+ parameters: ``threshold`` (t, shares needed to
        reconstruct a secret, >= 1), ``graph_degree`` (neighbours per agent, >= 0: a lone
        agent has none) and ``word_bits`` (inputs are summed modulo 2^word_bits, 1..64); a
        plaintext round takes none of them. Violations raise :class:`StoreError`.

        Raises :class:`RoundStateError` unless ``round`` is at least
        :meth:`next_round_number`: a number is never reused, whatever became of its round.
        """
        kind = _check_aggregation(
            round=round,
            aggregation=aggregation,
            threshold=threshold,
            graph_degree=graph_degree,
            word_bits=word_bits,
        )
        with self._transaction() as session:
            if session.get(RoundRow, round) is not None:
                raise RoundStateError(f"round {round} already exists", round=round)
            next_round = self._next_round_number(session)
            if round < next_round:
                raise RoundStateError(
                    f"round {round} is below the next round number {next_round}: "
                    "round numbers are never reused",
                    round=round,
                )
            session.add(
                RoundRow(
                    round=round,
                    status=RoundStatus.RUNNING.value,
                    base_digest=base_digest,
                    started_at=_now(),
                    selected=selected,
                    min_participants=min_participants,
                    aggregation=kind.value,
                    threshold=threshold,
                    graph_degree=graph_degree,
                    word_bits=word_bits,
                )
            )
            session.flush()

    def complete_round(
        self,
        *,
        round: int,
        participants: Sequence[ParticipantRecord],
        model: ModelRecord,
        mean_train_loss: float | None,
        bytes_down_per_agent: int,
    ) -> None:
        """Record the participants, append the aggregated model and mark the round completed.

        ``mean_train_loss`` may be ``None`` when the coordinator does not know it (secure
        aggregation). Stages recorded with :meth:`record_stage` are kept as they are.

        One transaction: if any part fails (for example :class:`ChainBroken`), nothing of it
        is recorded and the round stays running.
        """
        with self._transaction() as session:
            row = self._running_round(session, round)
            self._add_participants(session, row, participants)
            if model.round != round:
                raise ChainBroken(f"the model is for round {model.round}", round=round)
            if model.parent_digest != row.base_digest:
                raise ChainBroken(
                    f"parent {model.parent_digest!r} is not the round's base model "
                    f"{row.base_digest!r}",
                    round=round,
                )
            self._append_model(session, model)
            row.status = RoundStatus.COMPLETED.value
            row.model_digest = model.digest
            row.participants = len(participants)
            row.mean_train_loss = mean_train_loss
            row.bytes_down_per_agent = bytes_down_per_agent
            row.ended_at = _now()

    def abort_round(
        self, *, round: int, reason: str, participants: Sequence[ParticipantRecord] = ()
    ) -> None:
        """Mark a running round aborted, recording who had contributed (one transaction).

        ``participants`` of the round row becomes ``len(participants)``. Stages recorded
        before the abort stay, so the record shows where the round stopped.
        """
        with self._transaction() as session:
            row = self._running_round(session, round)
            self._add_participants(session, row, participants)
            row.status = RoundStatus.ABORTED.value
            row.abort_reason = reason
            row.participants = len(participants)
            row.ended_at = _now()

    def running_rounds(self) -> list[int]:
        """Rounds begun and neither completed nor aborted, oldest first."""
        query = (
            select(RoundRow.round)
            .where(RoundRow.status == RoundStatus.RUNNING.value)
            .order_by(RoundRow.round)
        )
        with self._transaction(writes=False) as session:
            return list(session.scalars(query))

    def get_round(self, round: int) -> RoundRecord | None:
        with self._transaction(writes=False) as session:
            row = session.get(RoundRow, round)
            return None if row is None else _round_record(row)

    def list_rounds(self, limit: int | None = None) -> list[RoundRecord]:
        """Rounds, newest first; at most ``limit`` of them."""
        query = select(RoundRow).order_by(RoundRow.round.desc()).limit(limit)
        with self._transaction(writes=False) as session:
            return [_round_record(row) for row in session.scalars(query)]

    def participants(self, round: int) -> list[ParticipantRecord]:
        """What each agent contributed to ``round``, by agent id then stage."""
        query = (
            select(RoundParticipantRow)
            .where(RoundParticipantRow.round == round)
            .order_by(RoundParticipantRow.agent_id, RoundParticipantRow.stage)
        )
        with self._transaction(writes=False) as session:
            return [_participant_record(row) for row in session.scalars(query)]

    def record_stage(
        self,
        *,
        round: int,
        stage: str,
        expected: int,
        received: int,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
    ) -> None:
        """Record how stage ``stage`` of the running round ``round`` went.

        ``expected`` agents were waited for and ``received`` answered (0 <= received <=
        expected); ``bytes_in`` sums what agents sent at this stage, ``bytes_out`` what the
        coordinator published for it, summed over recipients; ``seconds`` is the stage's
        duration. ``stage`` is 1-32 characters ``a-z 0-9 _`` starting with a letter: the
        SecAgg+ stages ``keys``, ``shares``, ``masked``, ``confirm``, ``reveal``, or
        ``update`` for the one stage of a plaintext round.

        Raises :class:`RoundStateError` if the round is not running or the stage is recorded
        already, :class:`StoreError` if a value is out of range.
        """
        _check_stage(
            round=round,
            stage=stage,
            expected=expected,
            received=received,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            seconds=seconds,
        )
        with self._transaction() as session:
            self._running_round(session, round)
            if session.get(RoundStageRow, (round, stage)) is not None:
                raise RoundStateError(
                    f"stage {stage!r} of round {round} is recorded already", round=round
                )
            session.add(
                RoundStageRow(
                    round=round,
                    stage=stage,
                    expected=expected,
                    received=received,
                    bytes_in=bytes_in,
                    bytes_out=bytes_out,
                    seconds=float(seconds),
                    recorded_at=_now(),
                )
            )
            try:
                session.flush()
            except IntegrityError as exc:  # another writer recorded it first
                raise RoundStateError(
                    f"stage {stage!r} of round {round} is recorded already", round=round
                ) from exc

    def stages(self, round: int) -> list[RoundStageRecord]:
        """The stages recorded for ``round``: ``keys``, ``shares``, ``masked``, ``confirm``,
        ``reveal`` in protocol order, then any other (such as ``update``) by name.

        Empty for a round without recorded stages or a round that does not exist.
        """
        query = select(RoundStageRow).where(RoundStageRow.round == round)
        with self._transaction(writes=False) as session:
            records = [_stage_record(row) for row in session.scalars(query)]
        return sorted(records, key=lambda record: stage_order(record.stage))

    def set_round_clip(self, round: int, *, clip_norm: float, within_clip: float | None) -> None:
        """Record the clip norm round ``round`` used and, if measured, the fraction of inputs
        within it (noisy under site-level DP, so it may fall slightly outside [0, 1]).

        May be called again for the same round, e.g. first with ``within_clip=None`` when
        the round begins and again once the sum is decoded; the last call wins.

        Raises :class:`RoundStateError` if the round was never begun, :class:`StoreError`
        unless ``clip_norm`` is a finite number > 0 and ``within_clip`` finite or ``None``.
        """
        if not _is_finite_number(clip_norm) or clip_norm <= 0:
            raise StoreError(
                f"round {round}: clip_norm must be a finite number > 0, got {clip_norm!r}"
            )
        if within_clip is not None and not _is_finite_number(within_clip):
            raise StoreError(
                f"round {round}: within_clip must be a finite number or None, got {within_clip!r}"
            )
        with self._transaction() as session:
            row = self._begun_round(session, round)
            row.clip_norm = float(clip_norm)
            row.within_clip = None if within_clip is None else float(within_clip)

    @staticmethod
    def _begun_round(session: Session, round: int) -> RoundRow:
        """The round's row, locked; :class:`RoundStateError` if it was never begun."""
        row = session.get(RoundRow, round, with_for_update=True)
        if row is None:
            raise RoundStateError(f"round {round} was never begun", round=round)
        return row

    @staticmethod
    def _running_round(session: Session, round: int) -> RoundRow:
        row = Store._begun_round(session, round)
        if row.status != RoundStatus.RUNNING.value:
            raise RoundStateError(f"round {round} is {row.status}, not running", round=round)
        return row

    @staticmethod
    def _add_participants(
        session: Session, row: RoundRow, participants: Sequence[ParticipantRecord]
    ) -> None:
        """Add ``participants`` to the round ``row``.

        In a secure-aggregation round a participant that carries ``num_samples`` or
        ``train_loss`` is refused (:class:`StoreError`): the coordinator must not know them,
        so a value there means a caller leaked or invented it.
        """
        if row.aggregation == Aggregation.SECAGG.value:
            for participant in participants:
                if participant.num_samples is not None or participant.train_loss is not None:
                    raise StoreError(
                        f"round {row.round} uses secure aggregation: participant "
                        f"{participant.agent_id!r} must not carry num_samples or train_loss"
                    )
        now = _now()
        session.add_all(
            RoundParticipantRow(
                round=row.round,
                agent_id=participant.agent_id,
                stage=participant.stage,
                num_samples=participant.num_samples,
                train_loss=participant.train_loss,
                bytes_up=participant.bytes_up,
                received_at=participant.received_at or now,
            )
            for participant in participants
        )
        session.flush()

    # -- privacy ledger ----------------------------------------------------------------

    def record_privacy(self, entry: PrivacyLedgerEntry) -> None:
        """Add what round ``entry.round`` spent of the privacy budget of ``entry.unit``
        (for record level: what ``entry.agent`` reported it spent).

        The round must have been begun (any status: the sum may be released just before
        the round completes). ``recorded_at`` is set to now when ``None``. The ledger is
        append-only: an entry is never replaced.

        Raises :class:`RoundStateError` if the round was never begun or already has an entry
        for ``entry.unit`` and ``entry.agent``, :class:`StoreError` if a value is out of
        range (see :func:`_check_privacy`).
        """
        _check_privacy(entry)
        whose = f" of agent {entry.agent!r}" if entry.agent else ""
        duplicate = (
            f"privacy of round {entry.round} for unit {entry.unit!r}{whose} is recorded already"
        )
        with self._transaction() as session:
            self._begun_round(session, entry.round)
            existing = session.scalar(
                select(PrivacyLedgerRow.id).where(
                    PrivacyLedgerRow.round == entry.round,
                    PrivacyLedgerRow.unit == entry.unit,
                    PrivacyLedgerRow.agent == entry.agent,
                )
            )
            if existing is not None:
                raise RoundStateError(duplicate, round=entry.round)
            session.add(
                PrivacyLedgerRow(
                    round=entry.round,
                    unit=entry.unit,
                    agent=entry.agent,
                    accountant=entry.accountant,
                    delta=float(entry.delta),
                    noise_multiplier=float(entry.noise_multiplier),
                    effective_noise_multiplier=float(entry.effective_noise_multiplier),
                    clip_norm=float(entry.clip_norm),
                    count_noise=float(entry.count_noise),
                    min_inputs=int(entry.min_inputs),
                    inputs=int(entry.inputs),
                    epsilon_round=float(entry.epsilon_round),
                    epsilon_total=float(entry.epsilon_total),
                    target_epsilon=float(entry.target_epsilon),
                    recorded_at=entry.recorded_at or _now(),
                )
            )
            try:
                session.flush()
            except IntegrityError as exc:  # another writer recorded it first
                raise RoundStateError(duplicate, round=entry.round) from exc

    def latest_privacy_entry(self, unit: str, agent: str) -> PrivacyLedgerEntry | None:
        """``agent``'s entry of ``unit`` of its latest round; ``None`` before its first."""
        query = (
            select(PrivacyLedgerRow)
            .where(PrivacyLedgerRow.unit == unit, PrivacyLedgerRow.agent == agent)
            .order_by(PrivacyLedgerRow.round.desc())
            .limit(1)
        )
        with self._transaction(writes=False) as session:
            row = session.scalars(query).first()
            return None if row is None else _privacy_entry(row)

    def privacy_ledger(self, unit: str | None = None) -> list[PrivacyLedgerEntry]:
        """The privacy ledger by round (then unit, agent); only ``unit``'s entries when
        given."""
        query = select(PrivacyLedgerRow).order_by(
            PrivacyLedgerRow.round, PrivacyLedgerRow.unit, PrivacyLedgerRow.agent
        )
        if unit is not None:
            query = query.where(PrivacyLedgerRow.unit == unit)
        with self._transaction(writes=False) as session:
            return [_privacy_entry(row) for row in session.scalars(query)]

    # -- cross-cloud consensus ---------------------------------------------------------

    def record_cloud_aggregate(self, record: AggregateRecord) -> bool:
        """Keep the metadata of a signed per-cloud aggregate (see :class:`AggregateRecord`).

        Idempotent on (height, cloud, digest): returns ``False``, and changes nothing, when
        that aggregate is recorded already; ``True`` when it was added. Raises
        :class:`StoreError` if a value is out of range (see :func:`_check_aggregate`).
        """
        record = _check_aggregate(record)
        existing = select(CloudAggregateRow.id).where(
            CloudAggregateRow.height == record.height,
            CloudAggregateRow.cloud == record.cloud,
            CloudAggregateRow.digest == record.digest,
        )
        row = CloudAggregateRow(
            height=record.height,
            cloud=record.cloud,
            base_digest=record.base_digest,
            participants=record.participants,
            norm=record.norm,
            digest=record.digest,
            received_at=record.received_at or _now(),
        )
        return self._add_once(row, existing)

    def cloud_aggregates(self, height: int) -> list[AggregateRecord]:
        """The aggregates recorded for ``height``, by cloud id (then in order of arrival)."""
        query = (
            select(CloudAggregateRow)
            .where(CloudAggregateRow.height == height)
            .order_by(CloudAggregateRow.cloud, CloudAggregateRow.id)
        )
        with self._transaction(writes=False) as session:
            return [_aggregate_record(row) for row in session.scalars(query)]

    def record_vote(self, vote: VoteRecord) -> bool:
        """Keep a signed proposal, prevote or precommit (see :class:`VoteRecord`).

        Idempotent on (height, round, step, voter, value): returns ``False``, keeping the
        first envelope, when that vote is recorded already; ``True`` when it was added.
        A peer's second, different vote for one (height, round, step) is recorded too (it
        is evidence; see :meth:`record_evidence`).

        Raises :class:`StoreError` if a value is out of range (see :func:`_check_vote`), or
        if ``vote.own`` and this coordinator already recorded an own vote for a different
        value at the same (height, round, step): it must never sign two (DESIGN.md
        section 5). The database enforces that too (index ``ix_votes_own_vote_once``).
        """
        vote = _check_vote(vote)
        existing = select(VoteRow.id).where(
            VoteRow.height == vote.height,
            VoteRow.round == vote.round,
            VoteRow.step == vote.step,
            VoteRow.voter == vote.voter,
            VoteRow.value == vote.value,
        )

        def refuse_second_own_vote(session: Session) -> None:
            if not vote.own:
                return
            signed = session.scalar(
                select(VoteRow.value).where(
                    VoteRow.height == vote.height,
                    VoteRow.round == vote.round,
                    VoteRow.step == vote.step,
                    VoteRow.own.is_(True),
                )
            )
            if signed is not None and signed != vote.value:
                raise StoreError(
                    f"height {vote.height}, round {vote.round}, {vote.step}: this coordinator "
                    f"already signed {signed or 'nil'!r}; refusing to record a second own vote "
                    f"for {vote.value or 'nil'!r}"
                )

        row = VoteRow(
            height=vote.height,
            round=vote.round,
            step=vote.step,
            voter=vote.voter,
            value=vote.value,
            own=bool(vote.own),
            envelope=bytes(vote.envelope),
            received_at=vote.received_at or _now(),
        )
        return self._add_once(row, existing, before_insert=refuse_second_own_vote)

    def votes(self, height: int | None = None, limit: int | None = None) -> list[VoteRecord]:
        """Recorded votes ordered by height, round, step (proposal, prevote, precommit),
        voter and value; only ``height``'s when given, and only the last ``limit`` of that
        order (the newest heights) when ``limit`` is given.
        """
        step_order = case(
            {step: index for index, step in enumerate(CONSENSUS_STEPS)}, value=VoteRow.step
        )
        order = (VoteRow.height, VoteRow.round, step_order, VoteRow.voter, VoteRow.value)
        where = () if height is None else (VoteRow.height == height,)
        rows = self._newest_last(VoteRow, order, limit, where=where)
        return [_vote_record(row) for row in rows]

    def record_decision(self, decision: DecisionRecord) -> bool:
        """Keep the decision of height ``decision.height`` with its commit certificate.

        Returns ``True`` when recorded, ``False`` when that height was decided already with
        the same value (the first certificate is kept). Raises :class:`StoreError` if the
        height is decided with a different value, which would mean the federation forked,
        or if a value is out of range (see :func:`_check_decision`).
        """
        decision = _check_decision(decision)
        with self._transaction() as session:
            existing = session.get(DecisionRow, decision.height)
            if existing is None:
                try:
                    with session.begin_nested():
                        session.add(
                            DecisionRow(
                                height=decision.height,
                                round=decision.round,
                                value=decision.value,
                                signers=",".join(decision.signers),
                                certificate=bytes(decision.certificate),
                                decided_at=decision.decided_at or _now(),
                            )
                        )
                    return True
                except IntegrityError:  # another writer decided this height first
                    existing = session.get(DecisionRow, decision.height)
                    if existing is None:
                        raise
            if existing.value != decision.value:
                raise StoreError(
                    f"height {decision.height} is decided already on {existing.value!r} "
                    f"(round {existing.round}); refusing the conflicting decision "
                    f"{decision.value!r} (round {decision.round})"
                )
            return False

    def decision(self, height: int) -> DecisionRecord | None:
        """The decision of ``height``, ``None`` while it is undecided."""
        with self._transaction(writes=False) as session:
            row = session.get(DecisionRow, height)
            return None if row is None else _decision_record(row)

    def decisions(self, limit: int | None = None) -> list[DecisionRecord]:
        """Decisions by height, newest last; only the last ``limit`` when given."""
        rows = self._newest_last(DecisionRow, (DecisionRow.height,), limit)
        return [_decision_record(row) for row in rows]

    def last_decision(self) -> DecisionRecord | None:
        """The decision of the highest decided height, ``None`` before the first."""
        query = select(DecisionRow).order_by(DecisionRow.height.desc()).limit(1)
        with self._transaction(writes=False) as session:
            row = session.scalars(query).first()
            return None if row is None else _decision_record(row)

    def record_evidence(self, evidence: EvidenceRecord) -> bool:
        """Keep two conflicting signed messages of one voter (see :class:`EvidenceRecord`).

        Idempotent on (voter, height, round, step, first_value, second_value): returns
        ``False`` when that equivocation is recorded already, ``True`` when it was added.
        Raises :class:`StoreError` if a value is out of range (see :func:`_check_evidence`).
        """
        evidence = _check_evidence(evidence)
        existing = select(EvidenceRow.id).where(
            EvidenceRow.voter == evidence.voter,
            EvidenceRow.height == evidence.height,
            EvidenceRow.round == evidence.round,
            EvidenceRow.step == evidence.step,
            EvidenceRow.first_value == evidence.first_value,
            EvidenceRow.second_value == evidence.second_value,
        )
        row = EvidenceRow(
            voter=evidence.voter,
            height=evidence.height,
            round=evidence.round,
            step=evidence.step,
            first_value=evidence.first_value,
            second_value=evidence.second_value,
            first_envelope=bytes(evidence.first_envelope),
            second_envelope=bytes(evidence.second_envelope),
            detected_at=evidence.detected_at or _now(),
        )
        return self._add_once(row, existing)

    def evidence(self, limit: int | None = None) -> list[EvidenceRecord]:
        """Recorded evidence in order of detection, newest last; the last ``limit`` when
        given."""
        rows = self._newest_last(EvidenceRow, (EvidenceRow.id,), limit)
        return [_evidence_record(row) for row in rows]

    def _add_once(
        self,
        row: Base,
        existing: Select[int],
        *,
        before_insert: Callable[[Session], None] | None = None,
    ) -> bool:
        """Insert ``row`` unless ``existing`` finds its key; ``True`` when inserted.

        ``before_insert`` runs first, in the same transaction, and may raise to refuse the
        row even when its key is present. A concurrent writer that inserts the same key
        first makes the insert fail inside a savepoint; that counts as "already recorded",
        any other integrity error does not.
        """
        with self._transaction() as session:
            if before_insert is not None:
                before_insert(session)
            if session.scalar(existing) is not None:
                return False
            try:
                with session.begin_nested():
                    session.add(row)
            except IntegrityError:
                if session.scalar(existing) is not None:
                    return False
                raise
            return True

    def _newest_last(
        self,
        entity: type[_RowT],
        order: Sequence[ColumnElement[Any] | InstrumentedAttribute[Any]],
        limit: int | None,
        *,
        where: Sequence[ColumnElement[bool]] = (),
    ) -> list[_RowT]:
        """Rows of ``entity`` matching ``where`` in ``order``; with ``limit``, only the last
        ``limit`` of them (still in ``order``)."""
        if limit is not None and (isinstance(limit, bool) or limit < 0):
            raise StoreError(f"limit must be an integer >= 0 or None, got {limit!r}")
        query = select(entity).where(*where)
        with self._transaction(writes=False) as session:
            if limit is None:
                return list(session.scalars(query.order_by(*order)))
            descending = [column.desc() for column in order]
            rows = list(session.scalars(query.order_by(*descending).limit(limit)))
        rows.reverse()
        return rows

    # -- events ------------------------------------------------------------------------

    def record_event(
        self, kind: str, *, detail: str, round: int | None = None, agent_id: str | None = None
    ) -> None:
        """Record a notable event; ``kind`` is the counter label (e.g. ``bad_signature``)."""
        with self._transaction() as session:
            session.add(
                EventRow(at=_now(), kind=kind, round=round, agent_id=agent_id, detail=detail)
            )

    def event_counts(self) -> dict[str, int]:
        """Number of events per kind."""
        query = select(EventRow.kind, func.count()).group_by(EventRow.kind).order_by(EventRow.kind)
        with self._transaction(writes=False) as session:
            return {kind: count for kind, count in session.execute(query)}

    def list_events(self, limit: int = 50) -> list[EventRecord]:
        """The latest ``limit`` events, newest first."""
        query = select(EventRow).order_by(EventRow.id.desc()).limit(limit)
        with self._transaction(writes=False) as session:
            return [_event_record(row) for row in session.scalars(query)]


def _check_aggregation(
    *,
    round: int,
    aggregation: str,
    threshold: int | None,
    graph_degree: int | None,
    word_bits: int | None,
) -> Aggregation:
    """The aggregation of a new round; :class:`StoreError` if its parameters do not fit it."""
    try:
        kind = Aggregation(aggregation)
    except ValueError:
        choices = ", ".join(repr(item.value) for item in Aggregation)
        raise StoreError(
            f"round {round}: aggregation {aggregation!r} is not one of {choices}"
        ) from None
    parameters = {"threshold": threshold, "graph_degree": graph_degree, "word_bits": word_bits}
    if kind is Aggregation.PLAINTEXT:
        given = [name for name, value in parameters.items() if value is not None]
        if given:
            raise StoreError(
                f"round {round}: a plaintext round takes no {', '.join(given)} "
                "(they are secure-aggregation parameters)"
            )
        return kind
    for name, value in parameters.items():
        least = 0 if name == "graph_degree" else 1
        if value is None or value < least:
            raise StoreError(
                f"round {round}: a secagg round needs {name} >= {least}, got {value!r}"
            )
    if word_bits is not None and word_bits > MAX_WORD_BITS:
        raise StoreError(f"round {round}: word_bits {word_bits} is above {MAX_WORD_BITS}")
    return kind


def _check_stage(
    *,
    round: int,
    stage: str,
    expected: int,
    received: int,
    bytes_in: int,
    bytes_out: int,
    seconds: float,
) -> None:
    """Raise :class:`StoreError` unless the values can describe one stage of a round."""
    if not isinstance(stage, str) or _STAGE.fullmatch(stage) is None:
        raise StoreError(
            f"round {round}: stage name {stage!r} is not 1-{STAGE_LENGTH} characters "
            "a-z 0-9 _ starting with a letter"
        )
    counts = {
        "expected": expected,
        "received": received,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
    }
    for name, value in counts.items():
        if value < 0:
            raise StoreError(f"round {round}, stage {stage}: {name} is {value}, below 0")
    if received > expected:
        raise StoreError(
            f"round {round}, stage {stage}: received {received} is more than expected {expected}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise StoreError(
            f"round {round}, stage {stage}: seconds must be a finite number >= 0, got {seconds!r}"
        )


def _is_finite_number(value: object) -> bool:
    """A real number that is not NaN or infinite (numpy scalars included, bool excluded)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_privacy(entry: PrivacyLedgerEntry) -> None:
    """Raise :class:`StoreError` unless ``entry`` can describe one round's privacy spend.

    ``unit`` is 1-32 characters ``a-z 0-9 _`` starting with a letter and ``accountant`` is
    not empty; every float is finite (a ledger records guarantees, and ε = ∞ is none);
    0 < ``delta`` < 1; ``clip_norm`` and ``target_epsilon`` > 0; multipliers, count noise,
    counts and ε >= 0.
    """
    where = f"privacy of round {entry.round}"
    if not isinstance(entry.unit, str) or _UNIT.fullmatch(entry.unit) is None:
        raise StoreError(
            f"{where}: unit {entry.unit!r} is not 1-{UNIT_LENGTH} characters a-z 0-9 _ "
            "starting with a letter"
        )
    if not isinstance(entry.agent, str) or len(entry.agent) > AGENT_ID_LENGTH:
        raise StoreError(f"{where}: agent must be at most {AGENT_ID_LENGTH} characters")
    if not isinstance(entry.accountant, str) or not entry.accountant.strip():
        raise StoreError(f"{where}: accountant must name how ε was computed")
    floats = {
        "delta": entry.delta,
        "noise_multiplier": entry.noise_multiplier,
        "effective_noise_multiplier": entry.effective_noise_multiplier,
        "clip_norm": entry.clip_norm,
        "count_noise": entry.count_noise,
        "epsilon_round": entry.epsilon_round,
        "epsilon_total": entry.epsilon_total,
        "target_epsilon": entry.target_epsilon,
    }
    for name, value in floats.items():
        if not _is_finite_number(value) or value < 0:
            raise StoreError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    for name in ("clip_norm", "target_epsilon"):
        if floats[name] == 0:
            raise StoreError(f"{where}: {name} must be > 0")
    if not 0 < entry.delta < 1:
        raise StoreError(f"{where}: delta must be in (0, 1), got {entry.delta!r}")
    for name, count in (("min_inputs", entry.min_inputs), ("inputs", entry.inputs)):
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise StoreError(f"{where}: {name} must be an integer >= 0, got {count!r}")


def _check_count(where: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise StoreError(f"{where}: {name} must be an integer >= 0, got {value!r}")


def _check_cloud_id(where: str, name: str, value: str) -> None:
    try:
        validate_identifier(value, what=name)
    except InvalidIdentifier as exc:
        raise StoreError(f"{where}: {exc}") from None


def _check_digest(where: str, name: str, value: object, *, nil: bool = False) -> None:
    """A SHA-256 hex digest (64 lowercase hex characters), or ``''`` when ``nil``."""
    if nil and value == NIL_VALUE:
        return
    if not isinstance(value, str) or _DIGEST.fullmatch(value) is None:
        allowed = " or '' (nil)" if nil else ""
        raise StoreError(
            f"{where}: {name} must be 64 lowercase hex characters{allowed}, got {value!r}"
        )


def _check_step(where: str, value: object) -> None:
    if value not in CONSENSUS_STEPS:
        raise StoreError(
            f"{where}: step must be one of {', '.join(CONSENSUS_STEPS)}, got {value!r}"
        )


def _check_signed_bytes(where: str, name: str, value: object) -> None:
    if not isinstance(value, bytes) or not value:
        raise StoreError(f"{where}: {name} must be non-empty bytes (the signed message)")


def _check_aggregate(record: AggregateRecord) -> AggregateRecord:
    """``record`` with plain ``int``/``float`` numbers; :class:`StoreError` unless it can
    describe a per-cloud aggregate.

    ``height`` and ``participants`` are integers >= 0, ``cloud`` is a valid identifier,
    ``base_digest`` and ``digest`` are SHA-256 hex digests, ``norm`` is finite and >= 0.
    """
    where = f"aggregate of height {record.height!r}"
    _check_count(where, "height", record.height)
    _check_cloud_id(where, "cloud id", record.cloud)
    _check_digest(where, "base_digest", record.base_digest)
    _check_count(where, "participants", record.participants)
    if not _is_finite_number(record.norm) or record.norm < 0:
        raise StoreError(f"{where}: norm must be a finite number >= 0, got {record.norm!r}")
    _check_digest(where, "digest", record.digest)
    return replace(
        record,
        height=int(record.height),
        participants=int(record.participants),
        norm=float(record.norm),
    )


def _check_vote(vote: VoteRecord) -> VoteRecord:
    """``vote`` with plain ``int`` numbers; :class:`StoreError` unless it can describe one
    signed consensus message.

    ``height`` and ``round`` are integers >= 0, ``step`` is one of :data:`CONSENSUS_STEPS`,
    ``voter`` a valid cloud id, ``value`` a SHA-256 hex digest (or ``''`` for a nil prevote
    or precommit; a proposal always names a value), ``own`` a bool and ``envelope``
    non-empty bytes.
    """
    where = f"vote at height {vote.height!r}, round {vote.round!r}"
    _check_count(where, "height", vote.height)
    _check_count(where, "round", vote.round)
    _check_step(where, vote.step)
    _check_cloud_id(where, "voter", vote.voter)
    _check_digest(where, "value", vote.value, nil=vote.step != "proposal")
    if not isinstance(vote.own, bool):
        raise StoreError(f"{where}: own must be a bool, got {vote.own!r}")
    _check_signed_bytes(where, "envelope", vote.envelope)
    return replace(vote, height=int(vote.height), round=int(vote.round))


def _check_decision(decision: DecisionRecord) -> DecisionRecord:
    """``decision`` with plain ``int`` numbers; :class:`StoreError` unless it can describe
    a decided height.

    ``height`` and ``round`` are integers >= 0, ``value`` a SHA-256 hex digest (never nil),
    ``signers`` at least one distinct valid cloud id and ``certificate`` non-empty bytes.
    """
    where = f"decision of height {decision.height!r}"
    _check_count(where, "height", decision.height)
    _check_count(where, "round", decision.round)
    _check_digest(where, "value", decision.value)
    if not decision.signers:
        raise StoreError(f"{where}: a commit certificate has at least one signer")
    for signer in decision.signers:
        _check_cloud_id(where, "signer", signer)
    if len(set(decision.signers)) != len(decision.signers):
        raise StoreError(f"{where}: signers {', '.join(decision.signers)} repeat a cloud")
    _check_signed_bytes(where, "certificate", decision.certificate)
    return replace(decision, height=int(decision.height), round=int(decision.round))


def _check_evidence(evidence: EvidenceRecord) -> EvidenceRecord:
    """``evidence`` with plain ``int`` numbers; :class:`StoreError` unless it can describe
    an equivocation.

    As :func:`_check_vote` for ``voter``, ``height``, ``round`` and ``step``; the two
    values differ (each a SHA-256 hex digest, or ``''`` for nil except in a proposal) and
    both envelopes are non-empty bytes.
    """
    where = f"evidence against {evidence.voter!r} at height {evidence.height!r}"
    _check_cloud_id(where, "voter", evidence.voter)
    _check_count(where, "height", evidence.height)
    _check_count(where, "round", evidence.round)
    _check_step(where, evidence.step)
    nil = evidence.step != "proposal"
    _check_digest(where, "first_value", evidence.first_value, nil=nil)
    _check_digest(where, "second_value", evidence.second_value, nil=nil)
    if evidence.first_value == evidence.second_value:
        raise StoreError(f"{where}: the two messages sign the same value: no conflict")
    _check_signed_bytes(where, "first_envelope", evidence.first_envelope)
    _check_signed_bytes(where, "second_envelope", evidence.second_envelope)
    return replace(evidence, height=int(evidence.height), round=int(evidence.round))


def _check_contents(model: ModelRecord) -> None:
    """Raise :class:`ChainBroken` unless the digest and size match the model's bytes."""
    if _DIGEST.fullmatch(model.digest) is None:
        raise ChainBroken(
            f"digest {model.digest!r} is not 64 lowercase hex characters", round=model.round
        )
    try:
        spec = model.decode_spec()
        weights = model.decode_wire_weights()
    except (msgspec.DecodeError, ValueError, FedgateError) as exc:
        raise ChainBroken(
            f"stored spec or weights do not decode: {exc}", round=model.round
        ) from exc
    computed = model_digest(
        parent_digest=model.parent_digest, round=model.round, spec=spec, weights=weights
    )
    if computed != model.digest:
        raise ChainBroken("digest does not match the model's contents", round=model.round)
    declared = sum(math.prod(item.shape) for item in weights)
    if declared != model.num_parameters:
        raise ChainBroken(
            f"num_parameters is {model.num_parameters}, the weights hold {declared}",
            round=model.round,
        )


def _agent_record(row: AgentRow) -> AgentRecord:
    return AgentRecord(
        agent_id=row.agent_id,
        public_key=row.public_key,
        enrolled_at=row.enrolled_at,
        last_seen_at=row.last_seen_at,
        status=AgentStatus(row.status),
    )


def _model_record(row: ModelRow) -> ModelRecord:
    return ModelRecord(
        digest=row.digest,
        parent_digest=row.parent_digest,
        round=row.round,
        spec=row.spec,
        weights=row.weights,
        num_parameters=row.num_parameters,
        created_at=row.created_at,
    )


def _round_record(row: RoundRow) -> RoundRecord:
    return RoundRecord(
        round=row.round,
        status=RoundStatus(row.status),
        base_digest=row.base_digest,
        model_digest=row.model_digest,
        started_at=row.started_at,
        ended_at=row.ended_at,
        selected=row.selected,
        min_participants=row.min_participants,
        aggregation=Aggregation(row.aggregation),
        threshold=row.threshold,
        graph_degree=row.graph_degree,
        word_bits=row.word_bits,
        participants=row.participants,
        abort_reason=row.abort_reason,
        mean_train_loss=row.mean_train_loss,
        bytes_down_per_agent=row.bytes_down_per_agent,
        clip_norm=row.clip_norm,
        within_clip=row.within_clip,
    )


def _participant_record(row: RoundParticipantRow) -> ParticipantRecord:
    return ParticipantRecord(
        agent_id=row.agent_id,
        num_samples=row.num_samples,
        train_loss=row.train_loss,
        bytes_up=row.bytes_up,
        stage=row.stage,
        received_at=row.received_at,
    )


def _stage_record(row: RoundStageRow) -> RoundStageRecord:
    return RoundStageRecord(
        round=row.round,
        stage=row.stage,
        expected=row.expected,
        received=row.received,
        bytes_in=row.bytes_in,
        bytes_out=row.bytes_out,
        seconds=row.seconds,
        recorded_at=row.recorded_at,
    )


def _privacy_entry(row: PrivacyLedgerRow) -> PrivacyLedgerEntry:
    return PrivacyLedgerEntry(
        round=row.round,
        unit=row.unit,
        accountant=row.accountant,
        delta=row.delta,
        noise_multiplier=row.noise_multiplier,
        effective_noise_multiplier=row.effective_noise_multiplier,
        clip_norm=row.clip_norm,
        count_noise=row.count_noise,
        min_inputs=row.min_inputs,
        inputs=row.inputs,
        epsilon_round=row.epsilon_round,
        epsilon_total=row.epsilon_total,
        target_epsilon=row.target_epsilon,
        recorded_at=row.recorded_at,
        agent=row.agent,
    )


def _event_record(row: EventRow) -> EventRecord:
    return EventRecord(
        id=row.id,
        at=row.at,
        kind=row.kind,
        round=row.round,
        agent_id=row.agent_id,
        detail=row.detail,
    )


def _aggregate_record(row: CloudAggregateRow) -> AggregateRecord:
    return AggregateRecord(
        height=row.height,
        cloud=row.cloud,
        base_digest=row.base_digest,
        participants=row.participants,
        norm=row.norm,
        digest=row.digest,
        received_at=row.received_at,
    )


def _vote_record(row: VoteRow) -> VoteRecord:
    return VoteRecord(
        height=row.height,
        round=row.round,
        step=row.step,
        voter=row.voter,
        value=row.value,
        own=bool(row.own),
        envelope=bytes(row.envelope),
        received_at=row.received_at,
    )


def _decision_record(row: DecisionRow) -> DecisionRecord:
    return DecisionRecord(
        height=row.height,
        round=row.round,
        value=row.value,
        signers=tuple(row.signers.split(",")),
        certificate=bytes(row.certificate),
        decided_at=row.decided_at,
    )


def _evidence_record(row: EvidenceRow) -> EvidenceRecord:
    return EvidenceRecord(
        voter=row.voter,
        height=row.height,
        round=row.round,
        step=row.step,
        first_value=row.first_value,
        second_value=row.second_value,
        first_envelope=bytes(row.first_envelope),
        second_envelope=bytes(row.second_envelope),
        detected_at=row.detected_at,
        id=row.id,
    )
