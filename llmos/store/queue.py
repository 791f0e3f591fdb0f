"""The sample queue: one method per operation on the ``samples`` table.

Samples move queued -> training -> trained (or heldout / rejected). The trainer calls
``claim_batch``, ``ack``, ``reject``, ``release``; it never writes SQL.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from llmos.store.counts import SampleCounts, add_counts, count_key, moves, read_counts
from llmos.store.db import Database
from llmos.store.lifecycle import Lifecycle, fenced
from llmos.store.tables import SampleRow, SampleStatus, utcnow
from llmos.text import text_hash

# Statuses of a sample that still stands for its text (a rejected one does not).
LIVE = (SampleStatus.queued.value, SampleStatus.training.value, SampleStatus.trained.value, SampleStatus.heldout.value)


# The smallest weight a text trains with: below it a text teaches nothing, and float32 (the
# loss's type) rounds weights under 1.4e-45 to 0, which the trainer takes for padding.
MIN_WEIGHT = 1e-6


@dataclass(frozen=True)
class NewSample:
    text: str
    source: str | None = None
    weight: float = 1.0
    idempotency_key: str | None = None
    prompt_chars: int | None = None  # a (prompt + answer) text: where the prompt ends


@dataclass(frozen=True)
class Sample:
    id: str
    seq: int
    text: str
    source: str | None
    weight: float
    status: SampleStatus
    reason: str | None
    trained_in_version: int | None
    created_at: datetime
    text_hash: str | None = None
    prompt_chars: int | None = None


def as_sample(row: Any, status: SampleStatus | None = None) -> Sample:
    """A sample from its ORM object or a plain row of the same columns."""
    return Sample(
        id=row.id,
        seq=row.seq,
        text=row.text,
        source=row.source,
        weight=row.weight,
        status=status or SampleStatus(row.status),
        reason=row.reason,
        trained_in_version=row.trained_in_version,
        created_at=row.created_at,
        text_hash=row.text_hash,
        prompt_chars=row.prompt_chars,
    )


def time_ordered_ids(n: int) -> list[str]:
    """n UUIDv7 strings (RFC 9562): a millisecond timestamp, then 74 random bits. New rows go to
    the end of the id index, not to random places in it as uuid4's do (which slowed ingest as the
    table grew), and one os.urandom call serves them all (uuid4 took 6 us each here, this 1.6)."""
    ts = f"{time.time_ns() // 1_000_000:012x}"
    rand = os.urandom(10 * n).hex()
    return [
        f"{ts[:8]}-{ts[8:]}-7{r[:3]}-{'89ab'[int(r[3], 16) & 3]}{r[4:7]}-{r[7:19]}"
        for r in (rand[i : i + 20] for i in range(0, 20 * n, 20))
    ]


class IdempotencyConflict(ValueError):
    """An idempotency key was used before with another text: a retry must send the same one."""

    def __init__(self, key: str) -> None:
        super().__init__("this idempotency key was used before with another text")
        self.key = key


def insert_samples(session: Session, items: Sequence[NewSample]) -> list[str]:
    """Insert within the caller's transaction; an idempotency key seen before with the same text
    yields its old id, with another text IdempotencyConflict (nothing is written)."""
    keys = {it.idempotency_key for it in items if it.idempotency_key is not None}
    known: dict[str, tuple[str, str | None]] = {}  # key -> (id, text hash)
    if keys:
        rows = session.execute(
            select(SampleRow.idempotency_key, SampleRow.id, SampleRow.text_hash).where(
                SampleRow.idempotency_key.in_(keys)
            )
        )
        known = {k: (i, h) for k, i, h in rows if k is not None}
    ids: list[str] = []
    new_rows: list[dict[str, object]] = []
    now = utcnow()
    fresh = iter(time_ordered_ids(len(items)))
    for it in items:
        digest = text_hash(it.text)
        if it.idempotency_key is not None and it.idempotency_key in known:
            sid, seen = known[it.idempotency_key]
            if seen is not None and seen != digest:
                raise IdempotencyConflict(it.idempotency_key)
            ids.append(sid)
            continue
        sid = next(fresh)
        if it.idempotency_key is not None:
            known[it.idempotency_key] = sid, digest  # a key repeated inside one request maps to one row
        new_rows.append(
            {
                "id": sid,
                "text": it.text,
                "text_hash": digest,
                "prompt_chars": it.prompt_chars,
                "source": it.source,
                "weight": it.weight,
                "idempotency_key": it.idempotency_key,
                "status": SampleStatus.queued.value,
                "created_at": now,
            }
        )
        ids.append(sid)
    if new_rows:
        # A Core executemany on the table: the ORM's unit of work costs ~40 us per row, and even its
        # bulk path (insert(SampleRow)) ~30 us, several times the insert itself.
        session.connection().execute(insert(cast(Table, SampleRow.__table__)), new_rows)
        add_counts(session, {count_key(SampleStatus.queued.value, None): len(new_rows)})
    return ids


@dataclass
class _Write:
    """One enqueue() call waiting for a group commit."""

    items: Sequence[NewSample]
    ids: list[str] | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.ids is not None or self.error is not None


class QueueFull(RuntimeError):
    def __init__(self, depth: int, limit: int) -> None:
        super().__init__(f"the queue holds {depth} texts waiting to be trained; the limit is {limit}")
        self.depth, self.limit = depth, limit


class SampleQueue(Lifecycle):
    """Samples: enqueued (group commit), claimed in batches, and moved on (ack, reject, release,
    requeue ...: llmos/store/lifecycle.py, shared with the preference queue)."""

    # Most texts one group commit writes: bounds the latency a waiting writer can add.
    GROUP_MAX_ITEMS = 5000

    def __init__(self, db: Database) -> None:
        super().__init__(db, SampleRow)
        self._writes: list[_Write] = []  # enqueue() calls waiting for the next group commit
        self._writing = False  # a caller is committing a group now
        self._group = threading.Condition()
        self._recent_depth: tuple[float, int] | None = None  # (when, depth) for depth_estimate()
        self._room = threading.Lock()
        self._reserved = 0  # texts admitted by room() and not yet committed

    def enqueue(self, items: Sequence[NewSample]) -> list[str]:
        """Store the samples durably and return their ids (committed when this returns).

        Group commit: concurrent calls share one transaction, so one fsync acknowledges them
        all. Whoever finds no commit running writes every call waiting (its own among them); the
        others wait for it. A call returns only after the transaction holding its rows committed."""
        me = _Write(items)
        with self._group:
            self._writes.append(me)
        while True:
            with self._group:
                while self._writing and not me.done:
                    self._group.wait()
                if me.done:
                    break
                self._writing = True
                group: list[_Write] = []
                n = 0
                while self._writes and (not group or n + len(self._writes[0].items) <= self.GROUP_MAX_ITEMS):
                    group.append(self._writes.pop(0))
                    n += len(group[-1].items)
            try:
                self._commit_group(group)
            finally:
                for w in group:
                    if not w.done:  # only if _commit_group itself failed
                        w.error = RuntimeError("the group commit failed")
                with self._group:
                    self._writing = False
                    self._group.notify_all()
        if me.error is not None:
            raise me.error
        assert me.ids is not None
        return me.ids

    def _commit_group(self, group: list[_Write]) -> None:
        """One transaction for the group; if it fails, each call is retried alone, so that one bad
        call (say, an idempotency race) cannot fail the others."""
        if len(group) > 1:
            try:
                ids = self._insert([it for w in group for it in w.items])
            except Exception:  # noqa: BLE001 - each call is retried alone below and gets its own error
                pass
            else:
                start = 0
                for w in group:
                    w.ids = ids[start : start + len(w.items)]
                    start += len(w.items)
                self._count_enqueued(len(ids))
                return
        for w in group:
            try:
                w.ids = self._insert(w.items)
                self._count_enqueued(len(w.ids))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller that owns it
                w.error = exc

    def _count_enqueued(self, n: int) -> None:
        recent = self._recent_depth
        if recent is not None:
            self._recent_depth = (recent[0], recent[1] + n)  # a repeated idempotency key counts too: errs high

    def _insert(self, items: Sequence[NewSample]) -> list[str]:
        for attempt in range(3):
            try:
                with self._db.write() as s:
                    return insert_samples(s, items)
            except IntegrityError:
                # Another writer took one of our idempotency keys between our read and write
                # (possible on PostgreSQL); the retry sees it and returns its id (or the conflict).
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def ids_by_key(self, stored_keys: Sequence[str]) -> list[str]:
        """The ids of the texts posted with any of ``stored_keys`` (idempotency keys as stored)."""
        with self._db.read() as s:
            rows = s.scalars(select(SampleRow.id).where(SampleRow.idempotency_key.in_(list(stored_keys))))
            return list(rows)

    def get(self, sample_id: str) -> Sample | None:
        with self._db.read() as s:
            row = s.scalar(select(SampleRow).where(SampleRow.id == sample_id))
            return as_sample(row) if row else None

    def counts(self) -> SampleCounts:
        """Samples by status, rejected ones by reason: the counts the store keeps as it writes
        (llmos/store/counts.py), read without counting the samples table."""
        with self._db.read() as s:
            return read_counts(s)

    def depth(self) -> int:
        return self.counts().by_status.get(SampleStatus.queued.value, 0)

    def depth_estimate(self, max_age_s: float) -> int:
        """depth() as read at most ``max_age_s`` ago, plus what this process enqueued since: for
        backpressure on every ingest. Made when depth() counted the queue (6 ms at 100k rows on
        SQLite, more than the insert); it reads the kept counts now, and this spares a read
        transaction an ingest. It errs high while the trainer drains the queue."""
        recent = self._recent_depth
        now = time.monotonic()
        if recent is None or now - recent[0] > max_age_s:
            recent = (now, self.depth())
            self._recent_depth = recent
        return recent[1]

    @contextmanager
    def room(self, n: int, limit: int, max_age_s: float) -> Iterator[None]:
        """Admission under the queue's bound, around an enqueue of ``n`` texts: they go in only
        while the queue (depth_estimate(), and what this process is committing now) stays within
        ``limit``, else QueueFull. Callers in this process reserve their room in turn, so posts
        that arrive together cannot pass the bound between their check and their commit (130
        concurrent posts of 1,000 texts did: 132,119 queued against 100,000); API replicas on
        one database can pass it by what the others are committing at that moment."""
        with self._room:
            depth = self.depth_estimate(max_age_s) + self._reserved
            if n and depth + n > limit:
                raise QueueFull(depth, limit)
            self._reserved += n
        try:
            yield
        finally:
            with self._room:
                self._reserved -= n

    def claim_batch(
        self, max_samples: int, max_bytes: int, max_per_source: int | None = None, fence: int | None = None
    ) -> list[Sample]:
        """Move the oldest queued samples to ``training`` under a lease: at most max_samples, no
        more than max_bytes of UTF-8 text in all (the first sample is always taken, so nothing
        starves), and at most max_per_source from any one source (a flood from one sender cannot
        fill a batch; its surplus waits in the queue). ``fence``: the trainer lease's token (a
        trainer that lost the lease claims nothing: LeaseLost)."""
        cols = (
            SampleRow.id,
            SampleRow.seq,
            SampleRow.text,
            SampleRow.source,
            SampleRow.weight,
            SampleRow.status,
            SampleRow.reason,
            SampleRow.trained_in_version,
            SampleRow.created_at,
            SampleRow.text_hash,
            SampleRow.prompt_chars,
            SampleRow.retrain_of,
        )
        with self._db.write() as s:
            fenced(s, fence)
            scan = max_samples if max_per_source is None else max_samples * 4
            q = select(*cols).where(SampleRow.status == SampleStatus.queued.value).order_by(SampleRow.seq).limit(scan)
            if not self._db.is_sqlite:
                q = q.with_for_update(skip_locked=True)
            # Plain rows, not ORM objects: building an object per scanned row was 12% of a cycle.
            rows = s.execute(q).all()
            taken: list[Sample] = []
            per_source: Counter[str] = Counter()
            total = 0
            # A batch that a forget job sent back is claimed alone and whole (llmos/store/forget.py).
            group = rows[0].retrain_of if rows else None
            for row in rows:
                if len(taken) >= max_samples:
                    break
                if row.retrain_of != group:
                    continue
                key = row.source or ""
                if max_per_source is not None and per_source[key] >= max_per_source:
                    continue
                size = len(row.text.encode("utf-8"))
                if taken and total + size > max_bytes:
                    break
                taken.append(as_sample(row, SampleStatus.training))
                per_source[key] += 1
                total += size
            now = utcnow()
            ids = [t.id for t in taken]
            for start in range(0, len(ids), 500):
                s.execute(
                    update(SampleRow)
                    .where(SampleRow.id.in_(ids[start : start + 500]))
                    .values(status=SampleStatus.training.value, claimed_at=now)
                )
            add_counts(s, moves(SampleStatus.queued, SampleStatus.training, len(taken)))
            return taken

    def repeated(self, hashes: Iterable[str]) -> set[str]:
        """Those of ``hashes`` whose text the store holds more than once (queued, in training,
        trained or held out): a text a user posted again, which must train."""
        wanted = sorted(set(hashes))
        found: set[str] = set()
        with self._db.read() as s:
            for start in range(0, len(wanted), 500):
                rows = s.execute(
                    select(SampleRow.text_hash)
                    .where(SampleRow.text_hash.in_(wanted[start : start + 500]), SampleRow.status.in_(LIVE))
                    .group_by(SampleRow.text_hash)
                    .having(func.count() > 1)
                )
                found.update(h for (h,) in rows if h is not None)
        return found

    def requeue_heldout(self, hashes: Iterable[str], fence: int | None = None) -> int:
        """Held-out copies of these texts go back to the queue, to train: their text is trained now,
        so it no longer measures anything unseen."""
        wanted = sorted(set(hashes))
        n = 0
        with self._db.write() as s:
            fenced(s, fence)
            for start in range(0, len(wanted), 500):
                res = s.execute(
                    update(SampleRow)
                    .where(SampleRow.text_hash.in_(wanted[start : start + 500]))
                    .where(SampleRow.status == SampleStatus.heldout.value)
                    .values(status=SampleStatus.queued.value, claimed_at=None)
                )
                n += int(getattr(res, "rowcount", 0) or 0)
            add_counts(s, moves(SampleStatus.heldout, SampleStatus.queued, n))
        return n

    def heldout(self, limit: int) -> list[Sample]:
        """The most recent held-out samples, oldest first."""
        with self._db.read() as s:
            rows = s.scalars(
                select(SampleRow)
                .where(SampleRow.status == SampleStatus.heldout.value)
                .order_by(SampleRow.seq.desc())
                .limit(limit)
            ).all()
            return [as_sample(r) for r in reversed(rows)]
