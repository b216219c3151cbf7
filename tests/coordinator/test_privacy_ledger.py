"""The privacy ledger and the rounds' clip columns, on every backend (SQLite file, memory,
PostgreSQL).

Covers migration 0003 (an existing 0002 database upgrades with its rounds and stages
intact, and downgrades again), recording and reading ledger entries, the refusal of a
second entry for the same (round, unit), values out of range, and the clip norm and
within-clip fraction of a round.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command
from fedgate_common.model_spec import ModelSpec, initial_weights
from fedgate_coordinator.errors import RoundStateError, StoreError
from fedgate_coordinator.store import (
    RECORD_UNIT,
    SITE_UNIT,
    Aggregation,
    ModelRecord,
    PrivacyLedgerEntry,
    RoundStatus,
    Store,
    alembic_config,
    head_revision,
)
from fedgate_coordinator.store.schema import PrivacyLedgerRow, UTCDateTime
from sqlalchemy.exc import IntegrityError

if TYPE_CHECKING:
    from tests.coordinator.conftest import StoreBackend

SPEC = ModelSpec(n_features=4, window=8, n_classes=2, channels=4)
STARTED = datetime(2025, 12, 6, 8, 0, tzinfo=UTC)
SECAGG: dict[str, Any] = {
    "aggregation": "secagg",
    "threshold": 2,
    "graph_degree": 2,
    "word_bits": 48,
}
ACCOUNTANT = "rdp (dp_accounting.rdp.RdpAccountant)"


def make_model(round: int, parent_digest: str, seed: int) -> ModelRecord:
    weights = initial_weights(SPEC, np.random.default_rng(seed))
    return ModelRecord.from_weights(
        round=round, parent_digest=parent_digest, spec=SPEC, weights=weights
    )


def genesis_of(store: Store) -> ModelRecord:
    genesis = make_model(0, "", seed=0)
    store.add_model(genesis)
    return genesis


def begin_rounds(store: Store, count: int) -> ModelRecord:
    """The genesis model and ``count`` running secagg rounds on it."""
    genesis = genesis_of(store)
    for round in range(1, count + 1):
        store.begin_round(
            round=round, base_digest=genesis.digest, selected=3, min_participants=2, **SECAGG
        )
    return genesis


def entry(round: int, **overrides: Any) -> PrivacyLedgerEntry:
    values: dict[str, Any] = {
        "round": round,
        "unit": SITE_UNIT,
        "accountant": ACCOUNTANT,
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "effective_noise_multiplier": 1.0625,
        "clip_norm": 2.5,
        "count_noise": 0.75,
        "min_inputs": 2,
        "inputs": 3,
        "epsilon_round": 0.375 * round,
        "epsilon_total": 0.5 * round,
        "target_epsilon": 8.0,
    }
    values.update(overrides)
    return PrivacyLedgerEntry(**values)


class _AnyTime:
    """Equal to any aware datetime, so whole entries can be compared."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, datetime) and other.tzinfo is not None

    def __hash__(self) -> int:
        return 0


ANY_TIME: Any = _AnyTime()


def assert_recent_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - value) < timedelta(minutes=5)


# -- migration 0003 ----------------------------------------------------------------------

