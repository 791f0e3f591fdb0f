"""Reservoir samples kept in the store, so they survive restarts: the replay pool (trained
samples mixed into new batches) and the anchor set (held-out samples the model must keep
knowing). Each holds at most ``capacity`` sample ids, a uniform sample of the distinct texts ever
offered (Vitter's algorithm R); the count of offers lives in the meta table.

Distinct texts, not samples: a fact posted twelve times would otherwise fill twelve slots and
be replayed twelve times as often as a correction sent once, which the replay then let go (in a
scratch run, 8 corrections adopted, then 1 of 8 left after another domain streamed in)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from llmos.store.db import Database
from llmos.store.queue import Sample, as_sample
from llmos.store.tables import MetaRow, ReservoirRow, SampleRow, SampleStatus


class Reservoir:
    def __init__(self, db: Database, name: str, capacity: int, status: SampleStatus, seed: int = 0) -> None:
        self._db = db
        # Only members still in this status count (a sample requeued by a rollback drops out).
        self.status = status
        self.name = name
        self.capacity = capacity
        self._seed = seed
        self._rng = random.Random(f"{name}:{seed}")
        self._seen_key = f"reservoir:{name}:seen"

    def offer(self, sample_ids: Sequence[str]) -> None:
        """Offer samples; one whose text is in the reservoir already (or earlier in this offer) is
        not counted."""
        if not sample_ids or self.capacity <= 0:
            return
        with self._db.write() as s:
            sample_ids = self._new_texts(s, sample_ids)
            meta = s.get(MetaRow, self._seen_key, with_for_update=True)
            seen = int(meta.value) if meta else 0
            # Seeded by the count so far: the same offers give the same reservoir, across restarts.
            rng = random.Random(f"{self.name}:{self._seed}:{seen}")
            size = s.scalar(select(func.count()).where(ReservoirRow.name == self.name)) or 0
            for sid in sample_ids:
                seen += 1
                if size < self.capacity:
                    s.add(ReservoirRow(name=self.name, slot=size, sample_id=sid))
                    size += 1
                    continue
                j = rng.randrange(seen)
                if j < self.capacity:
                    row = s.get(ReservoirRow, (self.name, j))
                    if row is not None:
                        row.sample_id = sid
            if meta is None:
                s.add(MetaRow(key=self._seen_key, value=str(seen)))
            else:
                meta.value = str(seen)

    def _new_texts(self, s: Session, sample_ids: Sequence[str]) -> list[str]:
        """Those of ``sample_ids`` whose text is neither in the reservoir nor earlier in the list."""
        held: set[str | None] = set(
            s.scalars(
                select(SampleRow.text_hash)
                .join(ReservoirRow, ReservoirRow.sample_id == SampleRow.id)
                .where(ReservoirRow.name == self.name, SampleRow.status == self.status.value)
            )
        )
        hashes: dict[str, str | None] = {}
        for start in range(0, len(sample_ids), 500):
            rows = s.execute(
                select(SampleRow.id, SampleRow.text_hash).where(SampleRow.id.in_(sample_ids[start : start + 500]))
            )
            hashes.update((sid, digest) for sid, digest in rows)
        fresh = []
        for sid in sample_ids:
            digest = hashes.get(sid)
            if digest is not None and digest in held:
                continue
            held.add(digest)
            fresh.append(sid)
        return fresh

    def size(self) -> int:
        with self._db.read() as s:
            return s.scalar(select(func.count()).where(ReservoirRow.name == self.name)) or 0

    def members(self) -> list[Sample]:
        with self._db.read() as s:
            rows = s.scalars(
                select(SampleRow)
                .join(ReservoirRow, ReservoirRow.sample_id == SampleRow.id)
                .where(ReservoirRow.name == self.name, SampleRow.status == self.status.value)
                .order_by(SampleRow.seq)
            ).all()
            return [as_sample(r) for r in rows]

    def draw(self, n: int, rng: random.Random | None = None) -> list[Sample]:
        """Up to n members, uniformly without replacement (from ``rng`` when given)."""
        if n <= 0:
            return []
        with self._db.read() as s:
            slots = s.scalars(
                select(ReservoirRow.slot)
                .join(SampleRow, ReservoirRow.sample_id == SampleRow.id)
                .where(ReservoirRow.name == self.name, SampleRow.status == self.status.value)
            ).all()
            chosen = (rng or self._rng).sample(sorted(slots), min(n, len(slots)))
            if not chosen:
                return []
            rows = s.scalars(
                select(SampleRow)
                .join(ReservoirRow, ReservoirRow.sample_id == SampleRow.id)
                .where(ReservoirRow.name == self.name, ReservoirRow.slot.in_(chosen))
            ).all()
            return [as_sample(r) for r in rows]
