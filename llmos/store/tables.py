"""The store's tables. Rows never leave this package: repositories return frozen records."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Dialect, Float, ForeignKey, Index, Integer, String, Text, TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class SampleStatus(enum.StrEnum):
    queued = "queued"
    training = "training"
    trained = "trained"
    heldout = "heldout"
    rejected = "rejected"
    erased = "erased"  # forgotten (llmos/store/forget.py): a tombstone, its text gone


class CheckpointStatus(enum.StrEnum):
    candidate = "candidate"
    promoted = "promoted"
    rejected = "rejected"
    erased = "erased"  # trained on a forgotten text, or descended from one that was: never served again


class SampleRow(Base):
    __tablename__ = "samples"

    # seq orders the queue; id is what clients see.
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True, nullable=False)
    text: Mapped[str] = mapped_column(Text, nullable=False)
    # sha256 of the normalised text (llmos.text): copies of one text share it.
    text_hash: Mapped[str | None] = mapped_column(String(64))
    # Where the prompt ends, for a (prompt + answer) text such as a correction: recall is measured
    # on the answer given the prompt, as a user asks it. None: a plain text.
    prompt_chars: Mapped[int | None] = mapped_column(Integer)
    source: Mapped[str | None] = mapped_column(String(200))
    weight: Mapped[float] = mapped_column(Float, nullable=False, default=1.0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=SampleStatus.queued.value)
    reason: Mapped[str | None] = mapped_column(Text)
    trained_in_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Sent back to the queue by a forget job: the erased version whose batch it was. Texts of one
    # such batch are claimed together and alone, so the retraining repeats the batches it replaces.
    retrain_of: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        Index("ix_samples_status_seq", "status", "seq"),
        Index("ix_samples_text_hash", "text_hash"),
    )


class SampleCountRow(Base):
    """How many samples stand in each status, rejected ones by reason label: kept by every write
    that adds or moves a sample, in its transaction (llmos/store/counts.py)."""

    __tablename__ = "sample_counts"

    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    label: Mapped[str] = mapped_column(String(16), primary_key=True)  # "" but for rejected samples
    n: Mapped[int] = mapped_column(Integer, nullable=False)


class GenerationRow(Base):
    __tablename__ = "generations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    completion: Mapped[str] = mapped_column(Text, nullable=False)
    model_version: Mapped[int] = mapped_column(Integer, nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    prompt_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    completion_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class FeedbackRow(Base):
    __tablename__ = "feedback"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id"), nullable=False, index=True)
    rating: Mapped[float | None] = mapped_column(Float)
    correction: Mapped[str | None] = mapped_column(Text)
    sample_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    step: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    samples_seen: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    # Pruned checkpoints keep their row so lineage (parent chains) stays walkable.
    pruned_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class VersionTextRow(Base):
    """Lineage: a text that trained a version, in the version's own batch or replayed into it
    (llmos/store/lineage.py). Written with the version's checkpoint row, kept when its files are
    pruned, so that what trained each version stays known for as long as the store."""

    __tablename__ = "version_texts"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    sample_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), nullable=False)  # TextKind

    __table_args__ = (Index("ix_version_texts_sample_id", "sample_id"),)


class MetaRow(Base):
    """Small named values shared by every process on this store (e.g. the active version)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)


class ReservoirRow(Base):
    """Slots of named reservoir samples (replay pool, anchor set), holding samples by reference."""

    __tablename__ = "reservoir_slots"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    sample_id: Mapped[str] = mapped_column(String(36), nullable=False)


class PreferenceRow(Base):
    """What feedback says about a completion: a pair (chosen = a correction, rejected = the
    completion), or one side alone (a thumbs up: chosen; a thumbs down: rejected). Each trains
    with the preference loss (feedback.preference) and moves through the statuses of a sample."""

    __tablename__ = "preferences"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(36), unique=True, nullable=False)
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id"), nullable=False, index=True)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    chosen: Mapped[str | None] = mapped_column(Text)
    rejected: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=SampleStatus.queued.value)
    reason: Mapped[str | None] = mapped_column(Text)
    trained_in_version: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_preferences_status_seq", "status", "seq"),)


class AuditRow(Base):
    """One admin action: who (a credential's fingerprint, never the secret), what, when, and how it ended."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    actor: Mapped[str] = mapped_column(String(64), nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    outcome: Mapped[str] = mapped_column(String(16), nullable=False)
    status_code: Mapped[int] = mapped_column(Integer, nullable=False)
    detail: Mapped[str | None] = mapped_column(Text)


class ForgetJobRow(Base):
    """A forget request (llmos/store/forget.py): what it asked, what the erasure did in its one
    transaction, and how far the scrub and the retraining that follow it have come."""

    __tablename__ = "forget_jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    request: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)  # ids, idempotency keys, source
    forgotten: Mapped[int] = mapped_column(Integer, nullable=False)  # texts erased
    rolled_back_to: Mapped[int | None] = mapped_column(Integer)  # None: the active version was not touched
    erased_versions: Mapped[list[int]] = mapped_column(JSON, nullable=False)
    retrain: Mapped[list[str]] = mapped_column(JSON, nullable=False)  # ids back in the queue to train again
    scrubbed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # copies elsewhere erased, files gone
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class TrainerLeaseRow(Base):
    """Which trainer may train on this store (llmos/store/lease.py): one row, made by the migration.
    ``token`` grows by one each time the lease changes hands; the trainer's writes carry it, and
    the store refuses one whose token is no longer this row's."""

    __tablename__ = "trainer_lease"

    name: Mapped[str] = mapped_column(String(16), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(200))  # None: free
    token: Mapped[int] = mapped_column(Integer, nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # by the database's clock
