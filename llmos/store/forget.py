"""Forgetting on request: a text erased from the store, and from the model, as if never sent.

``ForgetJobs.start`` does the erasure in one transaction, which also holds the active version's
row (so that no promotion or rollback lands in between):

- the texts asked for (by id or source; the API finds ids by idempotency key) become tombstones: status ``erased``,
  the id, the hash and the source kept, the text gone; a text that feedback made (a correction,
  a thumbs up) goes with the generation it came from, that generation's feedback and the
  preferences made of it (the versions those trained are erased too);
- every version that a forgotten text trained (lineage, llmos/store/lineage.py: in its batch or
  replayed into it) and every descendant of one is ``erased``: never served, pinned or rolled
  back to again (its row is pruned; the scrub deletes its files);
- if the active version is among them, the store serves instead the newest of its ancestors that
  none of the texts influenced and whose files are still stored (the parent of the first version
  any of them trained, unless pruned);
- the other texts those versions were taught (their batches) go back to the queue, and the
  trainer trains them again on top of that version, through the gate as any text: the model ends
  as if the forgotten texts had never been sent. Texts only replayed into an erased version were
  taught by an ancestor that stays: they need nothing.

A promotion of a version whose lineage holds an erased text is refused (``CheckpointIndex.activate``):
the trainer may have trained one while the job ran. The scrub follows the transaction (``scrub``):
generations, feedback and preferences that contain a piece of a forgotten text (a completion that
recited it, the correction's pair) are deleted, the erased versions' files removed, and the
database made to drop the old bytes (llmos/store/db.py ``compact``). The job is durable: a process
killed before the scrub ends finds it undone at its next start and does it again.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from llmos.store.checkpoints import ACTIVE_KEY
from llmos.store.counts import Key, add_counts, count_key
from llmos.store.db import Database
from llmos.store.lineage import TextKind, influenced
from llmos.store.notify import ACTIVE_CHANNEL, notify
from llmos.store.tables import (
    CheckpointRow,
    CheckpointStatus,
    FeedbackRow,
    ForgetJobRow,
    GenerationRow,
    MetaRow,
    PreferenceRow,
    SampleRow,
    SampleStatus,
    VersionTextRow,
    utcnow,
)

CHUNK = 500  # ids per IN (...) clause
WINDOW = 16  # characters: a stored text holding this much of a forgotten one in a row is erased too
SETTLED = (SampleStatus.trained, SampleStatus.heldout, SampleStatus.rejected, SampleStatus.erased)


class UnknownTexts(LookupError):
    """Ids (or idempotency keys) that name no text."""

    def __init__(self, what: str, missing: Sequence[str]) -> None:
        shown = ", ".join(f"'{m[:64]}'" for m in missing[:5])
        super().__init__(
            f"no text with {what} {shown}" + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        )
        self.missing = list(missing)


@dataclass(frozen=True)
class ForgetRequest:
    ids: tuple[str, ...] = ()
    source: str | None = None

    def as_json(self) -> dict[str, object]:
        return {"ids": list(self.ids), "source": self.source}


@dataclass(frozen=True)
class ForgetJob:
    id: str
    created_at: datetime
    request: dict[str, object]
    forgotten: int
    rolled_back_to: int | None
    erased_versions: list[int]
    retrain: list[str] = field(repr=False)
    scrubbed_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Progress:
    retrained: int  # of the job's texts back in the queue, those trained again (or settled otherwise)
    retrain_total: int
    done: bool  # scrubbed and every text settled


def _job(row: ForgetJobRow) -> ForgetJob:
    return ForgetJob(
        row.id,
        row.created_at,
        dict(row.request),
        row.forgotten,
        row.rolled_back_to,
        list(row.erased_versions),
        list(row.retrain),
        row.scrubbed_at,
        row.finished_at,
    )


def windows(texts: Iterable[str]) -> set[str]:
    """Every run of WINDOW characters of ``texts`` (a shorter text: itself)."""
    out: set[str] = set()
    for t in texts:
        if len(t) <= WINDOW:
            if t.strip():
                out.add(t)
            continue
        out.update(t[i : i + WINDOW] for i in range(len(t) - WINDOW + 1))
    return out


def holds_a_piece(value: str | None, pieces: set[str]) -> bool:
    """Whether ``value`` holds one of ``pieces`` (windows(): WINDOW characters each, or a whole
    short text)."""
    if not value or not pieces:
        return False
    if any(len(p) < WINDOW and p in value for p in pieces):
        return True
    return any(value[i : i + WINDOW] in pieces for i in range(len(value) - WINDOW + 1))


class ForgetJobs:
    def __init__(self, db: Database) -> None:
        self._db = db

    # ---- the erasure ---------------------------------------------------------------------------
    def start(self, req: ForgetRequest) -> tuple[ForgetJob, list[str]]:
        """Erase what ``req`` names, in one transaction (see the module's docstring). Returns the
        job and the texts erased (the scrub looks for pieces of them elsewhere: they are nowhere
        in the store once this commits). Raises UnknownTexts for ids or keys that name nothing."""
        with self._db.write() as s:
            active_row = s.get(MetaRow, ACTIVE_KEY, with_for_update=True)  # promotions wait for this
            targets = self._targets(s, req)
            texts = [r.text for r in targets if r.status != SampleStatus.erased.value]
            ids = [r.id for r in targets]
            trained = self._versions_of(s, ids)
            trained |= self._drop_feedback_of(s, ids)
            rows = s.execute(select(CheckpointRow.version, CheckpointRow.parent_version, CheckpointRow.pruned_at))
            parents, pruned = {}, set()
            for v, p, gone in rows:
                parents[v] = p
                if gone is not None:
                    pruned.add(v)
            erased = [v for v in influenced(trained, parents) if v != 0]
            active = int(active_row.value) if active_row is not None else 0
            rolled_back_to = None
            if active in erased:
                target = parents.get(active)
                while target is not None and (target in erased or target in pruned):
                    target = parents.get(target)
                rolled_back_to = 0 if target is None else target
                assert active_row is not None
                active_row.value = str(rolled_back_to)
                notify(s, self._db, ACTIVE_CHANNEL, str(rolled_back_to))
            retrain = self._requeue_batches(s, erased, set(ids))
            self._erase_versions(s, erased)
            live = [r for r in targets if r.status != SampleStatus.erased.value]
            if live:
                self._drop_copies(s, windows(texts), min(r.created_at for r in live))
            forgotten = self._tombstone(s, targets)
            job = ForgetJobRow(
                id=str(uuid.uuid4()),
                created_at=utcnow(),
                request=req.as_json(),
                forgotten=forgotten,
                rolled_back_to=rolled_back_to,
                erased_versions=erased,
                retrain=retrain,
            )
            s.add(job)
            s.flush()
            return _job(job), texts

    def _targets(self, s: Session, req: ForgetRequest) -> list[SampleRow]:
        found: dict[str, SampleRow] = {}
        wanted = list(dict.fromkeys(req.ids))
        for start in range(0, len(wanted), CHUNK):
            for row in s.scalars(select(SampleRow).where(SampleRow.id.in_(wanted[start : start + CHUNK]))):
                found[row.id] = row
        missing = [v for v in wanted if v not in found]
        if missing:
            raise UnknownTexts("id", missing)
        if req.source is not None:
            for row in s.scalars(select(SampleRow).where(SampleRow.source == req.source)):
                found[row.id] = row
        if not self._db.is_sqlite and found:  # lock them: no trainer moves them meanwhile
            for start in range(0, len(found), CHUNK):
                chunk = list(found)[start : start + CHUNK]
                s.execute(select(SampleRow.id).where(SampleRow.id.in_(chunk)).with_for_update())
        return sorted(found.values(), key=lambda r: r.seq)

    def _versions_of(self, s: Session, ids: Sequence[str]) -> set[int]:
        out: set[int] = set()
        for start in range(0, len(ids), CHUNK):
            out.update(
                s.scalars(
                    select(VersionTextRow.version).where(VersionTextRow.sample_id.in_(ids[start : start + CHUNK]))
                )
            )
        return out

    def _drop_feedback_of(self, s: Session, ids: Sequence[str]) -> set[int]:
        """A forgotten text that feedback made (a correction: prompt + correction; a thumbs up:
        prompt + completion) came from a generation: that generation goes, with its feedback and
        the preferences made of it. Returns the versions those preferences trained."""
        generations: set[str] = set()
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            generations.update(s.scalars(select(FeedbackRow.generation_id).where(FeedbackRow.sample_id.in_(chunk))))
        gone = sorted(generations)
        versions: set[int] = set()
        for start in range(0, len(gone), CHUNK):
            chunk = gone[start : start + CHUNK]
            versions.update(
                v
                for v in s.scalars(
                    select(PreferenceRow.trained_in_version).where(
                        PreferenceRow.generation_id.in_(chunk), PreferenceRow.status == SampleStatus.trained.value
                    )
                )
                if v is not None
            )
            s.execute(delete(PreferenceRow).where(PreferenceRow.generation_id.in_(chunk)))
            s.execute(delete(FeedbackRow).where(FeedbackRow.generation_id.in_(chunk)))
            s.execute(delete(GenerationRow).where(GenerationRow.id.in_(chunk)))
        return versions

    def _requeue_batches(self, s: Session, erased: Sequence[int], forgotten: set[str]) -> list[str]:
        """The texts (and preferences) the erased versions were taught, back to the queue, in the
        order they came: they train again on top of the version served now."""
        if not erased:
            return []
        batch_of: dict[str, int] = {}  # sample id -> the erased version whose batch it was
        for start in range(0, len(erased), CHUNK):
            taught = s.execute(
                select(VersionTextRow.sample_id, VersionTextRow.version).where(
                    VersionTextRow.version.in_(erased[start : start + CHUNK]),
                    VersionTextRow.kind == TextKind.batch.value,
                )
            )
            for sid, v in taught:
                batch_of[sid] = min(v, batch_of.get(sid, v))
        ids = sorted(set(batch_of) - forgotten)
        back: list[tuple[int, str]] = []
        changes: Counter[Key] = Counter()
        for start in range(0, len(ids), CHUNK):
            rows = s.execute(
                select(SampleRow.seq, SampleRow.id).where(
                    SampleRow.id.in_(ids[start : start + CHUNK]), SampleRow.status == SampleStatus.trained.value
                )
            ).all()
            back += [(seq, sid) for seq, sid in rows]
            by_version: dict[int, list[str]] = {}
            for _, sid in rows:
                by_version.setdefault(batch_of[sid], []).append(sid)
            for v, group in by_version.items():  # each batch is claimed alone again, as it was
                s.execute(
                    update(SampleRow)
                    .where(SampleRow.id.in_(group))
                    .values(status=SampleStatus.queued.value, trained_in_version=None, claimed_at=None, retrain_of=v)
                )
        changes[count_key(SampleStatus.trained.value, None)] -= len(back)
        changes[count_key(SampleStatus.queued.value, None)] += len(back)
        add_counts(s, changes)
        s.execute(
            update(PreferenceRow)
            .where(PreferenceRow.trained_in_version.in_(erased), PreferenceRow.status == SampleStatus.trained.value)
            .values(status=SampleStatus.queued.value, trained_in_version=None, claimed_at=None)
        )
        return [sid for _, sid in sorted(back)]

    def _erase_versions(self, s: Session, erased: Sequence[int]) -> None:
        if erased:
            now = utcnow()
            s.execute(
                update(CheckpointRow)
                .where(CheckpointRow.version.in_(erased))
                .values(status=CheckpointStatus.erased.value, pruned_at=now)
            )

    def _drop_copies(self, s: Session, pieces: set[str], since: datetime, batch: int = 1000) -> None:
        """Delete the generations made since the first forgotten text came (a completion that
        recited one, a prompt that asked for it), and the feedback and preferences that hold a piece
        of one (a pair made of it). Generations go with their feedback and preferences."""
        tables: tuple[tuple[Any, tuple[str, ...]], ...] = (
            (GenerationRow, ("prompt", "completion")),
            (FeedbackRow, ("correction",)),
            (PreferenceRow, ("prompt", "chosen", "rejected")),
        )
        for table, columns in tables:
            after = ""
            while True:
                q = select(table).where(table.id > after, table.created_at >= since).order_by(table.id).limit(batch)
                rows = s.scalars(q).all()
                if not rows:
                    break
                after = rows[-1].id
                hit = [r.id for r in rows if any(holds_a_piece(getattr(r, c), pieces) for c in columns)]
                if not hit:
                    continue
                if table is GenerationRow:
                    s.execute(delete(PreferenceRow).where(PreferenceRow.generation_id.in_(hit)))
                    s.execute(delete(FeedbackRow).where(FeedbackRow.generation_id.in_(hit)))
                s.execute(delete(table).where(table.id.in_(hit)))

    def _tombstone(self, s: Session, targets: Sequence[SampleRow]) -> int:
        """The texts go; the id, the hash, the source and the key stay (a retry of the same post
        finds its tombstone instead of teaching the text again)."""
        live = [r for r in targets if r.status != SampleStatus.erased.value]
        changes: Counter[Key] = Counter()
        for r in live:
            changes[count_key(r.status, r.reason)] -= 1
            changes[count_key(SampleStatus.erased.value, None)] += 1
        ids = [r.id for r in live]
        for start in range(0, len(ids), CHUNK):
            s.execute(
                update(SampleRow)
                .where(SampleRow.id.in_(ids[start : start + CHUNK]))
                .values(
                    text="",
                    prompt_chars=None,
                    status=SampleStatus.erased.value,
                    reason="forgotten on request",
                    trained_in_version=None,
                    claimed_at=None,
                )
            )
        add_counts(s, changes)
        return len(live)

    # ---- after it ------------------------------------------------------------------------------
    def get(self, job_id: str) -> ForgetJob | None:
        with self._db.read() as s:
            row = s.get(ForgetJobRow, job_id)
            return _job(row) if row is not None else None

    def unscrubbed(self) -> list[ForgetJob]:
        with self._db.read() as s:
            rows = s.scalars(
                select(ForgetJobRow).where(ForgetJobRow.scrubbed_at.is_(None)).order_by(ForgetJobRow.created_at)
            ).all()
            return [_job(r) for r in rows]

    def mark_scrubbed(self, job_id: str) -> None:
        with self._db.write() as s:
            s.execute(update(ForgetJobRow).where(ForgetJobRow.id == job_id).values(scrubbed_at=utcnow()))

    def progress(self, job: ForgetJob) -> Progress:
        """How far the retraining has come; the first read that finds the job done records it."""
        settled = 0
        with self._db.read() as s:
            for start in range(0, len(job.retrain), CHUNK):
                settled += len(
                    s.scalars(
                        select(SampleRow.id).where(
                            SampleRow.id.in_(job.retrain[start : start + CHUNK]),
                            or_(*(SampleRow.status == st.value for st in SETTLED)),
                        )
                    ).all()
                )
        done = job.scrubbed_at is not None and settled == len(job.retrain)
        if done and job.finished_at is None:
            with self._db.write() as s:
                s.execute(
                    update(ForgetJobRow)
                    .where(ForgetJobRow.id == job.id, ForgetJobRow.finished_at.is_(None))
                    .values(finished_at=utcnow())
                )
        return Progress(settled, len(job.retrain), done)
