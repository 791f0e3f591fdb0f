"""Learning what users teach: each sample's text hash (repeats are found by it) and where its
prompt ends; preferences (pairs and lone ratings) that train, replacing preference_pairs.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

from llmos.text import text_hash

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("samples") as batch:
        batch.add_column(sa.Column("text_hash", sa.String(64)))
        batch.add_column(sa.Column("prompt_chars", sa.Integer()))
    op.create_index("ix_samples_text_hash", "samples", ["text_hash"])
    conn = op.get_bind()
    samples = sa.table(
        "samples", sa.column("seq", sa.Integer()), sa.column("text", sa.Text()), sa.column("text_hash", sa.String(64))
    )
    last = 0
    while True:  # in slices: a large table is not read into memory at once
        rows = conn.execute(
            sa.select(samples.c.seq, samples.c.text).where(samples.c.seq > last).order_by(samples.c.seq).limit(2000)
        ).all()
        if not rows:
            break
        conn.execute(
            samples.update().where(samples.c.seq == sa.bindparam("s")).values(text_hash=sa.bindparam("h")),
            [{"s": seq, "h": text_hash(text)} for seq, text in rows],
        )
        last = rows[-1][0]

    op.create_table(
        "preferences",
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("generation_id", sa.String(36), sa.ForeignKey("generations.id"), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("chosen", sa.Text()),
        sa.Column("rejected", sa.Text()),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("trained_in_version", sa.Integer()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("claimed_at", TS),
    )
    op.create_index("ix_preferences_generation_id", "preferences", ["generation_id"])
    op.create_index("ix_preferences_status_seq", "preferences", ["status", "seq"])
    old = sa.table(
        "preference_pairs",
        sa.column("generation_id", sa.String(36)),
        sa.column("prompt", sa.Text()),
        sa.column("chosen", sa.Text()),
        sa.column("rejected", sa.Text()),
        sa.column("created_at", TS),
    )
    pairs = conn.execute(sa.select(old).order_by(old.c.created_at)).mappings().all()
    if pairs:
        new = sa.table(
            "preferences",
            *(sa.column(c) for c in ("id", "generation_id", "prompt", "chosen", "rejected", "status", "created_at")),
        )
        conn.execute(new.insert(), [{**p, "id": str(uuid.uuid4()), "status": "queued"} for p in pairs])
    op.drop_table("preference_pairs")


def downgrade() -> None:
    op.create_table(
        "preference_pairs",
        sa.Column("generation_id", sa.String(36), sa.ForeignKey("generations.id"), primary_key=True),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("chosen", sa.Text(), nullable=False),
        sa.Column("rejected", sa.Text(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.drop_table("preferences")
    op.drop_index("ix_samples_text_hash", "samples")
    with op.batch_alter_table("samples") as batch:
        batch.drop_column("prompt_chars")
        batch.drop_column("text_hash")
