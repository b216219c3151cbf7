"""Record-level privacy in the ledger: ``privacy_ledger`` gains ``agent``.

- ``privacy_ledger.agent``: empty for site-level rows (the federation's spend), the agent
  id for the record-level rows agents now report with their updates (unit ``record``).
  Existing rows keep their values and get ``agent = ''``.
- The unique key becomes (round, unit, agent): one site-level row per round, and one
  record-level row per agent and round.

SQLite rebuilds ``privacy_ledger`` in batch mode (a child table: nothing refers to it);
PostgreSQL alters it in place. Downgrading deletes the record-level rows first, so the old
key (round, unit) holds again.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEY = "uq_privacy_ledger_round"


def upgrade() -> None:
    with op.batch_alter_table("privacy_ledger") as batch:
        batch.add_column(sa.Column("agent", sa.String(64), server_default="", nullable=False))
        batch.drop_constraint(op.f(_KEY), type_="unique")
        batch.create_unique_constraint(op.f(_KEY), ["round", "unit", "agent"])


def downgrade() -> None:
    """Back to 0004: the agents' record-level rows are deleted, then the column."""
    op.execute(sa.text("DELETE FROM privacy_ledger WHERE agent <> ''"))
    with op.batch_alter_table("privacy_ledger") as batch:
        batch.drop_constraint(op.f(_KEY), type_="unique")
        batch.create_unique_constraint(op.f(_KEY), ["round", "unit"])
        batch.drop_column("agent")