# The tables of revision 0002 as they were, to write history the way a 0.2 coordinator did.
_V2 = {
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
        sa.column("aggregation", sa.String()),
        sa.column("threshold", sa.Integer()),
        sa.column("graph_degree", sa.Integer()),
        sa.column("word_bits", sa.Integer()),
    ),
    "round_stages": sa.table(
        "round_stages",
        sa.column("round", sa.Integer()),
        sa.column("stage", sa.String()),
        sa.column("expected", sa.Integer()),
        sa.column("received", sa.Integer()),
        sa.column("bytes_in", sa.BigInteger()),
        sa.column("bytes_out", sa.BigInteger()),
        sa.column("seconds", sa.Float()),
        sa.column("recorded_at", UTCDateTime()),
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


def _write_0002_history(connection: sa.Connection) -> ModelRecord:
    """A completed secagg round 1 with its stages and a secagg round 2 left running."""
    genesis = make_model(0, "", seed=0)
    first = make_model(1, genesis.digest, seed=1)
    connection.execute(sa.insert(_V2["models"]), [_model_values(genesis), _model_values(first)])
    common = {
        "selected": 3,
        "min_participants": 2,
        "started_at": STARTED,
        "aggregation": "secagg",
        "threshold": 2,
        "graph_degree": 2,
        "word_bits": 48,
        "abort_reason": None,
        "mean_train_loss": None,
    }
    connection.execute(
        sa.insert(_V2["rounds"]),
        [
            {
                **common,
                "round": 1,
                "status": "completed",
                "base_digest": genesis.digest,
                "model_digest": first.digest,
                "ended_at": STARTED + timedelta(minutes=1),
                "participants": 3,
                "bytes_down_per_agent": 9_000,
            },
            {
                **common,
                "round": 2,
                "status": "running",
                "base_digest": first.digest,
                "model_digest": None,
                "ended_at": None,
                "participants": None,
                "bytes_down_per_agent": None,
            },
        ],
    )
    connection.execute(
        sa.insert(_V2["round_stages"]),
        [
            {
                "round": 1,
                "stage": stage,
                "expected": 3,
                "received": 3,
                "bytes_in": 3_000,
                "bytes_out": 6_000,
                "seconds": 0.5,
                "recorded_at": STARTED,
            }
            for stage in ("keys", "shares", "masked", "confirm", "reveal")
        ],
    )
    return first


def _downgrade(store: Store, revision: str) -> None:
    config = alembic_config(store.engine.url)
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def test_0002_database_upgrades_with_its_rounds_intact(store_backend: StoreBackend) -> None:
    with Store.open(store_backend.url, migrate=False) as store:
        store.upgrade_schema("0002")
        with store.engine.begin() as connection:
            first = _write_0002_history(connection)

        store.upgrade_schema()

        assert store.schema_revision() == head_revision()
        completed, running = store.get_round(1), store.get_round(2)
        assert completed is not None
        assert running is not None
        assert completed.status is RoundStatus.COMPLETED
        assert completed.model_digest == first.digest
        assert completed.aggregation is Aggregation.SECAGG
        assert (completed.threshold, completed.graph_degree, completed.word_bits) == (2, 2, 48)
        assert (completed.participants, completed.bytes_down_per_agent) == (3, 9_000)
        assert completed.ended_at == STARTED + timedelta(minutes=1)
        assert running.status is RoundStatus.RUNNING
        for record in (completed, running):
            assert (record.clip_norm, record.within_clip) == (None, None)
        assert [(s.stage, s.received) for s in store.stages(1)][:2] == [
            ("keys", 3),
            ("shares", 3),
        ]
        assert store.verify_chain() == 2
        assert store.privacy_ledger() == []

        # The round left running by the old version finishes under the new one, on the record.
        store.set_round_clip(2, clip_norm=2.5, within_clip=0.75)
        store.record_privacy(entry(2))
        store.complete_round(
            round=2,
            participants=[],
            model=make_model(2, first.digest, seed=2),
            mean_train_loss=None,
            bytes_down_per_agent=1,
        )
        finished = store.get_round(2)
        assert finished is not None
        assert (finished.status, finished.clip_norm, finished.within_clip) == (
            RoundStatus.COMPLETED,
            2.5,
            0.75,
        )
        assert [e.round for e in store.privacy_ledger()] == [2]


def test_downgrade_to_0002_drops_the_ledger_and_keeps_rounds(
    store_backend: StoreBackend,
) -> None:
    with Store.open(store_backend.url) as store:
        begin_rounds(store, 1)
        store.set_round_clip(1, clip_norm=1.5, within_clip=0.5)
        store.record_privacy(entry(1))

        _downgrade(store, "0002")

        assert store.schema_revision() == "0002"
        inspector = sa.inspect(store.engine)
        assert "privacy_ledger" not in inspector.get_table_names()
        columns = {column["name"] for column in inspector.get_columns("rounds")}
        assert not {"clip_norm", "within_clip"} & columns
        assert {"aggregation", "threshold", "graph_degree", "word_bits"} <= columns
        with store.engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT round, status, aggregation FROM rounds"))
            assert [tuple(row) for row in rows] == [(1, "running", "secagg")]

        store.upgrade_schema()
        assert store.schema_revision() == head_revision()
        assert store.privacy_ledger() == []
        record = store.get_round(1)
        assert record is not None
        assert (record.clip_norm, record.within_clip) == (None, None)


def test_ledger_table_and_round_columns_exist(store: Store) -> None:
    inspector = sa.inspect(store.engine)
    columns = {c["name"]: c for c in inspector.get_columns("privacy_ledger")}
    assert list(columns) == [
        "id",
        "round",
        "unit",
        "accountant",
        "delta",
        "noise_multiplier",
        "effective_noise_multiplier",
        "clip_norm",
        "count_noise",
        "min_inputs",
        "inputs",
        "epsilon_round",
        "epsilon_total",
        "target_epsilon",
        "recorded_at",
        "agent",
    ]
    assert not any(column["nullable"] for column in columns.values())
    (unique,) = inspector.get_unique_constraints("privacy_ledger")
    assert unique["column_names"] == ["round", "unit", "agent"]
    (foreign_key,) = inspector.get_foreign_keys("privacy_ledger")
    assert (foreign_key["referred_table"], foreign_key["referred_columns"]) == (
        "rounds",
        ["round"],
    )
    checks = {check["name"] for check in inspector.get_check_constraints("privacy_ledger")}
    assert checks == {
        "ck_privacy_ledger_delta",
        "ck_privacy_ledger_noise",
        "ck_privacy_ledger_clip_norm",
        "ck_privacy_ledger_inputs",
        "ck_privacy_ledger_epsilon",
    }
    round_columns = {c["name"]: c for c in inspector.get_columns("rounds")}
    assert round_columns["clip_norm"]["nullable"]
    assert round_columns["within_clip"]["nullable"]


@pytest.mark.parametrize("case", ["duplicate", "unknown_round", "negative_epsilon"])
def test_database_refuses_bad_ledger_rows_written_around_the_store(store: Store, case: str) -> None:
    begin_rounds(store, 1)
    store.record_privacy(entry(1))
    row = {
        "round": 1,
        "unit": SITE_UNIT,
        "accountant": ACCOUNTANT,
        "delta": 1e-5,
        "noise_multiplier": 1.0,
        "effective_noise_multiplier": 1.0,
        "clip_norm": 1.0,
        "count_noise": 0.0,
        "min_inputs": 1,
        "inputs": 1,
        "epsilon_round": 1.0,
        "epsilon_total": 1.0,
        "target_epsilon": 8.0,
        "recorded_at": datetime.now(UTC),
    }
    if case == "unknown_round":
        row["round"] = 9
    elif case == "negative_epsilon":
        row.update(unit="other", epsilon_round=-1.0)
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(sa.insert(PrivacyLedgerRow).values(row))
    assert store.privacy_ledger() == [replace(entry(1), recorded_at=ANY_TIME)]


# -- recording and reading -----------------------------------------------------------------


def test_record_and_read_the_ledger(store: Store) -> None:
    begin_rounds(store, 3)
    at = datetime(2025, 12, 7, 9, 30, tzinfo=UTC)
    # Recorded out of order; read back by round.
    store.record_privacy(entry(3, inputs=2, epsilon_total=1.5))
    store.record_privacy(entry(1, recorded_at=at))
    store.record_privacy(entry(2, count_noise=0.0, min_inputs=3))

    ledger = store.privacy_ledger()

    assert [e.round for e in ledger] == [1, 2, 3]
    assert ledger[0] == entry(1, recorded_at=at)
    assert ledger[1] == replace(entry(2, count_noise=0.0, min_inputs=3), recorded_at=ANY_TIME)
    assert ledger[2].inputs == 2
    assert ledger[2].epsilon_total == 1.5
    for recorded in ledger[1:]:
        assert_recent_utc(recorded.recorded_at)
    first = ledger[0]
    assert (first.unit, first.accountant, first.delta, first.target_epsilon) == (
        "site",
        ACCOUNTANT,
        1e-5,
        8.0,
    )
    assert (first.noise_multiplier, first.effective_noise_multiplier) == (1.1, 1.0625)
    assert (first.clip_norm, first.count_noise, first.min_inputs, first.inputs) == (2.5, 0.75, 2, 3)
    assert (first.epsilon_round, first.epsilon_total) == (0.375, 0.5)
    assert store.privacy_ledger(SITE_UNIT) == ledger
    assert store.privacy_ledger("record") == []


def test_ledger_filters_by_unit(store: Store) -> None:
    begin_rounds(store, 2)
    store.record_privacy(entry(2, unit="cohort"))
    store.record_privacy(entry(1))
    store.record_privacy(entry(1, unit="cohort"))
    assert [(e.round, e.unit) for e in store.privacy_ledger()] == [
        (1, "cohort"),
        (1, "site"),
        (2, "cohort"),
    ]
    assert [e.round for e in store.privacy_ledger("cohort")] == [1, 2]
    assert [e.round for e in store.privacy_ledger(SITE_UNIT)] == [1]


def test_ledger_accepts_rounds_in_any_state(store: Store) -> None:
    genesis = begin_rounds(store, 2)
    store.complete_round(
        round=1,
        participants=[],
        model=make_model(1, genesis.digest, seed=1),
        mean_train_loss=None,
        bytes_down_per_agent=1,
    )
    store.abort_round(round=2, reason="dropouts after the sum was released")
    store.record_privacy(entry(1))
    store.record_privacy(entry(2))
    assert [e.round for e in store.privacy_ledger()] == [1, 2]


def test_second_entry_for_a_round_and_unit_is_refused(store: Store) -> None:
    begin_rounds(store, 1)
    store.record_privacy(entry(1))
    with pytest.raises(RoundStateError, match="recorded already") as caught:
        store.record_privacy(entry(1, epsilon_round=0.0, epsilon_total=0.0))
    assert caught.value.round == 1
    (kept,) = store.privacy_ledger()
    assert kept.epsilon_total == 0.5


def test_entry_for_a_round_never_begun_is_refused(store: Store) -> None:
    begin_rounds(store, 1)
    with pytest.raises(RoundStateError, match="never begun") as caught:
        store.record_privacy(entry(2))
    assert caught.value.round == 2
    assert store.privacy_ledger() == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"unit": "Site"}, "unit 'Site'"),
        ({"unit": ""}, "unit ''"),
        ({"unit": "u" * 33}, "unit"),
        ({"accountant": " "}, "accountant"),
        ({"delta": 0.0}, "delta must be in"),
        ({"delta": 1.0}, "delta must be in"),
        ({"delta": math.nan}, "delta must be a finite number"),
        ({"noise_multiplier": -0.5}, "noise_multiplier"),
        ({"effective_noise_multiplier": math.inf}, "effective_noise_multiplier"),
        ({"clip_norm": 0.0}, "clip_norm must be > 0"),
        ({"count_noise": -1.0}, "count_noise"),
        ({"min_inputs": -1}, "min_inputs"),
        ({"inputs": 2.5}, "inputs must be an integer"),
        ({"epsilon_round": math.nan}, "epsilon_round"),
        ({"epsilon_total": math.inf}, "epsilon_total"),
        ({"target_epsilon": 0.0}, "target_epsilon must be > 0"),
    ],
)
def test_record_privacy_refuses_values_out_of_range(
    store: Store, overrides: dict[str, Any], message: str
) -> None:
    begin_rounds(store, 1)
    with pytest.raises(StoreError, match=message) as caught:
        store.record_privacy(entry(1, **overrides))
    assert not isinstance(caught.value, RoundStateError)
    assert store.privacy_ledger() == []


