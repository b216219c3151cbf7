"""Cross-cloud consensus in the store, on every backend (SQLite file, memory, PostgreSQL).

Covers migration 0004 (an existing 0003 database upgrades with its rounds, models and
privacy ledger intact, and downgrades again), per-cloud aggregates, votes (idempotent, never
two own votes for one step), decisions (one per height, a conflicting one refused),
evidence, ordering and limits, and values out of range.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command
from fedgate_common.model_spec import ModelSpec, initial_weights
from fedgate_coordinator.errors import StoreError
from fedgate_coordinator.store import (
    CONSENSUS_STEPS,
    NIL_VALUE,
    AggregateRecord,
    DecisionRecord,
    EvidenceRecord,
    ModelRecord,
    RoundStatus,
    Store,
    VoteRecord,
    alembic_config,
    head_revision,
)
from fedgate_coordinator.store.schema import DecisionRow, EvidenceRow, UTCDateTime, VoteRow
from sqlalchemy.exc import IntegrityError

if TYPE_CHECKING:
    from tests.coordinator.conftest import StoreBackend

SPEC = ModelSpec(n_features=4, window=8, n_classes=2, channels=4)
AT = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)
CONSENSUS_TABLES = ("cloud_aggregates", "votes", "decisions", "evidence")


def digest(label: object) -> str:
    return hashlib.sha256(str(label).encode()).hexdigest()


def aggregate(height: int, cloud: str, **overrides: Any) -> AggregateRecord:
    values: dict[str, Any] = {
        "height": height,
        "cloud": cloud,
        "base_digest": digest(f"model-{height - 1}"),
        "participants": 5,
        "norm": 1.25,
        "digest": digest(f"aggregate-{height}-{cloud}"),
    }
    values.update(overrides)
    return AggregateRecord(**values)


def vote(
    height: int, round: int, step: str, voter: str, value: str, **overrides: Any
) -> VoteRecord:
    values: dict[str, Any] = {
        "height": height,
        "round": round,
        "step": step,
        "voter": voter,
        "value": value,
        "own": False,
        "envelope": f"signed {step} {height}/{round} by {voter} for {value[:8]}".encode(),
    }
    values.update(overrides)
    return VoteRecord(**values)


def decision(height: int, **overrides: Any) -> DecisionRecord:
    values: dict[str, Any] = {
        "height": height,
        "round": 0,
        "value": digest(f"model-{height}"),
        "signers": ("cloud-b", "cloud-a", "cloud-c"),
        "certificate": f"certificate of {height}".encode(),
    }
    values.update(overrides)
    return DecisionRecord(**values)


LOW, HIGH = sorted([digest("a"), digest("b")])


def evidence(voter: str = "cloud-x", **overrides: Any) -> EvidenceRecord:
    values: dict[str, Any] = {
        "voter": voter,
        "height": 3,
        "round": 1,
        "step": "precommit",
        "first_value": LOW,
        "second_value": HIGH,
        "first_envelope": b"signed precommit for low",
        "second_envelope": b"signed precommit for high",
    }
    values.update(overrides)
    return EvidenceRecord(**values)


class _AnyTime:
    """Equal to any aware datetime, so whole records can be compared."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, datetime) and other.tzinfo is not None

    def __hash__(self) -> int:
        return 0


ANY_TIME: Any = _AnyTime()


def assert_recent_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - value) < timedelta(minutes=5)


# -- migration 0004 ----------------------------------------------------------------------


def make_model(round: int, parent_digest: str, seed: int) -> ModelRecord:
    weights = initial_weights(SPEC, np.random.default_rng(seed))
    return ModelRecord.from_weights(
        round=round, parent_digest=parent_digest, spec=SPEC, weights=weights
    )


