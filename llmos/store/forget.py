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
- the texts taught (their batches) by every version that leaves the served line, the erased ones
  and the pruned ones between them and the version now served, go back to the queue, and the
  trainer trains them again on top of that version, through the gate as any text: the model ends
  as if the forgotten texts had never been sent. Texts only replayed into an erased version were
  taught by an ancestor that stays: they need nothing; versions off the served line (rolled back
  from before) held nothing the served model holds: their texts stay as they are;
- generations, feedback and preferences that hold a copy of a forgotten text (``Copies``: a
  completion that recited it, a pair made of it) are deleted, a generation with its feedback
  and preferences.

A promotion of a version whose lineage holds an erased text, or whose parent is erased, is refused
(``CheckpointIndex.activate``): the trainer may have trained one while the job ran. The scrub
follows the transaction (daemon ``_scrub``): the erased versions' files removed, and the database
made to drop the old bytes (llmos/store/db.py ``compact``). The job is durable: a process killed
before the scrub ends finds it undone at its next start and does it again.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
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
WINDOW = 16  # characters of a forgotten text that a generation by a version that learned it recited (Copies)
MIN_SIGNS = 10  # letters and digits such a run holds at least: indentation or a rule of dashes is no evidence
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


def _collapsed(value: str) -> str:
    return " ".join(value.split())


