"""The trainer lease: one trainer trains on a store at a time. A trainer takes the lease (the one
row of ``trainer_lease``), renews it while it works and gives it back when it stops; another
trainer on the same store waits as a standby and takes it once it runs out.

Fencing: the lease's token grows by one each time it is taken. A trainer passes its token with
every write it makes to the queues and the checkpoint index (their ``fence`` argument); the write
checks it in its own transaction, holding the lease row, and refuses a token that is no longer
the holder's. A trainer paused past its lease (SIGSTOP, a frozen VM) and then resumed therefore
claims, acknowledges, checkpoints and promotes nothing: its successor has the store.

Time is the database's clock (PostgreSQL's clock_timestamp(); on SQLite, the clock of the one
machine that has the file), in UTC: trainers on machines whose clocks disagree still agree on
when a lease runs out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from llmos.store.db import Database
from llmos.store.tables import TrainerLeaseRow

LEASE_NAME = "trainer"  # the row's key (migration 0005 makes it)


class LeaseLost(RuntimeError):
    """A write carried a fencing token that is no longer the lease holder's: another trainer took
    over (or this one gave the lease back). Nothing of the write was kept."""

    def __init__(self, token: int) -> None:
        super().__init__(f"the trainer lease (token {token}) is no longer held: another trainer has the store")
        self.token = token


@dataclass(frozen=True)
class LeaseState:
    holder: str | None  # None: free (never taken, or given back)
    token: int
    expires_at: datetime | None
    live: bool  # held and not run out, by the database's clock


def db_now(s: Session) -> datetime:
    """The database's clock, in UTC (a SQLite file has no clock of its own: its machine's)."""
    if s.get_bind().dialect.name == "sqlite":
        stamp = s.execute(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        return datetime.fromisoformat(stamp).replace(tzinfo=UTC)
    # clock_timestamp(), not now(): now() is when the transaction began, which for one that queued
    # on the lease row's lock can be long ago.
    stamp = s.execute(text("SELECT clock_timestamp()")).scalar_one()
    return stamp.astimezone(UTC)  # type: ignore[no-any-return]


def _lease_row(s: Session, share: bool) -> TrainerLeaseRow:
    # FOR UPDATE / FOR SHARE on PostgreSQL; SQLite ignores the clause (its writer holds the database).
    row = s.scalar(select(TrainerLeaseRow).where(TrainerLeaseRow.name == LEASE_NAME).with_for_update(read=share))
    if row is None:
        raise RuntimeError("the store has no trainer lease row (migration 0005 makes it)")
    return row


def _live(row: TrainerLeaseRow, now: datetime) -> bool:
    return row.holder is not None and row.expires_at is not None and row.expires_at > now


def require_lease(s: Session, token: int) -> None:
    """In the caller's (write) transaction: raise LeaseLost unless ``token`` is the holder's.

    The lease row stays locked until the caller commits (shared on PostgreSQL, so that the
    holder's own writes do not queue behind each other): a takeover waits for the write to land,
    or the write sees the takeover; never a write that lands after the next trainer took over.
    A lease that ran out but that nobody took is still its holder's: nobody wrote in between."""
    row = _lease_row(s, share=True)
    if row.holder is None or row.token != token:
        raise LeaseLost(token)


class TrainerLease:
    """Named operations on the trainer lease row; each one transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def acquire(self, holder: str, lease_s: float, dead: str | None = None) -> int | None:
        """Take the lease for ``lease_s`` seconds if it is free or ran out, or if ``dead`` holds it
        (a holder its caller knows to be gone); return its new token, or None while another
        holder's lease is live. A holder that asks again while it holds the lease keeps its token."""
        with self._db.write() as s:
            now = db_now(s)
            row = _lease_row(s, share=False)
            live = _live(row, now)
            if live and row.holder == holder:
                row.expires_at = now + timedelta(seconds=lease_s)
                return row.token
            if live and (dead is None or row.holder != dead):
                return None
            row.holder, row.token, row.expires_at = holder, row.token + 1, now + timedelta(seconds=lease_s)
            return row.token

    def renew(self, holder: str, token: int, lease_s: float) -> bool:
        """Extend the lease to ``lease_s`` seconds from now; False if it is no longer this holder's
        with this token (it was taken over, or given back)."""
        with self._db.write() as s:
            now = db_now(s)
            row = _lease_row(s, share=False)
            if row.holder != holder or row.token != token:
                return False
            row.expires_at = now + timedelta(seconds=lease_s)
            return True

    def release(self, holder: str, token: int) -> None:
        """Give the lease back (a standby takes it at once); nothing if it is no longer ours. The
        token stays: writes that still carry it are refused, since the lease is free."""
        with self._db.write() as s:
            row = _lease_row(s, share=False)
            if row.holder == holder and row.token == token:
                row.holder, row.expires_at = None, None

    def current(self) -> LeaseState:
        with self._db.read() as s:
            now = db_now(s)
            row = s.get(TrainerLeaseRow, LEASE_NAME)
            if row is None:
                raise RuntimeError("the store has no trainer lease row (migration 0005 makes it)")
            return LeaseState(row.holder, row.token, row.expires_at, _live(row, now))
