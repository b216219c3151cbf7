"""Persistent state of a coordinator: agents, rounds and their stages, the model hash chain,
the privacy ledger, cross-cloud consensus (per-cloud aggregates, votes, decisions, evidence),
events.

Open with :meth:`Store.open` (``sqlite:///file.db``, ``sqlite://`` or ``postgresql://...``);
the schema is migrated with Alembic on open.
"""

from fedgate_coordinator.store.records import (
    CONSENSUS_STEPS,
    NIL_VALUE,
    PLAINTEXT_STAGE,
    RECORD_UNIT,
    SECAGG_STAGES,
    SITE_UNIT,
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
from fedgate_coordinator.store.store import (
    MIGRATIONS_DIR,
    Store,
    alembic_config,
    head_revision,
    normalize_url,
)

__all__ = [
    "CONSENSUS_STEPS",
    "MIGRATIONS_DIR",
    "NIL_VALUE",
    "PLAINTEXT_STAGE",
    "RECORD_UNIT",
    "SECAGG_STAGES",
    "SITE_UNIT",
    "AgentRecord",
    "AgentStatus",
    "AggregateRecord",
    "Aggregation",
    "DecisionRecord",
    "EventRecord",
    "EvidenceRecord",
    "ModelRecord",
    "ModelSummary",
    "ParticipantRecord",
    "PrivacyLedgerEntry",
    "RoundRecord",
    "RoundStageRecord",
    "RoundStatus",
    "Store",
    "VoteRecord",
    "alembic_config",
    "head_revision",
    "normalize_url",
    "stage_order",
]
