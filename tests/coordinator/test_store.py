"""One suite for every store backend: SQLite file, SQLite memory and PostgreSQL."""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fedgate_common.errors import InvalidIdentifier
from fedgate_common.model_spec import ModelSpec, initial_weights
from fedgate_coordinator.errors import (
    AgentConflict,
    AgentRevoked,
    ChainBroken,
    RoundStateError,
    StoreError,
)
from fedgate_coordinator.store import (
    AgentStatus,
    ModelRecord,
    ParticipantRecord,
    RoundStatus,
    Store,
    head_revision,
)
from fedgate_coordinator.store.schema import AgentRow, Base, ModelRow, RoundParticipantRow
from sqlalchemy import Insert, create_engine, insert, inspect, text, update
from sqlalchemy.exc import IntegrityError

if TYPE_CHECKING:
    from tests.coordinator.conftest import StoreBackend

SPEC = ModelSpec(n_features=52, window=20, n_classes=22, channels=8)
KEY_A = "ed25519:" + "a" * 43
KEY_B = "ed25519:" + "b" * 43


def make_model(round: int, parent_digest: str, seed: int) -> ModelRecord:
    weights = initial_weights(SPEC, np.random.default_rng(seed))
    return ModelRecord.from_weights(
        round=round, parent_digest=parent_digest, spec=SPEC, weights=weights
    )


def make_chain(store: Store, length: int) -> list[ModelRecord]:
    """Genesis (round 0) and ``length - 1`` children, appended to ``store``."""
    models = [make_model(0, "", seed=0)]
    for round in range(1, length):
        models.append(make_model(round, models[-1].digest, seed=round))
    for model in models:
        store.add_model(model)
    return models


def participant(agent_id: str, loss: float = 0.5) -> ParticipantRecord:
    return ParticipantRecord(agent_id=agent_id, num_samples=100, train_loss=loss, bytes_up=4096)


def assert_aware_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - value) < timedelta(minutes=5)


# -- schema ------------------------------------------------------------------------------


def test_migrations_create_every_table_at_head(store: Store) -> None:
    tables = set(inspect(store.engine).get_table_names())
    assert {"agents", "rounds", "round_participants", "models", "events"} <= tables
    assert "alembic_version" in tables
    assert store.schema_revision() == head_revision()


def test_migrations_match_the_schema_module(store: Store) -> None:
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def _inconsistent_row(case: str, genesis: ModelRecord) -> Insert:
    now = datetime.now(UTC)
    if case == "participant_of_unknown_round":
        return insert(RoundParticipantRow).values(
            round=7,
            agent_id="plant-1",
            stage="update",
            num_samples=1,
            train_loss=0.1,
            bytes_up=1,
            received_at=now,
        )
    if case == "forked_chain":
        fork = make_model(5, genesis.digest, seed=5)
        return insert(ModelRow).values(
            digest=fork.digest,
            parent_digest=fork.parent_digest,
            round=fork.round,
            created_at=now,
            spec=fork.spec,
            weights=fork.weights,
            num_parameters=fork.num_parameters,
        )
    return insert(AgentRow).values(
        agent_id="plant-1", public_key=KEY_A, enrolled_at=now, status="suspended"
    )


@pytest.mark.parametrize(
    "case", ["participant_of_unknown_round", "forked_chain", "unknown_agent_status"]
)
def test_database_refuses_inconsistent_rows_written_around_the_store(
    store: Store, case: str
) -> None:
    genesis, _ = make_chain(store, 2)
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(_inconsistent_row(case, genesis))
    assert store.verify_chain() == 2
    assert store.list_agents() == []


def test_open_without_migrate_leaves_database_unversioned(store_backend: StoreBackend) -> None:
    with Store.open(store_backend.url, migrate=False) as unmigrated:
        assert unmigrated.schema_revision() is None
        assert "agents" not in inspect(unmigrated.engine).get_table_names()