class Copies:
    """What counts as a copy of the forgotten texts in a stored generation, feedback row or
    preference (whitespace collapsed everywhere):

    - the whole of a forgotten text, anywhere in the value; a text shorter than WINDOW only as the
      whole value ("ok" is inside countless others, "book" among them);
    - in a generation made by a version that learned one of them, a run of WINDOW characters of
      one, starting where a word starts and holding at least MIN_SIGNS letters or digits: a
      recitation. Only there: a phrase any text may hold ("Thank you for co") is no evidence in a
      generation by a model that never saw the text, nor in a user's own correction or pair.

    Word starts only, so the runs kept are about a fifth of the texts' characters."""

    def __init__(self, texts: Iterable[str]) -> None:
        collapsed = [c for c in (_collapsed(t) for t in texts) if c]
        self.short = {c for c in collapsed if len(c) < WINDOW}
        self._first: dict[str, list[str]] = {}  # a long text's first WINDOW characters -> the texts
        self._runs: set[str] = set()
        for c in collapsed:
            if len(c) < WINDOW:
                continue
            self._first.setdefault(c[:WINDOW], []).append(c)
            for i in range(len(c) - WINDOW + 1):
                if i == 0 or c[i - 1] == " ":
                    run = c[i : i + WINDOW]
                    if sum(ch.isalnum() for ch in run) >= MIN_SIGNS:
                        self._runs.add(run)

    def whole(self, value: str | None) -> bool:
        """Whether ``value`` holds a whole forgotten text."""
        if not value:
            return False
        v = _collapsed(value)
        if v in self.short:
            return True
        for i in range(len(v) - WINDOW + 1):
            for text in self._first.get(v[i : i + WINDOW], ()):
                if v.startswith(text, i):
                    return True
        return False

    def recited(self, value: str | None) -> bool:
        """Whether ``value`` holds a run of a forgotten text (see the class)."""
        if not value:
            return False
        v = _collapsed(value)
        return self.whole(v) or any(v[i : i + WINDOW] in self._runs for i in range(len(v) - WINDOW + 1))


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
            cols = (CheckpointRow.version, CheckpointRow.parent_version, CheckpointRow.pruned_at, CheckpointRow.status)
            rows = s.execute(select(*cols))
            parents, pruned, before = {}, set(), set()
            for v, p, gone, status in rows:
                parents[v] = p
                if gone is not None:
                    pruned.add(v)
                if status == CheckpointStatus.erased.value:
                    before.add(v)  # by an earlier job (a retry of it names them again)
            every = [v for v in influenced(trained, parents) if v != 0]
            erased = [v for v in every if v not in before]
            active = int(active_row.value) if active_row is not None else 0
            rolled_back_to, lost = None, []
            if active in erased:
                # Back to the newest ancestor not erased whose files are stored; every version
                # between (erased, or pruned) leaves the served line: its batch trains again.
                target: int | None = active
                while target is not None and (target in erased or target in pruned):
                    lost.append(target)
                    target = parents.get(target)
                rolled_back_to = 0 if target is None else target
                assert active_row is not None
                active_row.value = str(rolled_back_to)
                notify(s, self._db, ACTIVE_CHANNEL, str(rolled_back_to))
            live = [r for r in targets if r.status != SampleStatus.erased.value]
            if live:  # generations first, as a feedback post takes them (then the counts): no deadlock
                self._drop_copies(s, Copies(texts), min(r.created_at for r in live), set(every))
            retrain = self._requeue_batches(s, sorted(lost), set(ids))
            self._erase_versions(s, erased)
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
        # FOR UPDATE (PostgreSQL; SQLite's write transaction holds the file): no trainer moves them
        # between this read of their status and the tombstones.
        for start in range(0, len(wanted), CHUNK):
            q = select(SampleRow).where(SampleRow.id.in_(wanted[start : start + CHUNK])).with_for_update()
            for row in s.scalars(q):
                found[row.id] = row
        missing = [v for v in wanted if v not in found]
        if missing:
            raise UnknownTexts("id", missing)
        if req.source is not None:
            for row in s.scalars(select(SampleRow).where(SampleRow.source == req.source).with_for_update()):
                found[row.id] = row
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

    def _requeue_batches(self, s: Session, lost: Sequence[int], forgotten: set[str]) -> list[str]:
        """The texts (and preferences) the versions ``lost`` from the served line were taught, back
        to the queue, in the order they came: they train again on top of the version served now.
        Only those the lost versions hold now (a text trained again since, after an earlier job,
        is held by a version on the line: it stays)."""
        if not lost:
            return []
        held = set(lost)
        batch_of: dict[str, int] = {}  # sample id -> the lost version whose batch it was
        for start in range(0, len(lost), CHUNK):
            taught = s.execute(
                select(VersionTextRow.sample_id, VersionTextRow.version).where(
                    VersionTextRow.version.in_(lost[start : start + CHUNK]),
                    VersionTextRow.kind == TextKind.batch.value,
                )
            )
            for sid, v in taught:
                batch_of[sid] = min(v, batch_of.get(sid, v))
        ids = sorted(set(batch_of) - forgotten)
        back: list[tuple[int, str]] = []
        for start in range(0, len(ids), CHUNK):
            rows = s.execute(
                select(SampleRow.seq, SampleRow.id, SampleRow.trained_in_version)
                .where(SampleRow.id.in_(ids[start : start + CHUNK]), SampleRow.status == SampleStatus.trained.value)
                .with_for_update()
            ).all()
            by_version: dict[int, list[str]] = {}
            for seq, sid, version in rows:
                if version in held:
                    by_version.setdefault(batch_of[sid], []).append(sid)
                    back.append((seq, sid))
            for v, group in by_version.items():  # each batch is claimed alone again, as it was
                s.execute(
                    update(SampleRow)
                    .where(SampleRow.id.in_(group), SampleRow.status == SampleStatus.trained.value)
                    .values(status=SampleStatus.queued.value, trained_in_version=None, claimed_at=None, retrain_of=v)
                )
        changes: Counter[Key] = Counter()
        changes[count_key(SampleStatus.trained.value, None)] -= len(back)
        changes[count_key(SampleStatus.queued.value, None)] += len(back)
        add_counts(s, changes)
        for start in range(0, len(lost), CHUNK):
            s.execute(
                update(PreferenceRow)
                .where(
                    PreferenceRow.trained_in_version.in_(lost[start : start + CHUNK]),
                    PreferenceRow.status == SampleStatus.trained.value,
                )
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

    def _drop_copies(self, s: Session, copies: Copies, since: datetime, learned: set[int], batch: int = 1000) -> None:
        """Delete what holds a copy of a forgotten text (``Copies``) among what came since the first
        of them: generations (a completion that recited one, by a version in ``learned``, or a
        prompt and completion that hold one whole) with their feedback and preferences, and
        feedback and preferences that hold one whole (a pair made of it)."""

        def generation(r: GenerationRow) -> bool:
            both = f"{r.prompt}{r.completion}"
            return copies.recited(both) if r.model_version in learned else copies.whole(both)

        tables: tuple[tuple[Any, Callable[[Any], bool]], ...] = (
            (GenerationRow, generation),
            (FeedbackRow, lambda r: copies.whole(r.correction)),
            (PreferenceRow, lambda r: copies.whole(f"{r.prompt}{r.chosen}") or copies.whole(f"{r.prompt}{r.rejected}")),
        )
        for table, holds in tables:
            after = ""
            while True:
                q = select(table).where(table.id > after, table.created_at >= since).order_by(table.id).limit(batch)
                rows = s.scalars(q).all()
                if not rows:
                    break
                after = rows[-1].id
                hit = [r.id for r in rows if holds(r)]
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