# The tables of revision 0003 as they were, to write history the way a 0.3 coordinator did.
_V3 = {
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
        sa.column("aggregation", sa.String()),
        sa.column("clip_norm", sa.Float()),
        sa.column("within_clip", sa.Float()),
    ),
    "privacy_ledger": sa.table(
        "privacy_ledger",
        sa.column("round", sa.Integer()),
        sa.column("unit", sa.String()),
        sa.column("accountant", sa.Text()),
        sa.column("delta", sa.Float()),
        sa.column("noise_multiplier", sa.Float()),
        sa.column("effective_noise_multiplier", sa.Float()),
        sa.column("clip_norm", sa.Float()),
        sa.column("count_noise", sa.Float()),
        sa.column("min_inputs", sa.Integer()),
        sa.column("inputs", sa.Integer()),
        sa.column("epsilon_round", sa.Float()),
        sa.column("epsilon_total", sa.Float()),
        sa.column("target_epsilon", sa.Float()),
        sa.column("recorded_at", UTCDateTime()),
    ),
}


def _write_0003_history(connection: sa.Connection) -> ModelRecord:
    """Genesis, a completed round 1 with its privacy spend, and round 2 left running."""
    genesis = make_model(0, "", seed=0)
    first = make_model(1, genesis.digest, seed=1)
    connection.execute(
        sa.insert(_V3["models"]),
        [
            {
                "digest": model.digest,
                "parent_digest": model.parent_digest,
                "round": model.round,
                "created_at": AT,
                "spec": model.spec,
                "weights": model.weights,
                "num_parameters": model.num_parameters,
            }
            for model in (genesis, first)
        ],
    )
    common = {"selected": 3, "min_participants": 2, "started_at": AT, "aggregation": "plaintext"}
    connection.execute(
        sa.insert(_V3["rounds"]),
        [
            {
                **common,
                "round": 1,
                "status": "completed",
                "base_digest": genesis.digest,
                "model_digest": first.digest,
                "ended_at": AT + timedelta(minutes=1),
                "participants": 3,
                "clip_norm": 2.5,
                "within_clip": 0.75,
            },
            {
                **common,
                "round": 2,
                "status": "running",
                "base_digest": first.digest,
                "model_digest": None,
                "ended_at": None,
                "participants": None,
                "clip_norm": None,
                "within_clip": None,
            },
        ],
    )
    connection.execute(
        sa.insert(_V3["privacy_ledger"]),
        {
            "round": 1,
            "unit": "site",
            "accountant": "rdp",
            "delta": 1e-5,
            "noise_multiplier": 1.1,
            "effective_noise_multiplier": 1.0,
            "clip_norm": 2.5,
            "count_noise": 0.5,
            "min_inputs": 2,
            "inputs": 3,
            "epsilon_round": 0.5,
            "epsilon_total": 0.5,
            "target_epsilon": 8.0,
            "recorded_at": AT,
        },
    )
    return first


def _downgrade(store: Store, revision: str) -> None:
    config = alembic_config(store.engine.url)
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)


def test_0003_database_upgrades_with_its_history_intact(store_backend: StoreBackend) -> None:
    with Store.open(store_backend.url, migrate=False) as store:
        store.upgrade_schema("0003")
        with store.engine.begin() as connection:
            first = _write_0003_history(connection)

        store.upgrade_schema()

        assert store.schema_revision() == head_revision()
        completed, running = store.get_round(1), store.get_round(2)
        assert completed is not None
        assert running is not None
        assert (completed.status, completed.model_digest, completed.participants) == (
            RoundStatus.COMPLETED,
            first.digest,
            3,
        )
        assert (completed.clip_norm, completed.within_clip) == (2.5, 0.75)
        assert completed.ended_at == AT + timedelta(minutes=1)
        assert running.status is RoundStatus.RUNNING
        assert store.verify_chain() == 2
        (spent,) = store.privacy_ledger()
        assert (spent.round, spent.epsilon_total, spent.recorded_at) == (1, 0.5, AT)
        assert store.decisions() == []
        assert store.votes() == []
        assert store.evidence() == []
        assert store.cloud_aggregates(2) == []

        # The round left running by the old version is decided under the new one.
        assert store.record_cloud_aggregate(aggregate(2, "cloud-a", base_digest=first.digest))
        assert store.record_vote(vote(2, 0, "precommit", "cloud-a", digest(2), own=True))
        assert store.record_decision(decision(2, value=digest(2)))
        store.complete_round(
            round=2,
            participants=[],
            model=make_model(2, first.digest, seed=2),
            mean_train_loss=None,
            bytes_down_per_agent=1,
        )
        last = store.last_decision()
        assert last is not None
        assert last.height == 2
        assert store.verify_chain() == 3