def test_reopen_keeps_data_on_persistent_backends(store_backend: StoreBackend) -> None:
    with Store.open(store_backend.url) as first:
        first.enroll_agent("plant-1", KEY_A)
        genesis = make_chain(first, 1)[0]
        first.record_event("bad_signature", detail="x")
    with Store.open(store_backend.url) as second:
        assert second.schema_revision() == head_revision()
        if store_backend.persistent:
            agent = second.get_agent("plant-1")
            assert agent is not None
            assert agent.public_key == KEY_A
            head = second.head_model()
            assert head is not None
            assert head.digest == genesis.digest
            assert second.event_counts() == {"bad_signature": 1}
        else:
            assert second.list_agents() == []
            assert second.head_model() is None


# -- agents ------------------------------------------------------------------------------


def test_enroll_agent_is_idempotent_for_the_same_key(store: Store) -> None:
    first = store.enroll_agent("plant-1", KEY_A)
    again = store.enroll_agent("plant-1", KEY_A)
    assert again == first
    assert first.status is AgentStatus.ACTIVE
    assert first.last_seen_at is None
    assert_aware_utc(first.enrolled_at)
    assert [agent.agent_id for agent in store.list_agents()] == ["plant-1"]


def test_enroll_agent_with_another_key_conflicts(store: Store) -> None:
    store.enroll_agent("plant-1", KEY_A)
    with pytest.raises(AgentConflict) as caught:
        store.enroll_agent("plant-1", KEY_B)
    assert caught.value.agent_id == "plant-1"
    agent = store.get_agent("plant-1")
    assert agent is not None
    assert agent.public_key == KEY_A


def test_enroll_agent_refuses_ids_unsafe_in_topics(store: Store) -> None:
    with pytest.raises(InvalidIdentifier):
        store.enroll_agent("plant/+", KEY_A)
    assert store.list_agents() == []


def test_touch_and_revoke_agent(store: Store) -> None:
    store.enroll_agent("plant-2", KEY_B)
    store.enroll_agent("plant-1", KEY_A)
    store.touch_agent("plant-1")
    store.revoke_agent("plant-2")
    touched, revoked = store.list_agents()
    assert touched.agent_id == "plant-1"
    assert_aware_utc(touched.last_seen_at)
    assert revoked.status is AgentStatus.REVOKED
    assert revoked.last_seen_at is None
    for key in (KEY_B, KEY_A):  # the same key or another: a revoked id is not enrolled again
        with pytest.raises(AgentRevoked, match="stays revoked"):
            store.enroll_agent("plant-2", key)
    assert store.list_agents()[1].status is AgentStatus.REVOKED
    with pytest.raises(StoreError):
        store.touch_agent("nobody")


def test_enroll_and_revoke_while_another_process_writes_on_sqlite(tmp_path: Path) -> None:
    """`enroll`/`revoke` from the CLI while `serve` commits events: each read-then-write
    transaction waits for the write lock instead of failing with "database is locked"."""
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    Store.open(url).close()
    stop = threading.Event()
    served: list[int] = []

    def serve() -> None:  # what the service does per rejected message, in a second process
        service = Store.open(url, migrate=False)
        try:
            while not stop.is_set():
                service.record_event("malformed", detail="x")
                served.append(1)
        finally:
            service.close()

    writer = threading.Thread(target=serve)
    writer.start()
    cli = Store.open(url, migrate=False)
    try:
        deadline = time.monotonic() + 30
        while not served and time.monotonic() < deadline:
            time.sleep(0.01)
        before = len(served)
        for n in range(30):
            cli.enroll_agent(f"plant-{n}", KEY_A)
            cli.revoke_agent(f"plant-{n}")
        during = len(served) - before
    finally:
        stop.set()
        writer.join()
        cli.close()
    assert before  # the writer really ran alongside
    assert during
    assert all(agent.status is AgentStatus.REVOKED for agent in Store.open(url).list_agents())


# -- model hash chain -------------------------------------------------------------------