def test_numpy_numbers_are_stored_as_plain_ones(store: Store) -> None:
    begin_rounds(store, 1)
    store.record_privacy(
        entry(1, inputs=np.int64(3), epsilon_round=np.float64(0.25), count_noise=np.float32(0.5))
    )
    (stored,) = store.privacy_ledger()
    assert (stored.inputs, stored.epsilon_round, stored.count_noise) == (3, 0.25, 0.5)
    assert type(stored.inputs) is int
    assert type(stored.epsilon_round) is float


# -- clip norm of a round ------------------------------------------------------------------


def test_set_round_clip_records_and_updates(store: Store) -> None:
    begin_rounds(store, 2)
    record = store.get_round(1)
    assert record is not None
    assert (record.clip_norm, record.within_clip) == (None, None)

    store.set_round_clip(1, clip_norm=2.5, within_clip=None)
    record = store.get_round(1)
    assert record is not None
    assert (record.clip_norm, record.within_clip) == (2.5, None)

    # Once the sum is decoded: the noisy fraction may fall just outside [0, 1].
    store.set_round_clip(1, clip_norm=2.5, within_clip=-0.015625)
    store.set_round_clip(2, clip_norm=3, within_clip=0.8125)
    by_round = {r.round: r for r in store.list_rounds()}
    assert (by_round[1].clip_norm, by_round[1].within_clip) == (2.5, -0.015625)
    assert (by_round[2].clip_norm, by_round[2].within_clip) == (3.0, 0.8125)
    assert by_round[1].status is RoundStatus.RUNNING


