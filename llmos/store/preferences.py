"""The preference queue: what feedback said about completions, waiting to train with a preference
loss (llmos/trainer/preference.py). Rows are made with their feedback (llmos/store/generations.py)
and move like samples: queued -> training -> trained, held out, or rejected."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.sql import Select

from llmos.store.db import Database
from llmos.store.lifecycle import Lifecycle, fenced
from llmos.store.tables import PreferenceRow, SampleStatus, utcnow


@dataclass(frozen=True)
class Preference:
    """A pair (chosen and rejected), or one side alone: chosen (desirable) or rejected (undesirable)."""

    id: str
    generation_id: str
    prompt: str
    chosen: str | None
    rejected: str | None
    status: SampleStatus
    reason: str | None = None
    trained_in_version: int | None = None

    @property
    def paired(self) -> bool:
        return self.chosen is not None and self.rejected is not None


def _preference(row: PreferenceRow) -> Preference:
    return Preference(
        row.id,
        row.generation_id,
        row.prompt,
        row.chosen,
        row.rejected,
        SampleStatus(row.status),
        row.reason,
        row.trained_in_version,
    )


def _of_kind(q: Select[Any], pairs_only: bool) -> Select[Any]:
    if pairs_only:
        return q.where(PreferenceRow.chosen.is_not(None), PreferenceRow.rejected.is_not(None))
    return q


class PreferenceQueue(Lifecycle):
    """Preferences: made with their feedback, claimed in batches, and moved on like samples
    (llmos/store/lifecycle.py)."""

    def __init__(self, db: Database) -> None:
        super().__init__(db, PreferenceRow)

    def get(self, preference_id: str) -> Preference | None:
        with self._db.read() as s:
            row = s.scalar(select(PreferenceRow).where(PreferenceRow.id == preference_id))
            return _preference(row) if row else None

    def for_generation(self, generation_id: str) -> list[Preference]:
        with self._db.read() as s:
            rows = s.scalars(
                select(PreferenceRow).where(PreferenceRow.generation_id == generation_id).order_by(PreferenceRow.seq)
            ).all()
            return [_preference(r) for r in rows]

    def depth(self, pairs_only: bool) -> int:
        """Rows waiting to train (pairs only, for a loss that needs both sides)."""
        with self._db.read() as s:
            q = select(func.count()).select_from(PreferenceRow).where(PreferenceRow.status == SampleStatus.queued.value)
            if pairs_only:
                q = q.where(PreferenceRow.chosen.is_not(None), PreferenceRow.rejected.is_not(None))
            return s.scalar(q) or 0

    def claim(self, limit: int, pairs_only: bool, fence: int | None = None) -> list[Preference]:
        """Move the oldest queued rows (pairs only, if asked) to ``training`` under a lease
        (``fence``: the trainer lease's token, as for samples)."""
        with self._db.write() as s:
            fenced(s, fence)
            q = _of_kind(select(PreferenceRow), pairs_only)
            q = q.where(PreferenceRow.status == SampleStatus.queued.value).order_by(PreferenceRow.seq).limit(limit)
            if not self._db.is_sqlite:
                q = q.with_for_update(skip_locked=True)
            rows = s.scalars(q).all()
            taken = [_preference(r) for r in rows]
            if taken:
                s.execute(
                    update(PreferenceRow)
                    .where(PreferenceRow.id.in_([p.id for p in taken]))
                    .values(status=SampleStatus.training.value, claimed_at=utcnow())
                )
            return [replace(p, status=SampleStatus.training) for p in taken]

    def heldout(self, limit: int, pairs_only: bool) -> list[Preference]:
        """The most recent held-out rows, oldest first."""
        with self._db.read() as s:
            q = _of_kind(select(PreferenceRow), pairs_only).where(PreferenceRow.status == SampleStatus.heldout.value)
            rows = s.scalars(q.order_by(PreferenceRow.seq.desc()).limit(limit)).all()
            return [_preference(r) for r in reversed(rows)]