def test_chain_starts_with_genesis_and_appends_children(store: Store) -> None:
    assert store.head_model() is None
    assert store.verify_chain() == 0
    genesis, child = make_chain(store, 2)
    head = store.head_model()
    assert head is not None
    assert head.digest == child.digest
    assert head.parent_digest == genesis.digest
    assert_aware_utc(head.created_at)
    assert store.get_model(genesis.digest) == replace(
        genesis, created_at=store.list_models()[0].created_at
    )
    assert [(m.round, m.digest) for m in store.list_models()] == [
        (0, genesis.digest),
        (1, child.digest),
    ]
    assert store.verify_chain() == 2


def test_model_weights_round_trip(store: Store) -> None:
    weights = initial_weights(SPEC, np.random.default_rng(7))
    model = ModelRecord.from_weights(round=0, parent_digest="", spec=SPEC, weights=weights)
    store.add_model(model)
    stored = store.get_model(model.digest)
    assert stored is not None
    assert stored.decode_spec() == SPEC
    decoded = stored.decode_weights()
    assert list(decoded) == list(weights)
    for name, array in weights.items():
        np.testing.assert_array_equal(decoded[name], array)
    assert stored.num_parameters == sum(array.size for array in weights.values())


def test_first_model_must_be_genesis(store: Store) -> None:
    with pytest.raises(ChainBroken, match="genesis"):
        store.add_model(make_model(1, "ab" * 32, seed=1))
    assert store.head_model() is None


@pytest.mark.parametrize("parent", ["genesis", "empty", "unknown"])
def test_model_whose_parent_is_not_the_head_is_refused(store: Store, parent: str) -> None:
    genesis, child = make_chain(store, 2)
    parent_digest = {"genesis": genesis.digest, "empty": "", "unknown": "cd" * 32}[parent]
    with pytest.raises(ChainBroken) as caught:
        store.add_model(make_model(2, parent_digest, seed=2))
    assert caught.value.round == 2
    assert [m.digest for m in store.list_models()] == [genesis.digest, child.digest]


def test_model_round_must_follow_the_head(store: Store) -> None:
    (genesis,) = make_chain(store, 1)
    store.add_model(make_model(3, genesis.digest, seed=3))
    with pytest.raises(ChainBroken, match="not after"):
        store.add_model(make_model(3, store.list_models()[-1].digest, seed=4))


@pytest.mark.parametrize("tampering", ["digest", "weights", "num_parameters", "garbage"])
def test_tampered_model_is_refused(store: Store, tampering: str) -> None:
    (genesis,) = make_chain(store, 1)
    honest = make_model(1, genesis.digest, seed=1)
    other = make_model(1, genesis.digest, seed=99)
    tampered = {
        "digest": replace(honest, digest=other.digest),
        "weights": replace(honest, weights=other.weights),
        "num_parameters": replace(honest, num_parameters=honest.num_parameters + 1),
        "garbage": replace(honest, weights=b"\x00not msgpack"),
    }[tampering]
    with pytest.raises(ChainBroken):
        store.add_model(tampered)
    head = store.head_model()
    assert head is not None
    assert head.digest == genesis.digest
    store.add_model(honest)
    assert store.verify_chain() == 2


@pytest.mark.parametrize("column", ["weights", "parent_digest"])
def test_verify_chain_detects_rows_changed_behind_the_store(store: Store, column: str) -> None:
    models = make_chain(store, 4)
    assert store.verify_chain() == 4
    forged = make_model(2, models[1].digest, seed=1234)
    values = {"weights": forged.weights, "parent_digest": "ef" * 32}[column]
    with store.engine.begin() as connection:
        connection.execute(update(ModelRow).where(ModelRow.round == 2).values({column: values}))
    with pytest.raises(ChainBroken) as caught:
        store.verify_chain()
    assert caught.value.round == 2


# -- rounds ------------------------------------------------------------------------------


