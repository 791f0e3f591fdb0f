"""Every generation served, and the feedback given on it.

Feedback that should teach the model becomes a queued sample in the same transaction as the
feedback row, so the two are never out of step.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from llmos.store.db import Database
from llmos.store.queue import NewSample, insert_samples
from llmos.store.tables import FeedbackRow, GenerationRow, PreferencePairRow, utcnow


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


@dataclass(frozen=True)
class PreferencePair:
    generation_id: str
    prompt: str
    chosen: str
    rejected: str


class UnknownGeneration(LookupError):
    pass


class GenerationLog:
    def __init__(self, db: Database) -> None:
        self._db = db

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
        """Store one generation; ``generation_id`` lets a stream name its id before it ends."""
        gid = generation_id or str(uuid.uuid4())
        with self._db.write() as s:
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
        return gid

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
        self, generation_id: str, rating: float | None, correction: str | None, sample: NewSample | None
    ) -> Feedback:
        """Store feedback (and the sample it yields, if any) atomically."""
        with self._db.write() as s:
            if s.scalar(select(GenerationRow.id).where(GenerationRow.id == generation_id)) is None:
                raise UnknownGeneration(generation_id)
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
            s.flush()
            self._maybe_pair(s, generation_id)
            return Feedback(fid, generation_id, rating, correction, sample_id)

    @staticmethod
    def _maybe_pair(s: Session, generation_id: str) -> None:
        """Once a generation has both a negative rating and a correction (in one feedback or
        several), keep it as a preference pair: chosen = the newest correction, rejected = the completion."""
        if s.get(PreferencePairRow, generation_id) is not None:
            return
        rows = s.scalars(
            select(FeedbackRow).where(FeedbackRow.generation_id == generation_id).order_by(FeedbackRow.created_at)
        ).all()
        negative = any(r.rating is not None and r.rating < 0 for r in rows)
        corrections = [r.correction for r in rows if r.correction is not None]
        if not (negative and corrections):
            return
        gen = s.get(GenerationRow, generation_id)
        assert gen is not None
        s.add(
            PreferencePairRow(
                generation_id=generation_id,
                prompt=gen.prompt,
                chosen=corrections[-1],
                rejected=gen.completion,
                created_at=utcnow(),
            )
        )

    def preference_pairs(self, limit: int = 1000) -> list[PreferencePair]:
        with self._db.read() as s:
            rows = s.scalars(select(PreferencePairRow).order_by(PreferencePairRow.created_at).limit(limit)).all()
            return [PreferencePair(r.generation_id, r.prompt, r.chosen, r.rejected) for r in rows]
