"""Secure aggregation: how a round aggregated, its per-stage record, unknown per-agent values.

- ``rounds`` gains ``aggregation`` ('plaintext' | 'secagg', existing rounds: 'plaintext')
  and the SecAgg+ parameters ``threshold``, ``graph_degree``, ``word_bits`` (NULL for
  plaintext rounds).
- New table ``round_stages``: one row per (round, stage) with agents expected and heard
  from, bytes in and out, and the stage's duration.
- ``round_participants.num_samples`` and ``train_loss`` become NULLable: under secure
  aggregation the coordinator never learns them.

SQLite: the new ``rounds`` columns are added with ``ALTER TABLE ... ADD COLUMN`` (the
aggregation check is a column constraint for that reason), so the parent table ``rounds``
is never rebuilt while rows of other tables refer to it; ``round_participants`` is rebuilt
by Alembic's batch mode to relax NOT NULL. PostgreSQL runs plain ``ALTER TABLE``.

Revision ID: 0002
Revises: 0001
Create Date: 2025-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NEW_ROUND_COLUMNS = ("word_bits", "graph_degree", "threshold", "aggregation")


def upgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(
            sa.Column(
                "aggregation",
                sa.String(16),
                sa.CheckConstraint(
                    "aggregation IN ('plaintext', 'secagg')", name=op.f("ck_rounds_aggregation")
                ),
                server_default="plaintext",
                nullable=False,
            )
        )
        batch.add_column(sa.Column("threshold", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("graph_degree", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("word_bits", sa.Integer(), nullable=True))
    with op.batch_alter_table("round_participants") as batch:
        batch.alter_column("num_samples", existing_type=sa.Integer(), nullable=True)
        batch.alter_column("train_loss", existing_type=sa.Float(), nullable=True)
    op.create_table(
        "round_stages",
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("expected", sa.Integer(), nullable=False),
        sa.Column("received", sa.Integer(), nullable=False),
        sa.Column("bytes_in", sa.BigInteger(), nullable=False),
        sa.Column("bytes_out", sa.BigInteger(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "received >= 0 AND received <= expected", name=op.f("ck_round_stages_received")
        ),
        sa.CheckConstraint(
            "bytes_in >= 0 AND bytes_out >= 0", name=op.f("ck_round_stages_bytes")
        ),
        sa.CheckConstraint("seconds >= 0", name=op.f("ck_round_stages_seconds")),
        sa.ForeignKeyConstraint(
            ["round"], ["rounds.round"], name=op.f("fk_round_stages_round_rounds")
        ),
        sa.PrimaryKeyConstraint("round", "stage", name=op.f("pk_round_stages")),
    )


def downgrade() -> None:
    """Back to 0001; refused while a participant row lacks num_samples or train_loss.

    Revision 0001 cannot hold such rows (secure-aggregation rounds), and inventing values
    for them would falsify the history; delete those rounds' rows first if that is meant.
    """
    participants = sa.table(
        "round_participants", sa.column("num_samples"), sa.column("train_loss")
    )
    unknown = op.get_bind().scalar(
        sa.select(sa.func.count())
        .select_from(participants)
        .where(sa.or_(participants.c.num_samples.is_(None), participants.c.train_loss.is_(None)))
    )
    if unknown:
        raise RuntimeError(
            f"cannot downgrade to 0001: {unknown} round_participants rows have no "
            "num_samples or train_loss (secure-aggregation rounds)"
        )
    op.drop_table("round_stages")
    with op.batch_alter_table("round_participants") as batch:
        batch.alter_column("num_samples", existing_type=sa.Integer(), nullable=False)
        batch.alter_column("train_loss", existing_type=sa.Float(), nullable=False)
    # SQLite (3.35+) drops these columns in place, so ``rounds`` is not rebuilt under the
    # rows that refer to it; the CHECK of ``aggregation`` belongs to that column and goes
    # with it. PostgreSQL drops the columns and the constraint the same way.
    for name in _NEW_ROUND_COLUMNS:
        op.drop_column("rounds", name)
