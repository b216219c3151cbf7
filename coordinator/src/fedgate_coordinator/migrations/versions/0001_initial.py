"""Initial coordinator store: agents, models, rounds, round_participants, events.

Revision ID: 0001
Revises:
Create Date: 2025-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("enrolled_at", _utc(), nullable=False),
        sa.Column("last_seen_at", _utc(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.CheckConstraint("status IN ('active', 'revoked')", name="ck_agents_status"),
        sa.PrimaryKeyConstraint("agent_id", name="pk_agents"),
    )
    op.create_table(
        "models",
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("parent_digest", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("spec", sa.LargeBinary(), nullable=False),
        sa.Column("weights", sa.LargeBinary(), nullable=False),
        sa.Column("num_parameters", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("digest", name="pk_models"),
        sa.UniqueConstraint("parent_digest", name="uq_models_parent_digest"),
        sa.UniqueConstraint("round", name="uq_models_round"),
    )
    op.create_table(
        "rounds",
        sa.Column("round", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("base_digest", sa.String(64), nullable=False),
        sa.Column("model_digest", sa.String(64), nullable=True),
        sa.Column("started_at", _utc(), nullable=False),
        sa.Column("ended_at", _utc(), nullable=True),
        sa.Column("selected", sa.Integer(), nullable=False),
        sa.Column("min_participants", sa.Integer(), nullable=False),
        sa.Column("participants", sa.Integer(), nullable=True),
        sa.Column("abort_reason", sa.Text(), nullable=True),
        sa.Column("mean_train_loss", sa.Float(), nullable=True),
        sa.Column("bytes_down_per_agent", sa.BigInteger(), nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'completed', 'aborted')", name="ck_rounds_status"
        ),
        sa.ForeignKeyConstraint(
            ["model_digest"], ["models.digest"], name="fk_rounds_model_digest_models"
        ),
        sa.PrimaryKeyConstraint("round", name="pk_rounds"),
    )
    op.create_table(
        "round_participants",
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.String(64), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("num_samples", sa.Integer(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=False),
        sa.Column("bytes_up", sa.BigInteger(), nullable=False),
        sa.Column("received_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(
            ["round"], ["rounds.round"], name="fk_round_participants_round_rounds"
        ),
        sa.PrimaryKeyConstraint("round", "agent_id", "stage", name="pk_round_participants"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", _utc(), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=True),
        sa.Column("agent_id", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_kind", "events", ["kind"])


def downgrade() -> None:
    op.drop_index("ix_events_kind", table_name="events")
    op.drop_table("events")
    op.drop_table("round_participants")
    op.drop_table("rounds")
    op.drop_table("models")
    op.drop_table("agents")
