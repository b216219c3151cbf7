"""Secure-aggregation rounds in the store, on every backend (SQLite file, memory, PostgreSQL).

Covers migration 0002 (an existing 0001 database upgrades with its data intact, and
downgrades again), the aggregation parameters of a round, the per-stage record, and
participants whose sample count and loss the coordinator never learns.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command
from fedgate_common.model_spec import ModelSpec, initial_weights
from fedgate_coordinator.errors import RoundStateError, StoreError
from fedgate_coordinator.store import (
    SECAGG_STAGES,
    Aggregation,
    ModelRecord,
    ParticipantRecord,
    RoundStatus,
    Store,
    alembic_config,
    head_revision,
    stage_order,
)
from fedgate_coordinator.store.schema import RoundRow, RoundStageRow, UTCDateTime
from sqlalchemy.exc import IntegrityError

if TYPE_CHECKING:
    from tests.coordinator.conftest import StoreBackend

SPEC = ModelSpec(n_features=4, window=8, n_classes=2, channels=4)
KEY = "ed25519:" + "a" * 43
SECAGG: dict[str, Any] = {
    "aggregation": "secagg",
    "threshold": 3,
    "graph_degree": 4,
    "word_bits": 32,
}
STARTED = datetime(2025, 11, 30, 8, 0, tzinfo=UTC)


def make_model(round: int, parent_digest: str, seed: int) -> ModelRecord:
    weights = initial_weights(SPEC, np.random.default_rng(seed))
    return ModelRecord.from_weights(
        round=round, parent_digest=parent_digest, spec=SPEC, weights=weights
    )


def genesis_of(store: Store) -> ModelRecord:
    genesis = make_model(0, "", seed=0)
    store.add_model(genesis)
    return genesis


def blind(agent_id: str, stage: str = "masked", bytes_up: int = 2048) -> ParticipantRecord:
    """A secure-aggregation participant: the coordinator knows only who sent how much."""
    return ParticipantRecord(
        agent_id=agent_id, num_samples=None, train_loss=None, bytes_up=bytes_up, stage=stage
    )


def stage_values(stage: str, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "stage": stage,
        "expected": 5,
        "received": 4,
        "bytes_in": 4 * 1024,
        "bytes_out": 5 * 2048,
        "seconds": 1.25,
    }
    values.update(overrides)
    return values


def assert_recent_utc(value: datetime) -> None:
    assert value.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - value) < timedelta(minutes=5)


# -- migration 0002 ----------------------------------------------------------------------

# The tables of revision 0001 as they were, to write history the way a 0.1 coordinator did.
_V1 = {
    "agents": sa.table(
        "agents",
        sa.column("agent_id", sa.String()),
        sa.column("public_key", sa.Text()),
        sa.column("enrolled_at", UTCDateTime()),
        sa.column("last_seen_at", UTCDateTime()),
        sa.column("status", sa.String()),
    ),
    "models": sa.table(
        "models",
        sa.column("digest", sa.String()),
        sa.column("parent_digest", sa.String()),
        sa.column("round", sa.Integer()),
        sa.column("created_at", UTCDateTime()),
        sa.column("spec", sa.LargeBinary()),
        sa.column("weights", sa.LargeBinary()),
        sa.column("num_parameters", sa.BigInteger()),
    ),
    "rounds": sa.table(
        "rounds",
        sa.column("round", sa.Integer()),
        sa.column("status", sa.String()),
        sa.column("base_digest", sa.String()),
        sa.column("model_digest", sa.String()),
        sa.column("started_at", UTCDateTime()),
        sa.column("ended_at", UTCDateTime()),
        sa.column("selected", sa.Integer()),
        sa.column("min_participants", sa.Integer()),
        sa.column("participants", sa.Integer()),
        sa.column("abort_reason", sa.Text()),
        sa.column("mean_train_loss", sa.Float()),
        sa.column("bytes_down_per_agent", sa.BigInteger()),
    ),
    "round_participants": sa.table(
        "round_participants",
        sa.column("round", sa.Integer()),
        sa.column("agent_id", sa.String()),
        sa.column("stage", sa.String()),
        sa.column("num_samples", sa.Integer()),
        sa.column("train_loss", sa.Float()),
        sa.column("bytes_up", sa.BigInteger()),
        sa.column("received_at", UTCDateTime()),
    ),
    "events": sa.table(
        "events",
        sa.column("at", UTCDateTime()),
        sa.column("kind", sa.String()),
        sa.column("round", sa.Integer()),
        sa.column("agent_id", sa.Text()),
        sa.column("detail", sa.Text()),
    ),
}


def _model_values(model: ModelRecord) -> dict[str, Any]:
    return {
        "digest": model.digest,
        "parent_digest": model.parent_digest,
        "round": model.round,
        "created_at": STARTED,
        "spec": model.spec,
        "weights": model.weights,
        "num_parameters": model.num_parameters,
    }


def _write_0001_history(connection: sa.Connection) -> tuple[ModelRecord, ModelRecord]:
    """A completed round 1, an aborted round 2 and a round 3 left running, as 0001 wrote them."""
    genesis = make_model(0, "", seed=0)
    first = make_model(1, genesis.digest, seed=1)
    connection.execute(
        sa.insert(_V1["agents"]),
        [
            {"agent_id": agent, "public_key": KEY, "enrolled_at": STARTED, "status": "active"}
            for agent in ("plant-1", "plant-2")
        ],
    )
    connection.execute(sa.insert(_V1["models"]), [_model_values(genesis), _model_values(first)])
    ended = STARTED + timedelta(minutes=2)
    common = {"selected": 2, "min_participants": 2, "started_at": STARTED}
    connection.execute(
        sa.insert(_V1["rounds"]),
        [
            {
                **common,
                "round": 1,
                "status": "completed",
                "base_digest": genesis.digest,
                "model_digest": first.digest,
                "ended_at": ended,
                "participants": 2,
                "abort_reason": None,
                "mean_train_loss": 0.625,
                "bytes_down_per_agent": 41_000,
            },
            {
                **common,
                "round": 2,
                "status": "aborted",
                "base_digest": first.digest,
                "model_digest": None,
                "ended_at": ended,
                "participants": 1,
                "abort_reason": "1 of 2 updates",
                "mean_train_loss": None,
                "bytes_down_per_agent": None,
            },
            {
                **common,
                "round": 3,
                "status": "running",
                "base_digest": first.digest,
                "model_digest": None,
                "ended_at": None,
                "participants": None,
                "abort_reason": None,
                "mean_train_loss": None,
                "bytes_down_per_agent": None,
            },
        ],
    )
    connection.execute(
        sa.insert(_V1["round_participants"]),
        [
            {
                "round": round,
                "agent_id": agent,
                "stage": "update",
                "num_samples": samples,
                "train_loss": loss,
                "bytes_up": 20_000 + samples,
                "received_at": ended,
            }
            for round, agent, samples, loss in [
                (1, "plant-1", 100, 0.5),
                (1, "plant-2", 300, 0.75),
                (2, "plant-2", 50, 0.25),
            ]
        ],
    )
    connection.execute(
        sa.insert(_V1["events"]),
        [{"at": ended, "kind": "bad_signature", "round": 2, "agent_id": "x", "detail": "d"}],
    )
    return genesis, first


def _downgrade(store: Store, revision: str) -> None:
    config = alembic_config(store.engine.url)
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def test_0001_database_upgrades_with_its_history_intact(store_backend: StoreBackend) -> None:
    with Store.open(store_backend.url, migrate=False) as store:
        store.upgrade_schema("0001")
        with store.engine.begin() as connection:
            genesis, first = _write_0001_history(connection)

        store.upgrade_schema()

        assert store.schema_revision() == head_revision()
        completed, aborted, running = (store.get_round(n) for n in (1, 2, 3))
        assert completed is not None
        assert aborted is not None
        assert running is not None
        for record in (completed, aborted, running):
            assert record.aggregation is Aggregation.PLAINTEXT
            assert (record.threshold, record.graph_degree, record.word_bits) == (None, None, None)
            assert record.started_at == STARTED
            assert (record.selected, record.min_participants) == (2, 2)
        assert completed.status is RoundStatus.COMPLETED
        assert completed.model_digest == first.digest
        assert completed.base_digest == genesis.digest
        assert completed.participants == 2
        assert completed.mean_train_loss == pytest.approx(0.625)
        assert completed.bytes_down_per_agent == 41_000
        assert completed.ended_at == STARTED + timedelta(minutes=2)
        assert aborted.status is RoundStatus.ABORTED
        assert aborted.abort_reason == "1 of 2 updates"
        assert running.status is RoundStatus.RUNNING
        kept = [
            (p.agent_id, p.stage, p.num_samples, p.train_loss, p.bytes_up)
            for p in store.participants(1)
        ]
        assert kept == [
            ("plant-1", "update", 100, 0.5, 20_100),
            ("plant-2", "update", 300, 0.75, 20_300),
        ]
        assert [p.num_samples for p in store.participants(2)] == [50]
        assert store.stages(1) == []
        assert store.verify_chain() == 2
        assert [a.agent_id for a in store.list_agents()] == ["plant-1", "plant-2"]
        assert store.event_counts() == {"bad_signature": 1}
        with store.engine.connect() as connection:
            defaults = connection.execute(
                sa.text("SELECT DISTINCT aggregation FROM rounds")
            ).scalars()
            assert list(defaults) == ["plaintext"]
        assert store.next_round_number() == 4

        # The round left running by the old version finishes under the new one.
        store.record_stage(round=3, **stage_values("update", expected=2, received=2))
        second = make_model(3, first.digest, seed=3)
        store.complete_round(
            round=3, participants=[], model=second, mean_train_loss=0.5, bytes_down_per_agent=1
        )
        assert [s.stage for s in store.stages(3)] == ["update"]
        assert store.verify_chain() == 3


def test_downgrade_to_0001_keeps_plaintext_history(store_backend: StoreBackend) -> None:
    with Store.open(store_backend.url) as store:
        genesis = genesis_of(store)
        store.begin_round(round=1, base_digest=genesis.digest, selected=2, min_participants=1)
        store.record_stage(round=1, **stage_values("update", expected=2, received=1))
        plain = ParticipantRecord(agent_id="plant-1", num_samples=9, train_loss=0.5, bytes_up=7)
        store.abort_round(round=1, reason="too few", participants=[plain])

        _downgrade(store, "0001")

        assert store.schema_revision() == "0001"
        inspector = sa.inspect(store.engine)
        assert "round_stages" not in inspector.get_table_names()
        columns = {column["name"]: column for column in inspector.get_columns("rounds")}
        assert not {"aggregation", "threshold", "graph_degree", "word_bits"} & set(columns)
        participant_columns = inspector.get_columns("round_participants")
        assert not any(c["nullable"] for c in participant_columns if c["name"] == "num_samples")
        with store.engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT agent_id, num_samples, bytes_up FROM round_participants")
            ).all()
            assert [tuple(row) for row in rows] == [("plant-1", 9, 7)]
            assert connection.execute(sa.text("SELECT status FROM rounds")).scalar() == "aborted"

        store.upgrade_schema()
        assert store.schema_revision() == head_revision()
        assert store.participants(1) == [
            ParticipantRecord(
                agent_id="plant-1",
                num_samples=9,
                train_loss=0.5,
                bytes_up=7,
                received_at=store.participants(1)[0].received_at,
            )
        ]


def test_downgrade_is_refused_while_secagg_rounds_exist(store_backend: StoreBackend) -> None:
    with Store.open(store_backend.url) as store:
        genesis = genesis_of(store)
        store.begin_round(
            round=1, base_digest=genesis.digest, selected=3, min_participants=2, **SECAGG
        )
        store.abort_round(round=1, reason="dropouts", participants=[blind("plant-1")])
        with pytest.raises(RuntimeError, match="no num_samples or train_loss"):
            _downgrade(store, "0001")
        assert store.schema_revision() == head_revision()
        assert store.participants(1)[0].num_samples is None


def test_new_tables_and_constraints_exist(store: Store) -> None:
    inspector = sa.inspect(store.engine)
    assert "round_stages" in inspector.get_table_names()
    round_checks = {check["name"] for check in inspector.get_check_constraints("rounds")}
    assert "ck_rounds_aggregation" in round_checks
    stage_checks = {check["name"] for check in inspector.get_check_constraints("round_stages")}
    assert stage_checks == {
        "ck_round_stages_received",
        "ck_round_stages_bytes",
        "ck_round_stages_seconds",
    }
    assert inspector.get_pk_constraint("round_stages")["constrained_columns"] == [
        "round",
        "stage",
    ]
    (foreign_key,) = inspector.get_foreign_keys("round_stages")
    assert foreign_key["referred_table"] == "rounds"
    columns = {c["name"]: c for c in inspector.get_columns("round_participants")}
    assert columns["num_samples"]["nullable"]
    assert columns["train_loss"]["nullable"]


@pytest.mark.parametrize(
    "case", ["unknown_aggregation", "more_received_than_expected", "stage_of_unknown_round"]
)
def test_database_refuses_bad_rows_written_around_the_store(store: Store, case: str) -> None:
    genesis = genesis_of(store)
    store.begin_round(round=1, base_digest=genesis.digest, selected=3, min_participants=2)
    stage_row = {
        "round": 1,
        "stage": "keys",
        "expected": 3,
        "received": 3,
        "bytes_in": 0,
        "bytes_out": 0,
        "seconds": 0.0,
        "recorded_at": datetime.now(UTC),
    }
    statement: sa.Executable
    if case == "unknown_aggregation":
        statement = sa.update(RoundRow).where(RoundRow.round == 1).values(aggregation="fancy")
    elif case == "more_received_than_expected":
        statement = sa.insert(RoundStageRow).values({**stage_row, "received": 4})
    else:
        statement = sa.insert(RoundStageRow).values({**stage_row, "round": 9})
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(statement)
    record = store.get_round(1)
    assert record is not None
    assert record.aggregation is Aggregation.PLAINTEXT
    assert store.stages(1) == []


# -- aggregation parameters of a round ---------------------------------------------------


def test_begin_round_defaults_to_plaintext(store: Store) -> None:
    genesis = genesis_of(store)
    store.begin_round(round=1, base_digest=genesis.digest, selected=3, min_participants=2)
    record = store.get_round(1)
    assert record is not None
    assert record.aggregation is Aggregation.PLAINTEXT
    assert str(record.aggregation) == "plaintext"
    assert (record.threshold, record.graph_degree, record.word_bits) == (None, None, None)


def test_begin_round_records_secagg_parameters(store: Store) -> None:
    genesis = genesis_of(store)
    store.begin_round(round=1, base_digest=genesis.digest, selected=5, min_participants=3, **SECAGG)
    store.begin_round(round=2, base_digest=genesis.digest, selected=5, min_participants=3)
    secagg, plaintext = store.list_rounds()[::-1]
    assert secagg.aggregation is Aggregation.SECAGG
    assert (secagg.threshold, secagg.graph_degree, secagg.word_bits) == (3, 4, 32)
    assert plaintext.aggregation is Aggregation.PLAINTEXT
    # A lone agent has no neighbours: the round is recorded (and will abort), not refused.
    lone = {**SECAGG, "threshold": 1, "graph_degree": 0}
    store.begin_round(round=3, base_digest=genesis.digest, selected=1, min_participants=1, **lone)
    record = store.get_round(3)
    assert record is not None
    assert (record.threshold, record.graph_degree) == (1, 0)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"aggregation": "fedavg"}, "not one of"),
        ({"aggregation": "plaintext", "threshold": 3}, "plaintext round takes no threshold"),
        ({**SECAGG, "threshold": None}, "needs threshold"),
        ({**SECAGG, "threshold": 0}, "needs threshold >= 1"),
        ({**SECAGG, "graph_degree": -1}, "needs graph_degree >= 0"),
        ({**SECAGG, "word_bits": None}, "needs word_bits"),
        ({**SECAGG, "word_bits": 65}, "above 64"),
    ],
)
def test_begin_round_refuses_parameters_that_do_not_fit(
    store: Store, parameters: dict[str, Any], message: str
) -> None:
    genesis = genesis_of(store)
    with pytest.raises(StoreError, match=message):
        store.begin_round(
            round=1, base_digest=genesis.digest, selected=5, min_participants=3, **parameters
        )
    assert store.get_round(1) is None
    assert store.next_round_number() == 1


# -- stages ------------------------------------------------------------------------------


def test_stages_come_back_in_protocol_order(store: Store) -> None:
    genesis = genesis_of(store)
    store.begin_round(round=1, base_digest=genesis.digest, selected=5, min_participants=3, **SECAGG)
    recorded = ["reveal", "update", "keys", "confirm", "audit", "masked", "shares"]
    for index, stage in enumerate(recorded):
        store.record_stage(
            round=1, **stage_values(stage, received=5 - index % 3, seconds=0.5 * index)
        )
    stages = store.stages(1)
    assert [s.stage for s in stages] == [*SECAGG_STAGES, "audit", "update"]
    keys = stages[0]
    assert (keys.round, keys.expected, keys.received, keys.dropped) == (1, 5, 3, 2)
    assert (keys.bytes_in, keys.bytes_out) == (4 * 1024, 5 * 2048)
    assert keys.seconds == pytest.approx(1.0)
    assert_recent_utc(keys.recorded_at)
    reveal = stages[4]
    assert (reveal.received, reveal.dropped, reveal.seconds) == (5, 0, 0.0)
    assert sorted(recorded, key=stage_order) == [s.stage for s in stages]


def test_plaintext_round_records_one_update_stage(store: Store) -> None:
    genesis = genesis_of(store)
    store.begin_round(round=1, base_digest=genesis.digest, selected=3, min_participants=2)
    store.record_stage(
        round=1,
        stage="update",
        expected=3,
        received=3,
        bytes_in=3 * 40_000,
        bytes_out=3 * 41_000,
        seconds=12.5,
    )
    (update,) = store.stages(1)
    assert (update.stage, update.dropped, update.bytes_out) == ("update", 0, 123_000)
    assert store.stages(2) == []


def test_recording_a_stage_twice_is_refused(store: Store) -> None:
    genesis = genesis_of(store)
    store.begin_round(round=1, base_digest=genesis.digest, selected=5, min_participants=3, **SECAGG)
    store.record_stage(round=1, **stage_values("keys"))
    with pytest.raises(RoundStateError, match="recorded already") as caught:
        store.record_stage(round=1, **stage_values("keys", received=5, bytes_in=1))
    assert caught.value.round == 1
    (keys,) = store.stages(1)
    assert (keys.received, keys.bytes_in) == (4, 4 * 1024)


@pytest.mark.parametrize("state", ["never_begun", "completed", "aborted"])
def test_stages_are_recorded_only_while_the_round_runs(store: Store, state: str) -> None:
    genesis = genesis_of(store)
    if state != "never_begun":
        store.begin_round(round=1, base_digest=genesis.digest, selected=2, min_participants=1)
    if state == "completed":
        store.complete_round(
            round=1,
            participants=[],
            model=make_model(1, genesis.digest, seed=1),
            mean_train_loss=None,
            bytes_down_per_agent=0,
        )
    elif state == "aborted":
        store.abort_round(round=1, reason="stopped")
    with pytest.raises(RoundStateError) as caught:
        store.record_stage(round=1, **stage_values("update"))
    assert caught.value.round == 1
    assert store.stages(1) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"received": 6}, "more than expected"),
        ({"expected": -1, "received": 0}, "expected is -1"),
        ({"bytes_in": -5}, "bytes_in is -5"),
        ({"bytes_out": -1}, "bytes_out is -1"),
        ({"seconds": -0.5}, "seconds"),
        ({"seconds": math.nan}, "seconds"),
        ({"seconds": math.inf}, "seconds"),
        ({"stage": "Keys"}, "stage name"),
        ({"stage": "keys/+"}, "stage name"),
        ({"stage": ""}, "stage name"),
        ({"stage": "s" * 33}, "stage name"),
    ],
)
def test_record_stage_refuses_values_out_of_range(
    store: Store, overrides: dict[str, Any], message: str
) -> None:
    genesis = genesis_of(store)
    store.begin_round(round=1, base_digest=genesis.digest, selected=5, min_participants=3, **SECAGG)
    with pytest.raises(StoreError, match=message) as caught:
        store.record_stage(round=1, **{**stage_values("keys"), **overrides})
    assert not isinstance(caught.value, RoundStateError)
    assert store.stages(1) == []


def test_abort_after_some_stages_keeps_them(store: Store) -> None:
    genesis = genesis_of(store)
    store.begin_round(round=1, base_digest=genesis.digest, selected=5, min_participants=3, **SECAGG)
    store.record_stage(round=1, **stage_values("keys", received=5))
    store.record_stage(round=1, **stage_values("shares", received=2))
    store.abort_round(
        round=1,
        reason="2 of 5 shared keys, threshold 3",
        participants=[blind("plant-1", "shares"), blind("plant-2", "shares")],
    )
    record = store.get_round(1)
    assert record is not None
    assert record.status is RoundStatus.ABORTED
    assert record.participants == 2
    assert [(s.stage, s.dropped) for s in store.stages(1)] == [("keys", 0), ("shares", 3)]
    assert [(p.agent_id, p.num_samples, p.train_loss) for p in store.participants(1)] == [
        ("plant-1", None, None),
        ("plant-2", None, None),
    ]


def test_secagg_round_completes_without_per_agent_values(store: Store) -> None:
    genesis = genesis_of(store)
    store.begin_round(round=1, base_digest=genesis.digest, selected=3, min_participants=2, **SECAGG)
    for stage in SECAGG_STAGES:
        store.record_stage(round=1, **stage_values(stage, expected=3, received=3))
    model = make_model(1, genesis.digest, seed=1)
    participants = [
        blind(agent, stage)
        for agent in ("plant-1", "plant-2", "plant-3")
        for stage in ("keys", "masked")
    ]
    store.complete_round(
        round=1,
        participants=participants,
        model=model,
        mean_train_loss=None,
        bytes_down_per_agent=50_000,
    )
    record = store.get_round(1)
    assert record is not None
    assert record.status is RoundStatus.COMPLETED
    assert record.model_digest == model.digest
    assert record.mean_train_loss is None
    assert record.participants == 6
    assert [s.stage for s in store.stages(1)] == list(SECAGG_STAGES)
    stored = store.participants(1)
    assert [(p.agent_id, p.stage) for p in stored][:2] == [
        ("plant-1", "keys"),
        ("plant-1", "masked"),
    ]
    assert all(p.num_samples is None and p.train_loss is None for p in stored)
    assert all(p.bytes_up == 2048 for p in stored)


@pytest.mark.parametrize("known", ["num_samples", "train_loss"])
def test_secagg_round_refuses_individual_samples_or_loss(store: Store, known: str) -> None:
    genesis = genesis_of(store)
    store.begin_round(round=1, base_digest=genesis.digest, selected=3, min_participants=2, **SECAGG)
    leaked = ParticipantRecord(
        agent_id="plant-2",
        num_samples=100 if known == "num_samples" else None,
        train_loss=0.5 if known == "train_loss" else None,
        bytes_up=10,
    )
    with pytest.raises(StoreError, match="must not carry num_samples or train_loss"):
        store.complete_round(
            round=1,
            participants=[blind("plant-1"), leaked],
            model=make_model(1, genesis.digest, seed=1),
            mean_train_loss=None,
            bytes_down_per_agent=1,
        )
    with pytest.raises(StoreError, match="must not carry"):
        store.abort_round(round=1, reason="x", participants=[leaked])
    record = store.get_round(1)
    assert record is not None
    assert record.status is RoundStatus.RUNNING
    assert store.participants(1) == []
    assert [m.round for m in store.list_models()] == [0]


def test_plaintext_round_may_leave_samples_and_loss_unknown(store: Store) -> None:
    genesis = genesis_of(store)
    store.begin_round(round=1, base_digest=genesis.digest, selected=2, min_participants=1)
    store.abort_round(round=1, reason="timeout", participants=[blind("plant-1", "update")])
    (recorded,) = store.participants(1)
    assert (recorded.num_samples, recorded.train_loss, recorded.stage) == (None, None, "update")