def test_downgrade_to_0003_drops_the_consensus_tables_and_keeps_rounds(
    store_backend: StoreBackend,
) -> None:
    with Store.open(store_backend.url) as store:
        genesis = make_model(0, "", seed=0)
        store.add_model(genesis)
        store.begin_round(round=1, base_digest=genesis.digest, selected=3, min_participants=2)
        store.record_cloud_aggregate(aggregate(1, "cloud-a"))
        store.record_vote(vote(1, 0, "prevote", "cloud-a", digest(1), own=True))
        store.record_decision(decision(1))
        store.record_evidence(evidence())

        _downgrade(store, "0003")

        assert store.schema_revision() == "0003"
        tables = set(sa.inspect(store.engine).get_table_names())
        assert not set(CONSENSUS_TABLES) & tables
        assert {"rounds", "models", "privacy_ledger"} <= tables
        assert [r.round for r in store.list_rounds()] == [1]

        store.upgrade_schema()
        assert store.schema_revision() == head_revision()
        assert (store.decisions(), store.votes(), store.evidence()) == ([], [], [])


def test_consensus_tables_and_constraints_exist(store: Store) -> None:
    inspector = sa.inspect(store.engine)
    expected_columns = {
        "cloud_aggregates": [
            "id",
            "height",
            "cloud",
            "base_digest",
            "participants",
            "norm",
            "digest",
            "received_at",
        ],
        "votes": [
            "id",
            "height",
            "round",
            "step",
            "voter",
            "value",
            "own",
            "envelope",
            "received_at",
        ],
        "decisions": ["height", "round", "value", "signers", "certificate", "decided_at"],
        "evidence": [
            "id",
            "voter",
            "height",
            "round",
            "step",
            "first_value",
            "second_value",
            "first_envelope",
            "second_envelope",
            "detected_at",
        ],
    }
    for table, names in expected_columns.items():
        columns = inspector.get_columns(table)
        assert [column["name"] for column in columns] == names
        assert not any(column["nullable"] for column in columns)
    uniques = {
        table: [u["column_names"] for u in inspector.get_unique_constraints(table)]
        for table in ("cloud_aggregates", "votes", "evidence")
    }
    assert uniques == {
        "cloud_aggregates": [["height", "cloud", "digest"]],
        "votes": [["height", "round", "step", "voter", "value"]],
        "evidence": [["voter", "height", "round", "step", "first_value", "second_value"]],
    }
    (own_index,) = [
        index
        for index in inspector.get_indexes("votes")
        if index["name"] == "ix_votes_own_vote_once"
    ]
    assert own_index["unique"]
    assert own_index["column_names"] == ["height", "round", "step"]
    assert inspector.get_pk_constraint("decisions")["constrained_columns"] == ["height"]


def _raw_vote(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "height": 1,
        "round": 0,
        "step": "prevote",
        "voter": "cloud-a",
        "value": digest("other"),
        "own": True,
        "envelope": b"x",
        "received_at": datetime.now(UTC),
    }
    row.update(overrides)
    return row


