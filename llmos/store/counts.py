"""Samples by status, rejected ones by reason: counts the store keeps as it writes. Each write that
adds a sample or moves one adds its changes here in its own transaction, so the counts always
agree with the samples table, and reading them (every /metrics scrape, every depth check) costs
the same at ten rows as at ten million."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from llmos.store.db import upsert
from llmos.store.tables import SampleCountRow, SampleStatus

Key = tuple[str, str]  # (status, label): the label is a rejected sample's reason label, "" for the rest

REASON_LABELS = ("empty", "too_long", "optimizer", "gate", "other")


def reason_label(reason: str | None) -> str:
    """A rejection reason ('gate: held-out loss 2.31 > ...') as a label of bounded cardinality.
    The counts store these labels: changing the rule needs a migration that counts again."""
    head = (reason or "").split(":", 1)[0].strip().lower()
    if head.startswith("too long"):
        return "too_long"
    if head.startswith("empty"):
        return "empty"
    if head in ("gate", "optimizer"):
        return head
    return "other"


def count_key(status: str, reason: str | None) -> Key:
    return status, reason_label(reason) if status == SampleStatus.rejected.value else ""


def moves(src: SampleStatus, dst: SampleStatus, n: int) -> Counter[Key]:
    """The changes of ``n`` samples moving from ``src`` to ``dst`` (neither of them rejected)."""
    return Counter({count_key(src.value, None): -n, count_key(dst.value, None): n})


@dataclass(frozen=True)
class SampleCounts:
    by_status: Mapping[str, int]
    rejected_by_reason: Mapping[str, int]


def add_counts(session: Session, changes: Mapping[Key, int]) -> None:
    """Add ``changes`` to the counts within the caller's transaction: one upsert of n = n + d, which
    adds to what concurrent writers committed. Its rows come in key order, so two writers take
    their locks in one order (PostgreSQL) and cannot deadlock on them."""
    rows = [{"status": k[0], "label": k[1], "n": d} for k, d in sorted(changes.items()) if d]
    if not rows:
        return
    stmt = upsert(session, SampleCountRow).values(rows)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[SampleCountRow.status, SampleCountRow.label],
            set_={"n": SampleCountRow.n + stmt.excluded.n},
        )
    )


def read_counts(session: Session) -> SampleCounts:
    """The counts, without the statuses and labels no sample has now."""
    by_status: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    for status, label, n in session.execute(select(SampleCountRow.status, SampleCountRow.label, SampleCountRow.n)):
        if n == 0:
            continue
        by_status[status] += n
        if status == SampleStatus.rejected.value:
            rejected[label] += n
    return SampleCounts(dict(by_status), dict(rejected))
