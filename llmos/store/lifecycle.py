"""How a row that a trainer claims moves between statuses, for each table that holds such rows
(samples, preferences): queued -> training (under a lease) -> trained, or held out, or rejected,
or back to queued. The sample and preference queues are this plus what is their own (enqueue and
claim), so the two cannot drift apart."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta

from sqlalchemy import update

from llmos.store.db import Database
from llmos.store.tables import PreferenceRow, SampleRow, SampleStatus, utcnow

CHUNK = 500  # ids per IN (...) clause


class Lifecycle:
    def __init__(self, db: Database, row: type[SampleRow] | type[PreferenceRow]) -> None:
        self._db = db
        self._row = row

    def ack(self, ids: Iterable[str], version: int) -> None:
        """These rows are in ``version``: trained."""
        self.move(ids, SampleStatus.trained, trained_in_version=version, reason=None)

    def mark_heldout(self, ids: Iterable[str]) -> None:
        self.move(ids, SampleStatus.heldout)

    def release(self, ids: Iterable[str]) -> None:
        """Give claimed rows back to the queue untouched (work abandoned)."""
        self.move(ids, SampleStatus.queued, only_from=SampleStatus.training)

    def requeue(self, ids: Iterable[str]) -> None:
        """Put rows back in the queue to be trained again (their version was not served)."""
        self.move(ids, SampleStatus.queued, trained_in_version=None)

    def move(
        self, ids: Iterable[str], status: SampleStatus, only_from: SampleStatus | None = None, **values: object
    ) -> None:
        """Move rows to ``status`` (their lease ends); ``only_from``: only those in that status."""
        row, id_list = self._row, list(ids)
        with self._db.write() as s:
            for start in range(0, len(id_list), CHUNK):
                stmt = update(row).where(row.id.in_(id_list[start : start + CHUNK]))
                if only_from is not None:
                    stmt = stmt.where(row.status == only_from.value)
                s.execute(stmt.values(status=status.value, claimed_at=None, **values))

    def reject(self, reasons: Mapping[str, str]) -> None:
        """Reject each row with its own reason."""
        row = self._row
        with self._db.write() as s:
            for rid, reason in reasons.items():
                s.execute(
                    update(row)
                    .where(row.id == rid)
                    .values(status=SampleStatus.rejected.value, reason=reason, claimed_at=None)
                )

    def renew(self, ids: Iterable[str]) -> None:
        """Extend the lease on rows still in training."""
        row, id_list = self._row, list(ids)
        with self._db.write() as s:
            for start in range(0, len(id_list), CHUNK):
                s.execute(
                    update(row)
                    .where(row.id.in_(id_list[start : start + CHUNK]))
                    .where(row.status == SampleStatus.training.value)
                    .values(claimed_at=utcnow())
                )

    def requeue_expired(self, lease_s: float) -> int:
        """Rows whose lease ran out (their trainer died or hung) go back to the queue."""
        row, cutoff = self._row, utcnow() - timedelta(seconds=lease_s)
        with self._db.write() as s:
            res = s.execute(
                update(row)
                .where(row.status == SampleStatus.training.value)
                .where(row.claimed_at < cutoff)
                .values(status=SampleStatus.queued.value, claimed_at=None)
            )
            return int(getattr(res, "rowcount", 0) or 0)

    def requeue_stale(self) -> int:
        """Every row left in training goes back to the queue (at start, after a crash)."""
        row = self._row
        with self._db.write() as s:
            res = s.execute(
                update(row)
                .where(row.status == SampleStatus.training.value)
                .values(status=SampleStatus.queued.value, claimed_at=None)
            )
            return int(getattr(res, "rowcount", 0) or 0)

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
            return int(getattr(res, "rowcount", 0) or 0)