@pytest.mark.parametrize(
    "case",
    [
        "second_own_vote",
        "duplicate_vote",
        "unknown_step",
        "negative_height",
        "evidence_no_conflict",
    ],
)
def test_database_refuses_bad_rows_written_around_the_store(store: Store, case: str) -> None:
    store.record_vote(vote(1, 0, "prevote", "cloud-a", digest(1), own=True))
    statement: sa.Insert
    if case == "second_own_vote":
        statement = sa.insert(VoteRow).values(_raw_vote())
    elif case == "duplicate_vote":
        statement = sa.insert(VoteRow).values(_raw_vote(value=digest(1), own=False))
    elif case == "unknown_step":
        statement = sa.insert(VoteRow).values(_raw_vote(step="commit", own=False))
    elif case == "negative_height":
        statement = sa.insert(DecisionRow).values(
            height=-1,
            round=0,
            value=digest(1),
            signers="cloud-a",
            certificate=b"c",
            decided_at=datetime.now(UTC),
        )
    else:
        statement = sa.insert(EvidenceRow).values(
            voter="cloud-a",
            height=1,
            round=0,
            step="prevote",
            first_value=digest(1),
            second_value=digest(1),
            first_envelope=b"a",
            second_envelope=b"b",
            detected_at=datetime.now(UTC),
        )
    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(statement)
    assert [v.value for v in store.votes()] == [digest(1)]
    assert store.decisions() == []
    assert store.evidence() == []


# -- per-cloud aggregates ------------------------------------------------------------------


def test_record_and_read_cloud_aggregates(store: Store) -> None:
    # Recorded out of order; read back by cloud id.
    assert store.record_cloud_aggregate(aggregate(4, "cloud-c", participants=0, norm=0.0))
    assert store.record_cloud_aggregate(aggregate(4, "cloud-a", received_at=AT))
    assert store.record_cloud_aggregate(aggregate(5, "cloud-a"))
    assert store.record_cloud_aggregate(aggregate(4, "cloud-b", participants=12, norm=3.5))

    at_four = store.cloud_aggregates(4)

    assert [a.cloud for a in at_four] == ["cloud-a", "cloud-b", "cloud-c"]
    assert at_four[0] == aggregate(4, "cloud-a", received_at=AT)
    assert at_four[1] == replace(
        aggregate(4, "cloud-b", participants=12, norm=3.5), received_at=ANY_TIME
    )
    assert (at_four[2].participants, at_four[2].norm) == (0, 0.0)
    assert_recent_utc(at_four[1].received_at)
    assert [a.height for a in store.cloud_aggregates(5)] == [5]
    assert store.cloud_aggregates(6) == []


def test_cloud_aggregates_are_idempotent_and_keep_equivocations(store: Store) -> None:
    first = aggregate(2, "cloud-a", received_at=AT)
    assert store.record_cloud_aggregate(first)
    # The same aggregate again (a redelivery) changes nothing, even with other metadata.
    assert not store.record_cloud_aggregate(replace(first, received_at=AT + timedelta(hours=1)))
    assert not store.record_cloud_aggregate(replace(first, participants=9))
    # A second, different aggregate of the same cloud at the same height is kept beside it.
    second = aggregate(2, "cloud-a", digest=digest("another"), received_at=AT)
    assert store.record_cloud_aggregate(second)
    assert store.cloud_aggregates(2) == [first, second]


def test_numpy_numbers_are_stored_as_plain_ones(store: Store) -> None:
    store.record_cloud_aggregate(
        aggregate(np.int64(3), "cloud-a", participants=np.int32(4), norm=np.float32(0.5))  # type: ignore[arg-type]
    )
    store.record_vote(vote(np.int64(3), np.int64(1), "prevote", "cloud-a", NIL_VALUE))  # type: ignore[arg-type]
    (stored,) = store.cloud_aggregates(3)
    assert (type(stored.height), type(stored.participants), type(stored.norm)) == (int, int, float)
    (stored_vote,) = store.votes(3)
    assert (type(stored_vote.height), type(stored_vote.round)) == (int, int)


