"""The audit log of admin actions: who (a credential's fingerprint, never the secret), what, when,
and how it ended. Rows are only ever added; the admin API reads them newest first."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from llmos.store.db import Database
from llmos.store.tables import AuditRow, utcnow


class AuditOutcome(enum.StrEnum):
    ok = "ok"  # the action happened
    refused = "refused"  # answered with a 4xx (unknown version, corrupt checkpoint, ...): nothing changed
    error = "error"  # failed unexpectedly (5xx)


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    outcome: AuditOutcome
    status_code: int
    params: dict[str, Any] = field(default_factory=dict)
    detail: str | None = None


def _entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        at=row.at,
        actor=row.actor,
        action=row.action,
        outcome=AuditOutcome(row.outcome),
        status_code=row.status_code,
        params=dict(row.params or {}),
        detail=row.detail,
    )


class AuditLog:
    def __init__(self, db: Database) -> None:
        self._db = db

    def record(
        self,
        actor: str,
        action: str,
        outcome: AuditOutcome,
        status_code: int,
        params: dict[str, Any] | None = None,
        detail: str | None = None,
    ) -> AuditEntry:
        """Add one entry (committed durably when this returns)."""
        with self._db.write() as s:
            row = AuditRow(
                at=utcnow(),
                actor=actor[:64],
                action=action[:64],
                params=params or {},
                outcome=outcome.value,
                status_code=status_code,
                detail=None if detail is None else detail[:2000],
            )
            s.add(row)
            s.flush()
            return _entry(row)

    def list(self, limit: int = 100, before: int | None = None) -> list[AuditEntry]:
        """Newest first; ``before`` (an entry id) pages back through older entries."""
        with self._db.read() as s:
            q = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
            if before is not None:
                q = q.where(AuditRow.id < before)
            return [_entry(r) for r in s.scalars(q).all()]