def test_set_round_clip_after_the_round_completed(store: Store) -> None:
    genesis = begin_rounds(store, 1)
    store.complete_round(
        round=1,
        participants=[],
        model=make_model(1, genesis.digest, seed=1),
        mean_train_loss=None,
        bytes_down_per_agent=1,
    )
    store.set_round_clip(1, clip_norm=1.25, within_clip=0.5)
    record = store.get_round(1)
    assert record is not None
    assert (record.status, record.clip_norm, record.within_clip) == (
        RoundStatus.COMPLETED,
        1.25,
        0.5,
    )


def test_set_round_clip_of_a_round_never_begun_is_refused(store: Store) -> None:
    with pytest.raises(RoundStateError, match="never begun") as caught:
        store.set_round_clip(4, clip_norm=1.0, within_clip=None)
    assert caught.value.round == 4


@pytest.mark.parametrize(
    ("clip_norm", "within_clip", "message"),
    [
        (0.0, None, "clip_norm"),
        (-1.0, 0.5, "clip_norm"),
        (math.nan, None, "clip_norm"),
        (math.inf, None, "clip_norm"),
        (1.0, math.nan, "within_clip"),
        (1.0, -math.inf, "within_clip"),
    ],
)
def test_set_round_clip_refuses_values_out_of_range(
    store: Store, clip_norm: float, within_clip: float | None, message: str
) -> None:
    begin_rounds(store, 1)
    with pytest.raises(StoreError, match=message) as caught:
        store.set_round_clip(1, clip_norm=clip_norm, within_clip=within_clip)
    assert not isinstance(caught.value, RoundStateError)
    record = store.get_round(1)
    assert record is not None
    assert record.clip_norm is None


