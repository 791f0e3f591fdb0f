"""The checkpoint index: one row per version, and the active version, shared by every process
on this store. Only the registry (llmos.registry) calls this; it owns the files the rows name.
A trainer's writes here carry its lease's token (``fence``, llmos/store/lease.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from llmos.store.db import Database, upsert
from llmos.store.lease import LeaseLost, require_lease
from llmos.store.lineage import TextKind, add_rows
from llmos.store.notify import ACTIVE_CHANNEL, notify
from llmos.store.tables import (
    CheckpointRow,
    CheckpointStatus,
    MetaRow,
    PreferenceRow,
    SampleRow,
    SampleStatus,
    VersionTextRow,
    utcnow,
)

ACTIVE_KEY = "active_version"


@dataclass(frozen=True)
class CheckpointRecord:
    version: int
    parent_version: int | None
    status: CheckpointStatus
    path: str
    step: int
    samples_seen: int
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None
    # Why the files fail verification (set by the registry, not stored): such a version is never served.
    corrupt: str | None = None


def _record(row: CheckpointRow) -> CheckpointRecord:
    return CheckpointRecord(
        version=row.version,
        parent_version=row.parent_version,
        status=CheckpointStatus(row.status),
        path=row.path,
        step=row.step,
        samples_seen=row.samples_seen,
        metrics=dict(row.metrics or {}),
        created_at=row.created_at,
    )


def _learned_a_forgotten_text(s: Session, version: int, parent: int | None, new: bool = False) -> bool:
    """Whether ``version`` trained on an erased text, or on top of an erased version (a forget job
    committed while it was being trained or written); a ``new`` version (a promotion), also whether
    it trained on a preference a forget job deleted meanwhile (a correction's pair)."""
    if parent is not None and s.scalar(select(CheckpointRow.status).where(CheckpointRow.version == parent)) == (
        CheckpointStatus.erased.value
    ):
        return True
    if new:
        gone = (
            select(VersionTextRow.sample_id)
            .where(
                VersionTextRow.version == version,
                VersionTextRow.kind == TextKind.pref.value,
                ~exists().where(PreferenceRow.id == VersionTextRow.sample_id),
            )
            .limit(1)
        )
        if s.scalar(gone) is not None:
            return True
    erased = (
        select(VersionTextRow.sample_id)
        .join(SampleRow, SampleRow.id == VersionTextRow.sample_id)
        .where(VersionTextRow.version == version, SampleRow.status == SampleStatus.erased.value)
        .limit(1)
    )
    return s.scalar(erased) is not None


class CheckpointIndex:
    def __init__(self, db: Database) -> None:
        self._db = db

    def add_unless_there(self, rec: CheckpointRecord) -> None:
        """Record a version unless it is recorded already, by this process or another one that
        started beside it (two API replicas registering version 0 at once)."""
        try:
            self.add(rec)
        except IntegrityError:
            if self.get(rec.version, include_pruned=True) is None:
                raise

    def add(self, rec: CheckpointRecord, fence: int | None = None, texts: Mapping[str, TextKind] | None = None) -> None:
        """Record a version, with the ``texts`` that trained it (lineage); a trainer's (``fence``,
        its lease's token) only while it holds the trainer lease (LeaseLost otherwise, nothing
        recorded)."""
        with self._db.write() as s:
            if fence is not None:
                require_lease(s, fence)
            if texts:
                add_rows(s, rec.version, texts)
            row = CheckpointRow(
                version=rec.version,
                parent_version=rec.parent_version,
                status=rec.status.value,
                path=rec.path,
                step=rec.step,
                samples_seen=rec.samples_seen,
                metrics=rec.metrics,
                created_at=utcnow(),
            )
            s.add(row)
            if rec.version != 0 and _learned_a_forgotten_text(s, rec.version, rec.parent_version):
                row.status, row.pruned_at = CheckpointStatus.erased.value, utcnow()  # the scrub deletes its files

    def max_version(self) -> int | None:
        with self._db.read() as s:
            return s.scalar(select(func.max(CheckpointRow.version)))

    def get(self, version: int, include_pruned: bool = False) -> CheckpointRecord | None:
        with self._db.read() as s:
            row = s.get(CheckpointRow, version)
            if row is None or (row.pruned_at is not None and not include_pruned):
                return None
            return _record(row)

    def history(self, last: int) -> list[CheckpointRecord]:
        """The newest ``last`` checkpoints ever made, pruned ones included (their metrics stay),
        oldest first: the time series of how learning went."""
        with self._db.read() as s:
            rows = s.scalars(select(CheckpointRow).order_by(CheckpointRow.version.desc()).limit(last)).all()
            return [_record(r) for r in reversed(rows)]

    def list(self) -> list[CheckpointRecord]:
        """Live (unpruned) checkpoints, newest first."""
        with self._db.read() as s:
            rows = s.scalars(
                select(CheckpointRow).where(CheckpointRow.pruned_at.is_(None)).order_by(CheckpointRow.version.desc())
            ).all()
            return [_record(r) for r in rows]

    def erased(self) -> Sequence[CheckpointRecord]:
        """The erased versions (llmos/store/forget.py), whose files are to go."""
        with self._db.read() as s:
            rows = s.scalars(select(CheckpointRow).where(CheckpointRow.status == CheckpointStatus.erased.value))
            return [_record(r) for r in rows]

    def statuses(self, versions: Sequence[int]) -> dict[int, CheckpointStatus]:
        """The status of each of ``versions`` that is recorded (pruned ones too)."""
        if not versions:
            return {}
        with self._db.read() as s:
            rows = s.execute(
                select(CheckpointRow.version, CheckpointRow.status).where(CheckpointRow.version.in_(versions))
            )
            return {v: CheckpointStatus(st) for v, st in rows}

    def parents(self) -> dict[int, int | None]:
        with self._db.read() as s:
            return {v: p for v, p in s.execute(select(CheckpointRow.version, CheckpointRow.parent_version))}

    def set_status(self, version: int, status: CheckpointStatus) -> None:
        with self._db.write() as s:
            s.execute(update(CheckpointRow).where(CheckpointRow.version == version).values(status=status.value))

    def prune(self, keep_last: int) -> tuple[CheckpointRecord, ...]:
        """Mark all but the newest ``keep_last`` live versions pruned, version 0 and the active one
        excepted, and return them (their files are the registry's to delete). Refused versions
        count apart: the newest ``keep_last`` of them stay listed, whatever the others do. One
        transaction that holds the active row: a rollback in another process either lands first
        (and its version is kept) or finds its version pruned (and fails), never in between."""
        with self._db.write() as s:
            active = s.get(MetaRow, ACTIVE_KEY, with_for_update=True)
            rows = s.scalars(
                select(CheckpointRow).where(CheckpointRow.pruned_at.is_(None)).order_by(CheckpointRow.version.desc())
            ).all()
            refused = [r for r in rows if r.status == CheckpointStatus.rejected.value]
            servable = [r for r in rows if r.status != CheckpointStatus.rejected.value]
            keep = {0, int(active.value) if active else 0}
            keep |= {r.version for r in servable[:keep_last]} | {r.version for r in refused[:keep_last]}
            gone = [r for r in rows if r.version not in keep]
            for r in gone:
                r.pruned_at = utcnow()
            return tuple(_record(r) for r in gone)

    def active_version(self) -> int | None:
        with self._db.read() as s:
            row = s.get(MetaRow, ACTIVE_KEY)
            return int(row.value) if row else None

    def activate_unless_set(self, version: int) -> None:
        """Make ``version`` active unless a version is active already. Processes starting together
        on one empty store (two API replicas and a trainer) all call this: one inserts the row, the
        rest find it there. (``activate`` cannot: FOR UPDATE locks no row that does not exist yet,
        so two of them would both insert it.)"""
        with self._db.write() as s:
            stmt = upsert(s, MetaRow).values(key=ACTIVE_KEY, value=str(version))
            res = s.execute(stmt.on_conflict_do_nothing(index_elements=[MetaRow.key]))
            if getattr(res, "rowcount", 0):  # CursorResult; Result's stubs do not name it
                notify(s, self._db, ACTIVE_CHANNEL, str(version))

    def activate(
        self, version: int, expected: int | None = None, promote: bool = False, fence: int | None = None
    ) -> bool:
        """Make ``version`` active. With ``expected``, only if the active version is still that one
        (compare-and-set: a rollback in between wins over a trainer's promotion). With ``fence`` (a
        trainer's lease token), only if that trainer still holds the trainer lease: one paused past
        its lease and resumed promotes nothing. Returns whether it happened; never for a version
        that is not stored (or pruned)."""
        with self._db.write() as s:
            # The lease row first, then the active row: every writer that takes both takes them in
            # this order (PostgreSQL), and a takeover cannot land between the check and the set.
            if fence is not None:
                try:
                    require_lease(s, fence)
                except LeaseLost:
                    return False
            # FOR UPDATE: on PostgreSQL a plain read would let a promotion check a value that a
            # rollback is about to replace, then overwrite it. (SQLite's BEGIN IMMEDIATE serialises.)
            row = s.get(MetaRow, ACTIVE_KEY, with_for_update=True)
            if expected is not None and (row is None or int(row.value) != expected):
                return False
            target = s.get(CheckpointRow, version)
            if target is None or target.pruned_at is not None:
                return False  # pruned meanwhile (by another process): its files are going
            if _learned_a_forgotten_text(s, version, target.parent_version, promote):  # trained while a forget ran
                target.status, target.pruned_at = CheckpointStatus.erased.value, utcnow()
                return False
            if row is None:
                s.add(MetaRow(key=ACTIVE_KEY, value=str(version)))
            else:
                row.value = str(version)
            if promote:
                s.execute(
                    update(CheckpointRow)
                    .where(CheckpointRow.version == version)
                    .values(status=CheckpointStatus.promoted.value)
                )
            notify(s, self._db, ACTIVE_CHANNEL, str(version))  # replicas swap as this commits
            return True