# -- votes ---------------------------------------------------------------------------------


def test_record_and_read_votes(store: Store) -> None:
    value = digest("model-7")
    own = vote(7, 0, "prevote", "cloud-a", value, own=True, received_at=AT)
    nil = vote(7, 0, "precommit", "cloud-b", NIL_VALUE)
    proposal = vote(7, 0, "proposal", "cloud-c", value)

    assert store.record_vote(own)
    assert store.record_vote(nil)
    assert store.record_vote(proposal)

    votes = store.votes(7)
    assert votes == [
        replace(proposal, received_at=ANY_TIME),
        own,
        replace(nil, received_at=ANY_TIME),
    ]
    assert votes[1].own is True
    assert votes[2].own is False
    assert votes[2].value == ""
    assert isinstance(votes[0].envelope, bytes)
    assert_recent_utc(votes[0].received_at)


def test_votes_are_idempotent(store: Store) -> None:
    first = vote(1, 0, "prevote", "cloud-b", digest(1), envelope=b"first copy")
    assert store.record_vote(first)
    assert not store.record_vote(first)
    # The same vote re-encoded, or echoed back as one's own, is still the same vote.
    assert not store.record_vote(replace(first, envelope=b"second copy"))
    assert not store.record_vote(replace(first, own=True))
    (kept,) = store.votes()
    assert (kept.envelope, kept.own) == (b"first copy", False)


def test_a_second_own_vote_for_another_value_is_refused(store: Store) -> None:
    signed = vote(2, 1, "precommit", "cloud-a", digest(2), own=True)
    assert store.record_vote(signed)
    for other in (digest("fork"), NIL_VALUE):
        with pytest.raises(StoreError, match="already signed"):
            store.record_vote(replace(signed, value=other))
    # Even when that other value is on record as received (our key signed it: equivocation).
    assert store.record_vote(replace(signed, value=digest("replayed"), own=False))
    with pytest.raises(StoreError, match="already signed"):
        store.record_vote(replace(signed, value=digest("replayed")))
    # The same own vote again is fine, and so are other steps, rounds and peers' votes.
    assert not store.record_vote(signed)
    assert store.record_vote(replace(signed, step="prevote"))
    assert store.record_vote(replace(signed, round=2, value=NIL_VALUE))
    assert store.record_vote(replace(signed, voter="cloud-b", own=False, value=digest("fork")))
    assert [(v.round, v.step, v.voter, v.value, v.own) for v in store.votes(2)] == [
        (1, "prevote", "cloud-a", digest(2), True),
        *sorted(
            [
                (1, "precommit", "cloud-a", digest(2), True),
                (1, "precommit", "cloud-a", digest("replayed"), False),
            ]
        ),
        (1, "precommit", "cloud-b", digest("fork"), False),
        (2, "precommit", "cloud-a", NIL_VALUE, True),
    ]


def test_a_peer_equivocating_is_recorded_twice(store: Store) -> None:
    assert store.record_vote(vote(3, 0, "prevote", "cloud-x", digest("a")))
    assert store.record_vote(vote(3, 0, "prevote", "cloud-x", digest("b")))
    assert store.record_vote(vote(3, 0, "prevote", "cloud-x", NIL_VALUE))
    assert sorted(v.value for v in store.votes(3)) == sorted(["", digest("a"), digest("b")])


