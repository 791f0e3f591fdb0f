"""Lineage: which texts trained each version, in its batch or replayed (older versions: their batch).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "version_texts",
        sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("sample_id", sa.String(36), primary_key=True),
        sa.Column("kind", sa.String(8), nullable=False),
    )
    op.create_index("ix_version_texts_sample_id", "version_texts", ["sample_id"])
    # A store from an older llmos: each trained text's own version is known (samples.trained_in_version);
    # what was replayed into the versions made before this migration is not.
    op.execute(
        "INSERT INTO version_texts (version, sample_id, kind) SELECT trained_in_version, id, 'batch' "
        "FROM samples WHERE status = 'trained' AND trained_in_version IS NOT NULL"
    )


def downgrade() -> None:
    op.drop_index("ix_version_texts_sample_id", table_name="version_texts")
    op.drop_table("version_texts")
