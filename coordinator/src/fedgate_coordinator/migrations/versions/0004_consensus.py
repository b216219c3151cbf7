"""Cross-cloud consensus: per-cloud aggregates, votes, decisions, evidence.

- ``cloud_aggregates``: the metadata of each signed per-cloud aggregate per height (cloud,
  base model, participants, norm, SHA-256 of the signed message); never the delta itself.
- ``votes``: every signed proposal, prevote and precommit, this coordinator's own
  (``own``) and its peers', with the signed envelope. A partial unique index allows one
  own vote per (height, round, step): the coordinator never signs two values there.
- ``decisions``: one row per height with the decided global model digest, the consensus
  round, the signing clouds and the commit certificate.
- ``evidence``: pairs of conflicting signed messages of one voter for one (height, round,
  step), both envelopes kept.

Only new tables: nothing existing is touched, on SQLite or PostgreSQL. Downgrading drops
them and the consensus history they hold.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STEP_CHECK = "step IN ('proposal', 'prevote', 'precommit')"


def upgrade() -> None:
    op.create_table(
        "cloud_aggregates",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("cloud", sa.String(64), nullable=False),
        sa.Column("base_digest", sa.String(64), nullable=False),
        sa.Column("participants", sa.Integer(), nullable=False),
        sa.Column("norm", sa.Float(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("height >= 0", name=op.f("ck_cloud_aggregates_height")),
        sa.CheckConstraint("participants >= 0", name=op.f("ck_cloud_aggregates_participants")),
        sa.CheckConstraint("norm >= 0", name=op.f("ck_cloud_aggregates_norm")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cloud_aggregates")),
        sa.UniqueConstraint("height", "cloud", "digest", name=op.f("uq_cloud_aggregates_height")),
    )
    op.create_table(
        "votes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("step", sa.String(16), nullable=False),
        sa.Column("voter", sa.String(64), nullable=False),
        sa.Column("value", sa.String(64), nullable=False),
        sa.Column("own", sa.Boolean(), nullable=False),
        sa.Column("envelope", sa.LargeBinary(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("height >= 0 AND round >= 0", name=op.f("ck_votes_height_round")),
        sa.CheckConstraint(_STEP_CHECK, name=op.f("ck_votes_step")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_votes")),
        sa.UniqueConstraint(
            "height", "round", "step", "voter", "value", name=op.f("uq_votes_height")
        ),
    )
    op.create_index(
        "ix_votes_own_vote_once",
        "votes",
        ["height", "round", "step"],
        unique=True,
        sqlite_where=sa.text("own"),
        postgresql_where=sa.text("own"),
    )
    op.create_table(
        "decisions",
        sa.Column("height", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("value", sa.String(64), nullable=False),
        sa.Column("signers", sa.Text(), nullable=False),
        sa.Column("certificate", sa.LargeBinary(), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("height >= 0 AND round >= 0", name=op.f("ck_decisions_height_round")),
        sa.PrimaryKeyConstraint("height", name=op.f("pk_decisions")),
    )
    op.create_table(
        "evidence",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("voter", sa.String(64), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("step", sa.String(16), nullable=False),
        sa.Column("first_value", sa.String(64), nullable=False),
        sa.Column("second_value", sa.String(64), nullable=False),
        sa.Column("first_envelope", sa.LargeBinary(), nullable=False),
        sa.Column("second_envelope", sa.LargeBinary(), nullable=False),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("height >= 0 AND round >= 0", name=op.f("ck_evidence_height_round")),
        sa.CheckConstraint(_STEP_CHECK, name=op.f("ck_evidence_step")),
        sa.CheckConstraint("first_value <> second_value", name=op.f("ck_evidence_values_differ")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evidence")),
        sa.UniqueConstraint(
            "voter",
            "height",
            "round",
            "step",
            "first_value",
            "second_value",
            name=op.f("uq_evidence_voter"),
        ),
    )


def downgrade() -> None:
    """Back to 0003: the consensus tables and their history are dropped."""
    op.drop_table("evidence")
    op.drop_table("decisions")
    op.drop_index("ix_votes_own_vote_once", table_name="votes")
    op.drop_table("votes")
    op.drop_table("cloud_aggregates")
