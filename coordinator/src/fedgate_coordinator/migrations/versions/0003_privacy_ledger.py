"""Site-level privacy: the privacy ledger, and the clip norm of each round.

- New table ``privacy_ledger``: one row per (round, unit) with what the round spent of the
  unit's privacy budget (unit ``site``: one agent's whole contribution to a round): the
  accountant, δ, the configured and effective noise multipliers, the clip norm, the noise
  on the within-clip count, inputs needed and summed, ε of the round alone and of every
  round so far, and the target ε.
- ``rounds`` gains ``clip_norm`` (the L2 norm inputs were clipped to) and ``within_clip``
  (the fraction of inputs within it, noisy under site-level DP), both NULL for rounds
  recorded before this revision or not measured.

SQLite: the ``rounds`` columns are added with ``ALTER TABLE ... ADD COLUMN`` and dropped in
place (3.35+), so the parent table ``rounds`` is never rebuilt under the rows that refer to
it. PostgreSQL runs plain ``ALTER TABLE``. Downgrading drops the ledger and its history.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NEW_ROUND_COLUMNS = ("within_clip", "clip_norm")


def upgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("clip_norm", sa.Float(), nullable=True))
        batch.add_column(sa.Column("within_clip", sa.Float(), nullable=True))
    op.create_table(
        "privacy_ledger",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("unit", sa.String(32), nullable=False),
        sa.Column("accountant", sa.Text(), nullable=False),
        sa.Column("delta", sa.Float(), nullable=False),
        sa.Column("noise_multiplier", sa.Float(), nullable=False),
        sa.Column("effective_noise_multiplier", sa.Float(), nullable=False),
        sa.Column("clip_norm", sa.Float(), nullable=False),
        sa.Column("count_noise", sa.Float(), nullable=False),
        sa.Column("min_inputs", sa.Integer(), nullable=False),
        sa.Column("inputs", sa.Integer(), nullable=False),
        sa.Column("epsilon_round", sa.Float(), nullable=False),
        sa.Column("epsilon_total", sa.Float(), nullable=False),
        sa.Column("target_epsilon", sa.Float(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("delta > 0 AND delta < 1", name=op.f("ck_privacy_ledger_delta")),
        sa.CheckConstraint(
            "noise_multiplier >= 0 AND effective_noise_multiplier >= 0 AND count_noise >= 0",
            name=op.f("ck_privacy_ledger_noise"),
        ),
        sa.CheckConstraint("clip_norm > 0", name=op.f("ck_privacy_ledger_clip_norm")),
        sa.CheckConstraint(
            "inputs >= 0 AND min_inputs >= 0", name=op.f("ck_privacy_ledger_inputs")
        ),
        sa.CheckConstraint(
            "epsilon_round >= 0 AND epsilon_total >= 0 AND target_epsilon > 0",
            name=op.f("ck_privacy_ledger_epsilon"),
        ),
        sa.ForeignKeyConstraint(
            ["round"], ["rounds.round"], name=op.f("fk_privacy_ledger_round_rounds")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_privacy_ledger")),
        sa.UniqueConstraint("round", "unit", name=op.f("uq_privacy_ledger_round")),
    )


def downgrade() -> None:
    """Back to 0002: the privacy ledger and the rounds' clip columns are dropped."""
    op.drop_table("privacy_ledger")
    for name in _NEW_ROUND_COLUMNS:
        op.drop_column("rounds", name)