def test_votes_are_ordered_by_height_round_step_voter_and_limited_to_the_newest(
    store: Store,
) -> None:
    recorded = [
        vote(height, round, step, voter, digest((height, round)))
        for height in (2, 1, 3)
        for round in (1, 0)
        for step in ("precommit", "proposal", "prevote")
        for voter in ("cloud-b", "cloud-a")
    ]
    for record in recorded:
        assert store.record_vote(record)

    every = store.votes()

    expected_order = sorted(
        recorded,
        key=lambda v: (v.height, v.round, CONSENSUS_STEPS.index(v.step), v.voter, v.value),
    )
    assert [(v.height, v.round, v.step, v.voter) for v in every] == [
        (v.height, v.round, v.step, v.voter) for v in expected_order
    ]
    assert every[:3] == [replace(v, received_at=ANY_TIME) for v in expected_order[:3]]
    assert [v.height for v in store.votes(2)] == [2] * 12
    assert store.votes(limit=5) == every[-5:]
    assert store.votes(height=1, limit=2) == every[10:12]
    assert store.votes(limit=0) == []
    assert store.votes(limit=1000) == every
    assert store.votes(9) == []


# -- decisions -----------------------------------------------------------------------------


def test_record_and_read_decisions(store: Store) -> None:
    assert store.last_decision() is None
    assert store.decision(1) is None
    assert store.record_decision(decision(2, round=3, decided_at=AT))
    assert store.record_decision(decision(1))

    second = store.decision(2)
    assert second == decision(2, round=3, decided_at=AT)
    assert second is not None
    assert second.signers == ("cloud-a", "cloud-b", "cloud-c")
    first = store.decision(1)
    assert first is not None
    assert_recent_utc(first.decided_at)
    assert first.certificate == b"certificate of 1"
    assert store.last_decision() == second
    assert store.decision(3) is None


def test_signers_are_a_sequence_kept_sorted() -> None:
    assert decision(1, signers=["c", "a", "b"]).signers == ("a", "b", "c")
    with pytest.raises(TypeError, match="not the string"):
        decision(1, signers="cloud-a")


def test_the_same_decision_again_is_a_no_op(store: Store) -> None:
    original = decision(4, decided_at=AT)
    assert store.record_decision(original)
    assert not store.record_decision(original)
    # The same value with another certificate (another quorum, a later round) keeps the first.
    assert not store.record_decision(
        decision(4, round=2, signers=("cloud-d", "cloud-a", "cloud-b"), certificate=b"other")
    )
    assert store.decisions() == [original]


def test_a_conflicting_decision_is_refused(store: Store) -> None:
    original = decision(5, decided_at=AT)
    store.record_decision(original)
    with pytest.raises(StoreError, match="decided already") as caught:
        store.record_decision(decision(5, value=digest("fork")))
    assert not isinstance(caught.value, IntegrityError)
    assert store.decisions() == [original]


def test_decisions_are_newest_last(store: Store) -> None:
    for height in (3, 1, 4, 2, 5):
        store.record_decision(decision(height))
    assert [d.height for d in store.decisions()] == [1, 2, 3, 4, 5]
    assert [d.height for d in store.decisions(limit=2)] == [4, 5]
    assert store.decisions(limit=0) == []
    last = store.last_decision()
    assert last is not None
    assert last.height == 5


# -- evidence ------------------------------------------------------------------------------


def test_record_and_read_evidence(store: Store) -> None:
    recorded = evidence(detected_at=AT)
    assert store.record_evidence(recorded)
    assert store.record_evidence(evidence("cloud-y", step="prevote", second_value=NIL_VALUE))

    first, second = store.evidence()

    assert first == replace(recorded, id=first.id)
    assert first.id is not None
    assert (second.voter, second.step) == ("cloud-y", "prevote")
    # Nil sorts first: the pair is kept in canonical order, envelopes with their values.
    assert (second.first_value, second.first_envelope) == (NIL_VALUE, b"signed precommit for high")
    assert (second.second_value, second.second_envelope) == (LOW, b"signed precommit for low")
    assert_recent_utc(second.detected_at)
    assert [e.voter for e in store.evidence(limit=1)] == ["cloud-y"]


