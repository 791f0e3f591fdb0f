"""Forgetting: the forget jobs, and samples.retrain_of (the statuses "erased" need no schema change).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "forget_jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("forgotten", sa.Integer(), nullable=False),
        sa.Column("rolled_back_to", sa.Integer()),
        sa.Column("erased_versions", sa.JSON(), nullable=False),
        sa.Column("retrain", sa.JSON(), nullable=False),
        sa.Column("scrubbed_at", TS),
        sa.Column("finished_at", TS),
    )

    with op.batch_alter_table("samples") as batch:
        batch.add_column(sa.Column("retrain_of", sa.Integer()))


def downgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        batch.drop_column("retrain_of")
    op.drop_table("forget_jobs")
