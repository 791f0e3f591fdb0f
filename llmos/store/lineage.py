"""Lineage: which texts trained which version.

Every version the trainer records (promoted, or refused by the gate) is written with the ids of
the texts that trained it, in the same transaction as its checkpoint row: its own batch (the texts
it was made to learn) and the texts replayed into it from the replay pool. Its parent is in the
checkpoint row. A version's weights carry everything its ancestors learned, so a text influenced
the versions it trained and every descendant of them (``influenced``): what forgetting a text has
to undo. Rows stay when a version's files are pruned; texts held out for evaluation never train and
have none.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from llmos.store.db import Database
from llmos.store.tables import VersionTextRow


class TextKind(enum.StrEnum):
    batch = "batch"  # in the version's own batch: it was taught then
    replay = "replay"  # replayed into the version from the pool of texts trained before
    pref = "pref"  # a preference (its id) the version trained on: what a promotion checks, not shown


TEXTS = (TextKind.batch.value, TextKind.replay.value)  # the kinds of rows that name samples


@dataclass(frozen=True)
class VersionTexts:
    version: int
    batch: int  # how many texts of its own batch
    replay: int  # how many replayed
    texts: list[tuple[str, TextKind]]  # (sample id, kind), the page asked for, batch first


def add_rows(s: Session, version: int, texts: Mapping[str, TextKind]) -> None:
    """Record in ``s`` (the checkpoint row's transaction) the texts that trained ``version``."""
    s.add_all(VersionTextRow(version=version, sample_id=sid, kind=kind.value) for sid, kind in texts.items())


def influenced(trained: set[int], parents: Mapping[int, int | None]) -> list[int]:
    """The versions in ``trained`` and every descendant of one of them, ascending (a version's
    number is above its parent's, so one ascending pass finds them all)."""
    out: set[int] = set()
    for v in sorted(parents):
        p = parents[v]
        if v in trained or (p is not None and p in out):
            out.add(v)
    return sorted(out)


class Lineage:
    """Reads of the lineage rows; they are written with checkpoints (CheckpointIndex.add)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def of_text(self, sample_id: str) -> list[tuple[int, TextKind]]:
        """The versions ``sample_id`` trained, oldest first, each with how."""
        with self._db.read() as s:
            rows = s.execute(
                select(VersionTextRow.version, VersionTextRow.kind)
                .where(VersionTextRow.sample_id == sample_id, VersionTextRow.kind.in_(TEXTS))
                .order_by(VersionTextRow.version)
            ).all()
            return [(v, TextKind(k)) for v, k in rows]

    def of_version(self, version: int, limit: int, offset: int = 0) -> VersionTexts:
        """The texts that trained ``version``: counts, and a page of ids (its batch first)."""
        with self._db.read() as s:
            counts = dict(
                s.execute(
                    select(VersionTextRow.kind, func.count())
                    .where(VersionTextRow.version == version, VersionTextRow.kind.in_(TEXTS))
                    .group_by(VersionTextRow.kind)
                ).all()
            )
            rows = s.execute(
                select(VersionTextRow.sample_id, VersionTextRow.kind)
                .where(VersionTextRow.version == version, VersionTextRow.kind.in_(TEXTS))
                .order_by(VersionTextRow.kind, VersionTextRow.sample_id)  # "batch" sorts before "replay"
                .limit(limit)
                .offset(offset)
            ).all()
        return VersionTexts(
            version,
            int(counts.get(TextKind.batch.value, 0)),
            int(counts.get(TextKind.replay.value, 0)),
            [(sid, TextKind(k)) for sid, k in rows],
        )

    def counts(self, versions: list[int]) -> dict[int, tuple[int, int]]:
        """For each of ``versions``: (texts of its batch, texts replayed)."""
        out = {v: (0, 0) for v in versions}
        if not versions:
            return out
        with self._db.read() as s:
            rows = s.execute(
                select(VersionTextRow.version, VersionTextRow.kind, func.count())
                .where(VersionTextRow.version.in_(versions), VersionTextRow.kind.in_(TEXTS))
                .group_by(VersionTextRow.version, VersionTextRow.kind)
            ).all()
        for v, kind, n in rows:
            batch, replay = out[v]
            out[v] = (int(n), replay) if kind == TextKind.batch.value else (batch, int(n))
        return out