def test_round_numbers_are_never_reused_after_abort(store: Store) -> None:
    (genesis,) = make_chain(store, 1)
    assert store.next_round_number() == 1
    store.begin_round(round=1, base_digest=genesis.digest, selected=3, min_participants=2)
    assert store.running_rounds() == [1]
    store.abort_round(round=1, reason="too few updates", participants=[participant("plant-1")])
    assert store.running_rounds() == []
    assert store.next_round_number() == 2
    with pytest.raises(RoundStateError) as caught:
        store.begin_round(round=1, base_digest=genesis.digest, selected=3, min_participants=2)
    assert caught.value.round == 1
    aborted = store.get_round(1)
    assert aborted is not None
    assert aborted.status is RoundStatus.ABORTED
    assert aborted.abort_reason == "too few updates"
    assert aborted.participants == 1
    assert aborted.model_digest is None
    assert_aware_utc(aborted.ended_at)
    assert [p.agent_id for p in store.participants(1)] == ["plant-1"]


def test_begin_round_refuses_a_number_below_the_last(store: Store) -> None:
    (genesis,) = make_chain(store, 1)
    store.begin_round(round=5, base_digest=genesis.digest, selected=3, min_participants=2)
    with pytest.raises(RoundStateError):
        store.begin_round(round=4, base_digest=genesis.digest, selected=3, min_participants=2)
    assert store.next_round_number() == 6


def test_complete_round_records_participants_model_and_round(store: Store) -> None:
    (genesis,) = make_chain(store, 1)
    store.begin_round(round=1, base_digest=genesis.digest, selected=3, min_participants=2)
    running = store.get_round(1)
    assert running is not None
    assert running.status is RoundStatus.RUNNING
    assert_aware_utc(running.started_at)
    model = make_model(1, genesis.digest, seed=1)
    store.complete_round(
        round=1,
        participants=[participant("plant-2", 0.25), participant("plant-1", 0.75)],
        model=model,
        mean_train_loss=0.5,
        bytes_down_per_agent=123_456,
    )
    completed = store.get_round(1)
    assert completed is not None
    assert completed.status is RoundStatus.COMPLETED
    assert completed.model_digest == model.digest
    assert completed.participants == 2
    assert completed.mean_train_loss == pytest.approx(0.5)
    assert completed.bytes_down_per_agent == 123_456
    assert_aware_utc(completed.ended_at)
    recorded = store.participants(1)
    assert [(p.agent_id, p.train_loss, p.stage) for p in recorded] == [
        ("plant-1", 0.75, "update"),
        ("plant-2", 0.25, "update"),
    ]
    assert_aware_utc(recorded[0].received_at)
    head = store.head_model()
    assert head is not None
    assert head.digest == model.digest
    assert store.running_rounds() == []
    assert store.verify_chain() == 2


@pytest.mark.parametrize("failure", ["parent_not_head", "tampered_digest", "duplicate_agent"])
def test_complete_round_is_all_or_nothing(store: Store, failure: str) -> None:
    (genesis,) = make_chain(store, 1)
    store.begin_round(round=1, base_digest=genesis.digest, selected=3, min_participants=2)
    model = make_model(1, genesis.digest, seed=1)
    participants = [participant("plant-1"), participant("plant-2")]
    if failure == "parent_not_head":
        model = make_model(1, "12" * 32, seed=1)
    elif failure == "tampered_digest":
        model = replace(model, digest="34" * 32)
    else:
        participants.append(participant("plant-1"))
    with pytest.raises(StoreError):
        store.complete_round(
            round=1,
            participants=participants,
            model=model,
            mean_train_loss=0.5,
            bytes_down_per_agent=1000,
        )
    unchanged = store.get_round(1)
    assert unchanged is not None
    assert unchanged.status is RoundStatus.RUNNING
    assert unchanged.model_digest is None
    assert unchanged.participants is None
    assert store.participants(1) == []
    assert [m.digest for m in store.list_models()] == [genesis.digest]
    assert store.running_rounds() == [1]


def test_only_running_rounds_can_complete_or_abort(store: Store) -> None:
    (genesis,) = make_chain(store, 1)
    model = make_model(1, genesis.digest, seed=1)
    with pytest.raises(RoundStateError, match="never begun"):
        store.abort_round(round=1, reason="x")
    store.begin_round(round=1, base_digest=genesis.digest, selected=1, min_participants=1)
    store.complete_round(
        round=1, participants=[], model=model, mean_train_loss=0.1, bytes_down_per_agent=1
    )
    with pytest.raises(RoundStateError, match="completed"):
        store.abort_round(round=1, reason="late")
    finished = store.get_round(1)
    assert finished is not None
    assert finished.status is RoundStatus.COMPLETED
    assert finished.abort_reason is None