# -- record level: the agents' reports (migration 0005) ---------------------------------------


def record_entry(round: int, agent: str, **overrides: Any) -> PrivacyLedgerEntry:
    values: dict[str, Any] = {
        "unit": RECORD_UNIT,
        "agent": agent,
        "accountant": "rdp (opacus.accountants.RDPAccountant)",
        "noise_multiplier": 3.9,
        "effective_noise_multiplier": 3.9,
        "clip_norm": 1.0,
        "count_noise": 0.0,
        "min_inputs": 0,
        "inputs": 0,
        "epsilon_round": 0.4,
        "epsilon_total": 0.4 * round,
        "target_epsilon": 3.0,
    }
    values.update(overrides)
    return entry(round, **values)


def test_record_rows_are_kept_per_agent_next_to_the_site_row(store: Store) -> None:
    begin_rounds(store, 2)
    store.record_privacy(record_entry(1, "site-b"))
    store.record_privacy(entry(1))
    store.record_privacy(record_entry(1, "site-a"))
    store.record_privacy(record_entry(2, "site-a"))

    assert [(e.round, e.unit, e.agent) for e in store.privacy_ledger()] == [
        (1, RECORD_UNIT, "site-a"),
        (1, RECORD_UNIT, "site-b"),
        (1, SITE_UNIT, ""),
        (2, RECORD_UNIT, "site-a"),
    ]
    assert store.privacy_ledger(SITE_UNIT) == [replace(entry(1), recorded_at=ANY_TIME)]
    assert store.privacy_ledger(RECORD_UNIT)[2] == replace(
        record_entry(2, "site-a"), recorded_at=ANY_TIME
    )


def test_second_report_of_an_agent_for_a_round_is_refused(store: Store) -> None:
    begin_rounds(store, 1)
    store.record_privacy(record_entry(1, "site-a"))
    with pytest.raises(RoundStateError, match="agent 'site-a' is recorded already"):
        store.record_privacy(record_entry(1, "site-a", epsilon_total=0.0, epsilon_round=0.0))
    (kept,) = store.privacy_ledger()
    assert kept.epsilon_total == 0.4


def test_record_row_with_an_overlong_agent_is_refused(store: Store) -> None:
    begin_rounds(store, 1)
    with pytest.raises(StoreError, match="agent must be at most 64"):
        store.record_privacy(record_entry(1, "a" * 65))
    assert store.privacy_ledger() == []


def test_downgrade_to_0004_keeps_site_rows_and_drops_the_agents_reports(
    store_backend: StoreBackend,
) -> None:
    with Store.open(store_backend.url) as store:
        begin_rounds(store, 2)
        store.record_privacy(entry(1))
        store.record_privacy(record_entry(1, "site-a"))
        store.record_privacy(entry(2))

        _downgrade(store, "0004")

        assert store.schema_revision() == "0004"
        inspector = sa.inspect(store.engine)
        assert "agent" not in {c["name"] for c in inspector.get_columns("privacy_ledger")}
        (unique,) = inspector.get_unique_constraints("privacy_ledger")
        assert unique["column_names"] == ["round", "unit"]
        with store.engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT round, unit FROM privacy_ledger"))
            assert sorted(tuple(row) for row in rows) == [(1, "site"), (2, "site")]

        store.upgrade_schema()

        assert store.schema_revision() == head_revision()
        assert [(e.round, e.unit, e.agent) for e in store.privacy_ledger()] == [
            (1, SITE_UNIT, ""),
            (2, SITE_UNIT, ""),
        ]
        store.record_privacy(record_entry(2, "site-a"))
        assert len(store.privacy_ledger(RECORD_UNIT)) == 1
