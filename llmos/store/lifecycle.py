"""How a row that a trainer claims moves between statuses, for each table that holds such rows
(samples, preferences): queued -> training (under a lease) -> trained, or held out, or rejected,
or back to queued. The sample and preference queues are this plus what is their own (enqueue and
claim), so the two cannot drift apart. Each move of samples also moves their counts
(llmos/store/counts.py), in the same transaction.

A trainer passes its lease's token with each move (``fence``): the move is refused (LeaseLost,
nothing written) once another trainer holds the store (llmos/store/lease.py). ``fence=None``: a
move that is not a trainer's (an admin's rollback)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import cast

from sqlalchemy import Row, select, update
from sqlalchemy.orm import Session

from llmos.store.counts import Key, add_counts, count_key, moves
from llmos.store.db import Database
from llmos.store.lease import require_lease
from llmos.store.tables import PreferenceRow, SampleRow, SampleStatus, utcnow

CHUNK = 500  # ids per IN (...) clause


def fenced(s: Session, fence: int | None) -> None:
    """A trainer's write: refused (LeaseLost) unless ``fence`` is still the trainer lease's token."""
    if fence is not None:
        require_lease(s, fence)


class Lifecycle:
    def __init__(self, db: Database, row: type[SampleRow] | type[PreferenceRow]) -> None:
        self._db = db
        self._row = row
        self._counted = row is SampleRow  # the counts are of samples only

    def ack(self, ids: Iterable[str], version: int, fence: int | None = None) -> None:
        """These rows are in ``version``: trained."""
        self.move(ids, SampleStatus.trained, fence=fence, trained_in_version=version, reason=None)

    def mark_heldout(self, ids: Iterable[str], fence: int | None = None) -> None:
        self.move(ids, SampleStatus.heldout, fence=fence)

    def release(self, ids: Iterable[str], fence: int | None = None) -> None:
        """Give claimed rows back to the queue untouched (work abandoned)."""
        self.move(ids, SampleStatus.queued, only_from=SampleStatus.training, fence=fence)

    def requeue(self, ids: Iterable[str], fence: int | None = None) -> None:
        """Put rows back in the queue to be trained again (their version was not served)."""
        self.move(ids, SampleStatus.queued, fence=fence, trained_in_version=None)

    def move(
        self,
        ids: Iterable[str],
        status: SampleStatus,
        only_from: SampleStatus | None = None,
        fence: int | None = None,
        **values: object,
    ) -> None:
        """Move rows to ``status`` (their lease ends); ``only_from``: only those in that status."""
        row, id_list = self._row, sorted(set(ids))
        reason = cast(str | None, values.get("reason"))  # what they are counted by, if it changes
        with self._db.write() as s:
            fenced(s, fence)
            changes: Counter[Key] = Counter()
            for start in range(0, len(id_list), CHUNK):
                was = self._lock(s, id_list[start : start + CHUNK], only_from)
                if not was:
                    continue
                s.execute(
                    update(row)
                    .where(row.id.in_([r.id for r in was]))
                    .values(status=status.value, claimed_at=None, **values)
                )
                for r in was:
                    changes[count_key(r.status, r.reason)] -= 1
                    changes[count_key(status.value, reason if "reason" in values else r.reason)] += 1
            self._count(s, changes)

    def reject(self, reasons: Mapping[str, str], fence: int | None = None) -> None:
        """Reject each row with its own reason."""
        row, id_list = self._row, sorted(reasons)
        with self._db.write() as s:
            fenced(s, fence)
            changes: Counter[Key] = Counter()
            for start in range(0, len(id_list), CHUNK):
                for r in self._lock(s, id_list[start : start + CHUNK]):
                    why = reasons[r.id]
                    s.execute(
                        update(row)
                        .where(row.id == r.id)
                        .values(status=SampleStatus.rejected.value, reason=why, claimed_at=None)
                    )
                    changes[count_key(r.status, r.reason)] -= 1
                    changes[count_key(SampleStatus.rejected.value, why)] += 1
            self._count(s, changes)

    def renew(self, ids: Iterable[str], fence: int | None = None) -> None:
        """Extend the lease on rows still in training."""
        row, id_list = self._row, list(ids)
        with self._db.write() as s:
            fenced(s, fence)
            for start in range(0, len(id_list), CHUNK):
                s.execute(
                    update(row)
                    .where(row.id.in_(id_list[start : start + CHUNK]))
                    .where(row.status == SampleStatus.training.value)
                    .values(claimed_at=utcnow())
                )

    def requeue_expired(self, lease_s: float, fence: int | None = None) -> int:
        """Rows whose lease ran out (their trainer died or hung) go back to the queue."""
        row, cutoff = self._row, utcnow() - timedelta(seconds=lease_s)
        with self._db.write() as s:
            fenced(s, fence)
            res = s.execute(
                update(row)
                .where(row.status == SampleStatus.training.value)
                .where(row.claimed_at < cutoff)
                .values(status=SampleStatus.queued.value, claimed_at=None)
            )
            n = int(getattr(res, "rowcount", 0) or 0)
            self._count(s, moves(SampleStatus.training, SampleStatus.queued, n))
            return n

    def requeue_stale(self, fence: int | None = None) -> int:
        """Every row left in training goes back to the queue: what an earlier trainer held, when
        the next one takes the trainer lease (after a crash, a restart, or a takeover)."""
        row = self._row
        with self._db.write() as s:
            fenced(s, fence)
            res = s.execute(
                update(row)
                .where(row.status == SampleStatus.training.value)
                .values(status=SampleStatus.queued.value, claimed_at=None)
            )
            n = int(getattr(res, "rowcount", 0) or 0)
            self._count(s, moves(SampleStatus.training, SampleStatus.queued, n))
            return n

    def requeue_outside(self, lineage: set[int]) -> int:
        """Trained rows whose version is not in ``lineage`` (a rollback abandoned it) go back to the queue."""
        row = self._row
        with self._db.write() as s:
            res = s.execute(
                update(row)
                .where(row.status == SampleStatus.trained.value)
                .where(row.trained_in_version.not_in(lineage))
                .values(status=SampleStatus.queued.value, trained_in_version=None, claimed_at=None)
            )
            n = int(getattr(res, "rowcount", 0) or 0)
            self._count(s, moves(SampleStatus.trained, SampleStatus.queued, n))
            return n

    def _lock(
        self, s: Session, ids: Sequence[str], only_from: SampleStatus | None = None
    ) -> Sequence[Row[str, str, str | None]]:
        """The rows of ``ids`` (of those, the ones in ``only_from``) with the status and reason they
        had, which their counts lose; locked (PostgreSQL; a SQLite writer holds the whole database)
        so that no other writer moves them before this transaction does."""
        row = self._row
        # A forgotten text stays forgotten: no move (a trainer's ack or requeue of what it held) revives it.
        q = (
            select(row.id, row.status, row.reason)
            .where(row.id.in_(ids), row.status != SampleStatus.erased.value)
            .order_by(row.id)
        )
        if only_from is not None:
            q = q.where(row.status == only_from.value)
        if not self._db.is_sqlite:
            q = q.with_for_update()
        return s.execute(q).all()

    def _count(self, s: Session, changes: Mapping[Key, int]) -> None:
        if self._counted:
            add_counts(s, changes)
