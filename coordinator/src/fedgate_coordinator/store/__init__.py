"""Persistent state of a coordinator: agents, rounds and their stages, the model hash chain,
the privacy ledger, events.

Open with :meth:`Store.open` (``sqlite:///file.db``, ``sqlite://`` or ``postgresql://...``);
the schema is migrated with Alembic on open.
"""

from fedgate_coordinator.store.records import (
    PLAINTEXT_STAGE,
    SECAGG_STAGES,
    SITE_UNIT,
    AgentRecord,
    AgentStatus,
    Aggregation,
    EventRecord,
    ModelRecord,
    ModelSummary,
    ParticipantRecord,
    PrivacyLedgerEntry,
    RoundRecord,
    RoundStageRecord,
    RoundStatus,
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
    "MIGRATIONS_DIR",
    "PLAINTEXT_STAGE",
    "SECAGG_STAGES",
    "SITE_UNIT",
    "AgentRecord",
    "AgentStatus",
    "Aggregation",
    "EventRecord",
    "ModelRecord",
    "ModelSummary",
    "ParticipantRecord",
    "PrivacyLedgerEntry",
    "RoundRecord",
    "RoundStageRecord",
    "RoundStatus",
    "Store",
    "alembic_config",
    "head_revision",
    "normalize_url",
    "stage_order",
]
