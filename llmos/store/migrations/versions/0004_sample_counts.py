"""Samples by status (rejected ones by reason label), kept as they are written, so GET /metrics no
longer counts the whole samples table on every scrape; counted here once from the rows there are.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections import Counter

import sqlalchemy as sa
from alembic import op

from llmos.store.counts import count_key

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    counts = op.create_table(
        "sample_counts",
        sa.Column("status", sa.String(16), primary_key=True),
        sa.Column("label", sa.String(16), primary_key=True),
        sa.Column("n", sa.Integer(), nullable=False),
    )
    samples = sa.table("samples", sa.column("status", sa.String(16)), sa.column("reason", sa.Text()))
    n: Counter[tuple[str, str]] = Counter()
    # Rejected samples by reason (their labels come from it), the others by status alone. A literal,
    # not a parameter: PostgreSQL matches the GROUP BY expression to the selected one by its text.
    reason = sa.case((samples.c.status == sa.literal_column("'rejected'"), samples.c.reason))
    rows = op.get_bind().execute(
        sa.select(samples.c.status, reason, sa.func.count()).group_by(samples.c.status, reason)
    )
    for status, why, k in rows:
        n[count_key(status, why)] += k
    if n:
        op.bulk_insert(counts, [{"status": s, "label": label, "n": k} for (s, label), k in sorted(n.items())])


def downgrade() -> None:
    op.drop_table("sample_counts")
