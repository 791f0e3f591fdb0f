"""Every generation served, and the feedback given on it.

Feedback that should teach the model becomes a queued sample and a queued preference in the same
transaction as the feedback row, so they are never out of step.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session

from llmos.store.db import Database
from llmos.store.queue import NewSample, insert_samples, time_ordered_ids
from llmos.store.tables import (
    CheckpointRow,
    CheckpointStatus,
    FeedbackRow,
    GenerationRow,
    PreferenceRow,
    SampleStatus,
    utcnow,
)


@dataclass(frozen=True)
class Generation:
    id: str
    prompt: str
    completion: str
    model_version: int
    params: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    created_at: datetime


@dataclass(frozen=True)
class Feedback:
    id: str
    generation_id: str
    rating: float | None
    correction: str | None
    sample_id: str | None


class UnknownGeneration(LookupError):
    pass


class FeedbackLimit(RuntimeError):
    """The generation holds as many feedback entries as one may (feedback.max_per_generation)."""

    def __init__(self, generation_id: str, limit: int) -> None:
        super().__init__(f"generation '{generation_id}' has {limit} feedback entries, the most one takes")
        self.limit = limit


class GenerationLog:
    """Every generation served, for feedback to name; bounded to the newest ``keep`` (those with
    feedback or a preference are kept whatever their age). Pruned every ``keep // 10`` records
    (1,000 at most), so a prune's cost is spread thin."""

    def __init__(self, db: Database, keep: int = 100_000) -> None:
        self._db = db
        self.keep = keep
        self._prune_every = max(1, min(1000, keep // 10))
        self._recorded = 0
        self._lock = threading.Lock()

    def record(
        self,
        prompt: str,
        completion: str,
        model_version: int,
        params: dict[str, Any],
        prompt_tokens: int,
        completion_tokens: int,
        generation_id: str | None = None,
    ) -> str:
        """Store one generation; ``generation_id`` lets a stream name its id before it ends. The
        completion of a version erased meanwhile (a forget job, llmos/store/forget.py, committed
        while it ran) is not kept: it may recite what was forgotten."""
        gid = generation_id or str(uuid.uuid4())
        with self._db.write() as s:
            status = s.scalar(select(CheckpointRow.status).where(CheckpointRow.version == model_version))
            if status == CheckpointStatus.erased.value:
                completion = ""
            s.add(
                GenerationRow(
                    id=gid,
                    prompt=prompt,
                    completion=completion,
                    model_version=model_version,
                    params=params,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    created_at=utcnow(),
                )
            )
        with self._lock:
            self._recorded += 1
            due = self._recorded % self._prune_every == 0
        if due:
            self.prune()
        return gid

    def prune(self) -> int:
        """Delete the oldest generations past ``keep`` that no feedback or preference names."""
        unnamed = (
            ~exists().where(FeedbackRow.generation_id == GenerationRow.id),
            ~exists().where(PreferenceRow.generation_id == GenerationRow.id),
        )
        with self._db.write() as s:
            excess = (s.scalar(select(func.count()).select_from(GenerationRow).where(*unnamed)) or 0) - self.keep
            if excess <= 0:
                return 0
            oldest = select(GenerationRow.id).where(*unnamed).order_by(GenerationRow.created_at).limit(excess)
            ids = list(s.scalars(oldest))
            if ids:
                s.execute(delete(GenerationRow).where(GenerationRow.id.in_(ids)))
            return len(ids)

    def get(self, generation_id: str) -> Generation | None:
        with self._db.read() as s:
            row = s.get(GenerationRow, generation_id)
            if row is None:
                return None
            return Generation(
                id=row.id,
                prompt=row.prompt,
                completion=row.completion,
                model_version=row.model_version,
                params=dict(row.params),
                prompt_tokens=row.prompt_tokens,
                completion_tokens=row.completion_tokens,
                created_at=row.created_at,
            )

    def add_feedback(
        self,
        generation_id: str,
        rating: float | None,
        correction: str | None,
        sample: NewSample | None,
        max_per_generation: int = 0,
    ) -> Feedback:
        """Store feedback (and the sample it yields, if any) atomically; FeedbackLimit once the
        generation holds ``max_per_generation`` entries (0: no bound)."""
        with self._db.write() as s:
            # FOR UPDATE (PostgreSQL): a forget job deleting this generation meanwhile either waits
            # for this feedback (and deletes it too) or has deleted it (404), never a broken reference.
            gen = s.get(GenerationRow, generation_id, with_for_update=True)
            if gen is None:
                raise UnknownGeneration(generation_id)
            if max_per_generation:
                held = s.scalar(
                    select(func.count()).select_from(FeedbackRow).where(FeedbackRow.generation_id == generation_id)
                )
                if (held or 0) >= max_per_generation:
                    raise FeedbackLimit(generation_id, max_per_generation)
            sample_id = insert_samples(s, [sample])[0] if sample is not None else None
            fid = str(uuid.uuid4())
            s.add(
                FeedbackRow(
                    id=fid,
                    generation_id=generation_id,
                    rating=rating,
                    correction=correction,
                    sample_id=sample_id,
                    created_at=utcnow(),
                )
            )
            self._add_preference(s, gen, rating, correction)
            return Feedback(fid, generation_id, rating, correction, sample_id)

    @staticmethod
    def _add_preference(s: Session, gen: GenerationRow, rating: float | None, correction: str | None) -> None:
        """What this feedback says as a preference: a correction makes a pair (the correction
        chosen over the completion, whatever the rating); a rating alone, one side (a thumbs up
        chosen, a thumbs down rejected)."""
        chosen = rejected = None
        if correction is not None:
            if correction == gen.completion:
                return  # "the answer was right": no preference between two equal texts
            chosen, rejected = correction, gen.completion
        elif rating is not None and rating > 0:
            chosen = gen.completion
        elif rating is not None and rating < 0:
            rejected = gen.completion
        else:
            return
        s.add(
            PreferenceRow(
                id=time_ordered_ids(1)[0],
                generation_id=gen.id,
                prompt=gen.prompt,
                chosen=chosen,
                rejected=rejected,
                status=SampleStatus.queued.value,
                created_at=utcnow(),
            )
        )
