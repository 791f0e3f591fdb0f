"""The first schema (llmos 0.1 daemon): samples queue, generations, feedback, checkpoint index, meta.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "samples",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("source", sa.String(200)),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("idempotency_key", sa.String(200), unique=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("trained_in_version", sa.Integer()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("claimed_at", TS),
    )
    op.create_index("ix_samples_status_seq", "samples", ["status", "seq"])
    op.create_table(
        "generations",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("completion", sa.Text(), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("generation_id", sa.String(36), sa.ForeignKey("generations.id"), nullable=False),
        sa.Column("rating", sa.Float()),
        sa.Column("correction", sa.Text()),
        sa.Column("sample_id", sa.String(36)),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_feedback_generation_id", "feedback", ["generation_id"])
    op.create_table(
        "checkpoints",
        sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("parent_version", sa.Integer()),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("samples_seen", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("pruned_at", TS),
    )
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    for table in ("meta", "checkpoints", "feedback", "generations", "samples"):
        op.drop_table(table)
