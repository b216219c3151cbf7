"""Persistent state of a coordinator: agents, rounds, the model hash chain, events.

Open with :meth:`Store.open` (``sqlite:///file.db``, ``sqlite://`` or ``postgresql://...``);
the schema is migrated with Alembic on open.
"""

from fedgate_coordinator.store.records import (
    AgentRecord,
    AgentStatus,
    EventRecord,
    ModelRecord,
    ModelSummary,
    ParticipantRecord,
    RoundRecord,
    RoundStatus,
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
    "AgentRecord",
    "AgentStatus",
    "EventRecord",
    "ModelRecord",
    "ModelSummary",
    "ParticipantRecord",
    "RoundRecord",
    "RoundStatus",
    "Store",
    "alembic_config",
    "head_revision",
    "normalize_url",
]