def test_list_rounds_newest_first(store: Store) -> None:
    (genesis,) = make_chain(store, 1)
    for number in (1, 2, 3):
        store.begin_round(round=number, base_digest=genesis.digest, selected=2, min_participants=1)
    store.abort_round(round=1, reason="stale")
    assert [r.round for r in store.list_rounds()] == [3, 2, 1]
    assert [r.round for r in store.list_rounds(limit=2)] == [3, 2]
    assert store.running_rounds() == [2, 3]
    assert store.get_round(42) is None


# -- events ------------------------------------------------------------------------------


def test_events_are_counted_by_kind_and_listed_newest_first(store: Store) -> None:
    assert store.event_counts() == {}
    store.record_event("bad_signature", detail="signature does not verify", agent_id="plant-1")
    store.record_event("replay", detail="nonce seen", round=3, agent_id="x" * 200)
    store.record_event("bad_signature", detail="again", agent_id="plant-9")
    assert store.event_counts() == {"bad_signature": 2, "replay": 1}
    latest = store.list_events(limit=2)
    assert [(e.kind, e.detail) for e in latest] == [
        ("bad_signature", "again"),
        ("replay", "nonce seen"),
    ]
    assert latest[1].round == 3
    assert latest[1].agent_id == "x" * 200
    assert latest[0].id > latest[1].id
    assert_aware_utc(latest[0].at)


def test_a_store_locked_too_long_says_so_plainly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    store = Store.open(url)
    holder = sqlite3.connect(tmp_path / "coordinator.db")
    try:
        holder.execute("BEGIN IMMEDIATE")  # a sqlite3 shell in the middle of a transaction
        with pytest.raises(StoreError, match="stayed locked by another process") as info:
            store.enroll_agent("plant-1", KEY_A)
        assert "[SQL:" not in str(info.value)
    finally:
        holder.rollback()
        holder.close()
        store.close()


@pytest.mark.parametrize("store_backend", ["postgresql"], indirect=True)
def test_a_postgresql_store_locked_too_long_says_so_instead_of_hanging(
    store_backend: StoreBackend,
) -> None:
    """A psql session holding a table lock: the command fails after the lock wait with
    what to look for, as on SQLite, instead of waiting for ever."""
    store = Store.open(store_backend.url)
    holder = create_engine(store_backend.url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with holder.connect() as connection:
            connection.execute(text("LOCK TABLE agents IN ACCESS EXCLUSIVE MODE"))
            started = time.monotonic()
            with pytest.raises(StoreError, match="stayed locked by another session") as info:
                store.enroll_agent("plant-1", KEY_A)
            assert time.monotonic() - started < 30
            assert "pg_locks" in str(info.value)
            connection.rollback()
        store.enroll_agent("plant-1", KEY_A)  # the lock gone, it works
        assert [a.agent_id for a in store.list_agents()] == ["plant-1"]
    finally:
        holder.dispose()
        store.close()


def test_reads_do_not_wait_for_a_writer_on_sqlite(tmp_path: Path) -> None:
    """Reads take no write lock (BEGIN DEFERRED, a WAL snapshot): `status`, `models
    --verify` and the rest answer while another process holds the write lock."""
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    store = Store.open(url)
    make_chain(store, 3)
    store.enroll_agent("plant-1", KEY_A)
    holder = sqlite3.connect(tmp_path / "coordinator.db")
    try:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        assert store.verify_chain() == 3
        assert store.next_round_number() == 3
        assert [a.agent_id for a in store.list_agents()] == ["plant-1"]
        assert len(store.list_models()) == 3
        store.list_rounds()
        store.running_rounds()
        store.list_events()
        store.event_counts()
        assert time.monotonic() - started < 2.0  # the busy timeout is 5 s
    finally:
        holder.rollback()
        holder.close()
        store.close()
