"""One trainer per store: the trainer lease row, free, with fencing token 0.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    lease = op.create_table(
        "trainer_lease",
        sa.Column("name", sa.String(16), primary_key=True),
        sa.Column("holder", sa.String(200)),
        sa.Column("token", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
    )
    # Made here, once, so that taking the lease is always an update of a row that exists: on
    # PostgreSQL two trainers starting together then queue on its row lock instead of racing to insert.
    op.bulk_insert(lease, [{"name": "trainer", "holder": None, "token": 0, "expires_at": None}])


def downgrade() -> None:
    op.drop_table("trainer_lease")