def test_evidence_is_idempotent_in_either_order(store: Store) -> None:
    recorded = evidence()
    assert store.record_evidence(recorded)
    assert not store.record_evidence(recorded)
    swapped = evidence(
        first_value=recorded.second_value,
        second_value=recorded.first_value,
        first_envelope=recorded.second_envelope,
        second_envelope=recorded.first_envelope,
    )
    assert swapped == recorded
    assert not store.record_evidence(swapped)
    assert store.record_evidence(evidence(round=2))
    assert [(e.height, e.round) for e in store.evidence()] == [(3, 1), (3, 2)]


# -- values out of range ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"height": -1}, "height must be an integer >= 0"),
        ({"height": 1.5}, "height must be an integer"),
        ({"cloud": "bad/cloud"}, "invalid cloud id"),
        ({"cloud": ""}, "invalid cloud id"),
        ({"base_digest": "ABC"}, "base_digest must be 64 lowercase hex"),
        ({"base_digest": ""}, "base_digest"),
        ({"participants": -3}, "participants"),
        ({"participants": True}, "participants"),
        ({"norm": float("nan")}, "norm must be a finite number"),
        ({"norm": -0.5}, "norm"),
        ({"digest": digest(1).upper()}, "digest must be 64 lowercase hex"),
    ],
)
def test_record_cloud_aggregate_refuses_values_out_of_range(
    store: Store, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(StoreError, match=message):
        store.record_cloud_aggregate(replace(aggregate(1, "cloud-a"), **overrides))
    assert store.cloud_aggregates(1) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"height": -1}, "height"),
        ({"round": -1}, "round must be an integer >= 0"),
        ({"step": "commit"}, "step must be one of proposal, prevote, precommit"),
        ({"voter": "cloud a"}, "invalid voter"),
        ({"value": "nil"}, "value must be 64 lowercase hex characters or ''"),
        ({"step": "proposal", "value": NIL_VALUE}, "value must be 64 lowercase hex characters,"),
        ({"own": 1}, "own must be a bool"),
        ({"envelope": b""}, "envelope must be non-empty bytes"),
        ({"envelope": "text"}, "envelope"),
    ],
)
def test_record_vote_refuses_values_out_of_range(
    store: Store, overrides: dict[str, Any], message: str
) -> None:
    values: dict[str, Any] = {"height": 1, "round": 0, "step": "prevote", "voter": "cloud-a"}
    values.update(overrides)
    value = values.pop("value", digest(1))
    with pytest.raises(StoreError, match=message):
        store.record_vote(vote(value=value, **values))
    assert store.votes() == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"height": -2}, "height"),
        ({"round": -1}, "round"),
        ({"value": NIL_VALUE}, "value must be 64 lowercase hex characters,"),
        ({"signers": ()}, "at least one signer"),
        ({"signers": ("cloud-a", "cloud-a")}, "repeat a cloud"),
        ({"signers": ("cloud-a", "b,c")}, "invalid signer"),
        ({"certificate": b""}, "certificate must be non-empty bytes"),
    ],
)
def test_record_decision_refuses_values_out_of_range(
    store: Store, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(StoreError, match=message):
        store.record_decision(replace(decision(1), **overrides))
    assert store.decisions() == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"voter": "+"}, "invalid voter"),
        ({"height": -1}, "height"),
        ({"round": -5}, "round"),
        ({"step": "vote"}, "step must be one of"),
        ({"second_value": LOW}, "same value: no conflict"),
        ({"step": "proposal", "first_value": NIL_VALUE}, "first_value must be 64"),
        ({"second_value": "zz"}, "second_value"),
        ({"first_envelope": b""}, "first_envelope"),
        ({"second_envelope": None}, "second_envelope"),
    ],
)
def test_record_evidence_refuses_values_out_of_range(
    store: Store, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(StoreError, match=message):
        store.record_evidence(evidence(**overrides))
    assert store.evidence() == []


@pytest.mark.parametrize("limit", [-1, True])
def test_negative_limits_are_refused(store: Store, limit: int) -> None:
    for read in (store.votes, store.decisions, store.evidence):
        with pytest.raises(StoreError, match="limit"):
            read(limit=limit)
