"""The store, one operation at a time, on every backend the ``db`` fixture gives (SQLite always,
PostgreSQL when LLMOS_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import reads_samples, sql_of
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.exc import StatementError

from llmos.store import generations as generations_module
from llmos.store.checkpoints import ACTIVE_KEY, CheckpointIndex, CheckpointRecord
from llmos.store.counts import SampleCounts, reason_label
from llmos.store.db import Database
from llmos.store.generations import GenerationLog, UnknownGeneration
from llmos.store.preferences import PreferenceQueue
from llmos.store.queue import IdempotencyConflict, NewSample, SampleQueue, time_ordered_ids
from llmos.store.tables import CheckpointStatus, FeedbackRow, MetaRow, SampleRow, SampleStatus, utcnow
from llmos.text import text_hash


@pytest.fixture
def queue(db: Database) -> SampleQueue:
    return SampleQueue(db)


def enqueue_each(queue: SampleQueue, texts: list[str]) -> list[str]:
    """One enqueue call per text, so arrival order is unambiguous."""
    return [queue.enqueue([NewSample(t)])[0] for t in texts]


def statuses(queue: SampleQueue, ids: list[str]) -> list[SampleStatus]:
    out = []
    for sid in ids:
        s = queue.get(sid)
        assert s is not None, sid
        out.append(s.status)
    return out


def count_rows(db: Database, *where: ColumnElement[bool]) -> int:
    with db.read() as s:
        return int(s.scalar(select(func.count()).select_from(SampleRow).where(*where)) or 0)


# ---- enqueue / get / depth ------------------------------------------------------------------


def test_enqueue_returns_ids_of_readable_queued_rows(queue: SampleQueue) -> None:
    ids = queue.enqueue([NewSample("alpha", source="wiki", weight=0.5), NewSample("βήτα 中文 🙂")])

    assert len(ids) == 2 and len(set(ids)) == 2
    a, b = queue.get(ids[0]), queue.get(ids[1])
    assert a is not None and b is not None
    assert (a.id, a.text, a.source, a.weight) == (ids[0], "alpha", "wiki", 0.5)
    assert (b.text, b.source, b.weight) == ("βήτα 中文 🙂", None, 1.0)
    for s in (a, b):
        assert s.status is SampleStatus.queued
        assert s.reason is None and s.trained_in_version is None
        assert s.created_at.tzinfo is not None
        assert abs((datetime.now(UTC) - s.created_at).total_seconds()) < 60
    assert a.seq < b.seq
    assert queue.get("00000000-0000-0000-0000-000000000000") is None


def test_ids_are_uuid7_in_the_order_texts_arrive() -> None:
    """Time-ordered ids land at the end of the id index (random uuid4s land all over it)."""
    first = time_ordered_ids(1000)
    time.sleep(0.002)
    later = time_ordered_ids(3)
    ids = [uuid.UUID(i) for i in first + later]
    assert len(set(ids)) == 1003
    assert all(
        u.version == 7 and u.variant == uuid.RFC_4122 and str(u) == s for u, s in zip(ids, first + later, strict=True)
    )
    assert max(first) < min(later)
    assert abs(int(first[0].replace("-", "")[:12], 16) / 1000 - time.time()) < 60  # the timestamp is now


def test_idempotency_key_maps_to_one_row_within_and_across_calls(queue: SampleQueue, db: Database) -> None:
    first = queue.enqueue(
        [
            NewSample("a", idempotency_key="k1"),
            NewSample("a", idempotency_key="k1"),  # repeated inside one call
            NewSample("c", idempotency_key="k2"),
        ]
    )
    assert first[0] == first[1] != first[2]
    assert queue.depth() == 2

    again = queue.enqueue(
        [NewSample("c", idempotency_key="k2"), NewSample("a", idempotency_key="k1"), NewSample("new")]
    )
    assert again[:2] == [first[2], first[0]]
    assert again[2] not in first
    assert queue.depth() == 3
    assert count_rows(db) == 3


def test_an_idempotency_key_reused_with_another_text_is_a_conflict_and_writes_nothing(
    queue: SampleQueue, db: Database
) -> None:
    first = queue.enqueue([NewSample("c", idempotency_key="k2")])
    with pytest.raises(IdempotencyConflict):
        queue.enqueue([NewSample("other", idempotency_key="k3"), NewSample("c changed", idempotency_key="k2")])
    with pytest.raises(IdempotencyConflict):  # inside one call too
        queue.enqueue([NewSample("x", idempotency_key="k4"), NewSample("y", idempotency_key="k4")])
    assert count_rows(db) == 1
    c = queue.get(first[0])
    assert c is not None and c.text == "c"  # the first write stands


def test_idempotency_key_raced_by_many_writers_stores_one_row(queue: SampleQueue, db: Database) -> None:
    barrier = threading.Barrier(6)
    results: list[str] = []
    errors: list[BaseException] = []

    def post() -> None:
        try:
            barrier.wait()
            results.extend(queue.enqueue([NewSample("same request", idempotency_key="retry-42")]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert errors == []
    assert len(results) == 6 and len(set(results)) == 1
    assert count_rows(db, SampleRow.idempotency_key == "retry-42") == 1


def test_depth_counts_only_queued_samples(queue: SampleQueue) -> None:
    assert queue.depth() == 0
    ids = enqueue_each(queue, ["a", "b", "c", "d"])
    assert queue.depth() == 4
    queue.claim_batch(max_samples=2, max_bytes=1000)
    assert queue.depth() == 2
    queue.mark_heldout(ids[2:3])
    assert queue.depth() == 1


# ---- claim_batch ------------------------------------------------------------------------------


def test_claim_batch_takes_oldest_first_and_never_twice(queue: SampleQueue) -> None:
    ids = enqueue_each(queue, ["s0", "s1"]) + queue.enqueue([NewSample("s2"), NewSample("s3"), NewSample("s4")])

    first = queue.claim_batch(max_samples=3, max_bytes=10_000)
    assert [s.id for s in first] == ids[:3]
    assert [s.text for s in first] == ["s0", "s1", "s2"]
    assert all(s.status is SampleStatus.training for s in first)
    assert statuses(queue, ids) == [SampleStatus.training] * 3 + [SampleStatus.queued] * 2

    second = queue.claim_batch(max_samples=10, max_bytes=10_000)
    assert [s.id for s in second] == ids[3:]
    assert queue.claim_batch(max_samples=10, max_bytes=10_000) == []
    assert queue.depth() == 0


def test_claim_batch_byte_budget_counts_utf8_and_always_takes_the_first(queue: SampleQueue) -> None:
    # 20, 5, 5 and 1 bytes of UTF-8 (the first is 10 characters but 20 bytes).
    ids = enqueue_each(queue, ["é" * 10, "x" * 5, "y" * 5, "z"])
    got = queue.claim_batch(max_samples=10, max_bytes=30)
    assert [s.id for s in got] == ids[:3]  # 20 + 5 + 5 = 30 fits; the 1-byte one would exceed
    assert statuses(queue, ids[3:]) == [SampleStatus.queued]

    big = enqueue_each(queue, ["w" * 100, "v"])
    alone = queue.claim_batch(max_samples=10, max_bytes=10)
    assert [s.id for s in alone] == [ids[3]]  # the 1-byte head fits; the 100-byte one does not
    alone = queue.claim_batch(max_samples=10, max_bytes=10)
    assert [s.id for s in alone] == [big[0]]  # over budget on its own, yet taken: nothing starves
    assert [s.id for s in queue.claim_batch(max_samples=10, max_bytes=10)] == [big[1]]


# ---- settling claimed samples ---------------------------------------------------------------


def test_ack_marks_trained_in_version(queue: SampleQueue) -> None:
    ids = enqueue_each(queue, ["a", "b", "c"])
    queue.claim_batch(10, 10_000)
    queue.ack(ids[:2], version=7)

    for sid in ids[:2]:
        s = queue.get(sid)
        assert s is not None
        assert (s.status, s.trained_in_version, s.reason) == (SampleStatus.trained, 7, None)
    assert statuses(queue, ids[2:]) == [SampleStatus.training]


def test_reject_stores_each_samples_reason(queue: SampleQueue) -> None:
    ids = enqueue_each(queue, ["a", "b", "c"])
    queue.claim_batch(10, 10_000)
    queue.reject({ids[0]: "too long: 9000 tokens", ids[1]: "gate: held-out loss worse"})

    got = [queue.get(i) for i in ids]
    assert [(s.status, s.reason) for s in got if s] == [
        (SampleStatus.rejected, "too long: 9000 tokens"),
        (SampleStatus.rejected, "gate: held-out loss worse"),
        (SampleStatus.training, None),
    ]


def test_release_only_returns_training_samples_to_the_queue(queue: SampleQueue) -> None:
    ids = enqueue_each(queue, ["trained", "rejected", "claimed", "queued"])
    queue.claim_batch(max_samples=3, max_bytes=10_000)
    queue.ack([ids[0]], version=1)
    queue.reject({ids[1]: "bad"})

    queue.release(ids)  # every id, whatever its state

    assert statuses(queue, ids) == [
        SampleStatus.trained,
        SampleStatus.rejected,
        SampleStatus.queued,
        SampleStatus.queued,
    ]
    t = queue.get(ids[0])
    assert t is not None and t.trained_in_version == 1
    # Released samples keep their place: the oldest is claimed first again.
    assert [s.id for s in queue.claim_batch(10, 10_000)] == ids[2:]


def test_requeue_stale_recovers_claims_of_a_crashed_process(db_url: str, db: Database) -> None:
    dead = SampleQueue(db)
    ids = enqueue_each(dead, ["a", "b", "c", "d", "e"])
    dead.claim_batch(max_samples=4, max_bytes=10_000)
    dead.ack([ids[0]], version=3)
    dead.reject({ids[1]: "bad"})
    # ids[2], ids[3] stay in `training`: the process dies here.

    restarted = Database(db_url)
    try:
        queue = SampleQueue(restarted)
        assert queue.requeue_stale() == 2
        assert statuses(queue, ids) == [
            SampleStatus.trained,
            SampleStatus.rejected,
            SampleStatus.queued,
            SampleStatus.queued,
            SampleStatus.queued,
        ]
        assert [s.id for s in queue.claim_batch(10, 10_000)] == ids[2:]
        assert queue.requeue_stale() == 3
        assert queue.requeue_stale() == 0
    finally:
        restarted.dispose()


def test_requeue_outside_lineage_requeues_only_abandoned_versions(queue: SampleQueue) -> None:
    ids = enqueue_each(queue, ["in v1", "in v2", "in v3", "claimed", "rejected", "queued"])
    queue.claim_batch(max_samples=5, max_bytes=10_000)
    queue.ack([ids[0]], 1)
    queue.ack([ids[1]], 2)
    queue.ack([ids[2]], 3)
    queue.reject({ids[4]: "bad"})

    # Rolled back to v3, whose ancestors are 1 and 0: v2 was a side branch.
    assert queue.requeue_outside({0, 1, 3}) == 1

    got = [queue.get(i) for i in ids]
    assert [(s.status, s.trained_in_version) for s in got if s] == [
        (SampleStatus.trained, 1),
        (SampleStatus.queued, None),
        (SampleStatus.trained, 3),
        (SampleStatus.training, None),
        (SampleStatus.rejected, None),
        (SampleStatus.queued, None),
    ]
    assert queue.requeue_outside({0, 1, 3}) == 0
    assert queue.requeue_outside({0}) == 2  # back to the base model: everything trained goes again


def test_heldout_returns_the_most_recent_oldest_first(queue: SampleQueue) -> None:
    ids = enqueue_each(queue, [f"h{i}" for i in range(6)])
    queue.claim_batch(10, 10_000)
    queue.mark_heldout(ids[:5])
    queue.ack([ids[5]], 1)

    assert [s.id for s in queue.heldout(3)] == ids[2:5]
    assert [s.id for s in queue.heldout(100)] == ids[:5]
    assert all(s.status is SampleStatus.heldout for s in queue.heldout(100))


# ---- generations and feedback ---------------------------------------------------------------


def test_generation_record_and_get(db: Database) -> None:
    log = GenerationLog(db)
    params = {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "seed": 5}
    gid = log.record("Hello", " world", model_version=3, params=params, prompt_tokens=5, completion_tokens=6)

    g = log.get(gid)
    assert g is not None
    assert (g.id, g.prompt, g.completion, g.model_version) == (gid, "Hello", " world", 3)
    assert g.params == params
    assert (g.prompt_tokens, g.completion_tokens) == (5, 6)
    assert g.created_at.tzinfo is not None
    assert log.get("00000000-0000-0000-0000-000000000000") is None


def test_feedback_with_a_sample_queues_it(db: Database, queue: SampleQueue) -> None:
    log = GenerationLog(db)
    gid = log.record("2+2=", "5", 0, {}, 4, 1)

    fb = log.add_feedback(gid, rating=None, correction="4", sample=NewSample("2+2=4", "feedback:correction", 2.0))
    assert (fb.generation_id, fb.rating, fb.correction) == (gid, None, "4")
    assert fb.sample_id is not None
    s = queue.get(fb.sample_id)
    assert s is not None
    assert (s.text, s.source, s.weight, s.status) == ("2+2=4", "feedback:correction", 2.0, SampleStatus.queued)

    plain = log.add_feedback(gid, rating=-1.0, correction=None, sample=None)
    assert plain.sample_id is None and plain.id != fb.id
    assert queue.depth() == 1


def test_feedback_on_unknown_generation_stores_nothing(db: Database, queue: SampleQueue) -> None:
    log = GenerationLog(db)
    with pytest.raises(UnknownGeneration):
        log.add_feedback("no-such-generation", 1.0, "x", NewSample("x", "feedback:correction"))
    assert queue.depth() == 0
    with db.read() as s:
        assert s.scalar(select(func.count()).select_from(FeedbackRow)) == 0


def test_feedback_and_its_sample_commit_together(
    db: Database, queue: SampleQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = GenerationLog(db)
    gid = log.record("p", "c", 0, {}, 1, 1)
    # Make the feedback row itself fail to store, after its sample has been inserted.
    monkeypatch.setattr(generations_module, "utcnow", lambda: datetime(2026, 1, 1))  # naive: refused
    with pytest.raises(StatementError, match="naive"):
        log.add_feedback(gid, None, "fix", NewSample("p fix", "feedback:correction"))
    assert queue.depth() == 0
    assert count_rows(db) == 0


# ---- counts of samples by status ------------------------------------------------------------


def counted(db: Database) -> SampleCounts:
    """The counts as a GROUP BY over the whole samples table finds them (what /metrics ran before)."""
    by_status: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    with db.read() as s:
        for status, reason, n in s.execute(
            select(SampleRow.status, SampleRow.reason, func.count()).group_by(SampleRow.status, SampleRow.reason)
        ):
            by_status[status] += n
            if status == SampleStatus.rejected.value:
                rejected[reason_label(reason)] += n
    return SampleCounts(dict(by_status), dict(rejected))


def test_kept_counts_agree_with_the_rows_after_every_kind_of_write(db: Database, queue: SampleQueue) -> None:
    def agree() -> None:
        assert queue.counts() == counted(db)

    agree()
    ids = enqueue_each(queue, [f"text {i}" for i in range(6)])
    ids += queue.enqueue([NewSample(f"more {i}", idempotency_key=f"k{i}") for i in range(6)])
    assert queue.enqueue([NewSample("more 0", idempotency_key="k0")]) == ids[6:7]  # a retry adds no row
    log = GenerationLog(db)
    gid = log.record("2+2=", "5", 0, {}, 4, 1)
    ids.append(str(log.add_feedback(gid, None, "4", NewSample("2+2=4", "feedback:correction")).sample_id))
    agree()
    assert queue.counts().by_status == {"queued": 13}

    first = [s.id for s in queue.claim_batch(8, 10**6)]
    agree()
    queue.ack(first[:3], version=1)
    queue.mark_heldout(first[3:5])
    queue.reject({first[5]: "too long: 900 tokens > 64", first[6]: "empty after cleaning"})
    queue.release(ids)  # every id: only first[7] was still in training
    agree()
    queue.reject({first[3]: "gate: held-out loss 2.31 > 2.10"})  # a held-out one, with its refused batch
    queue.reject({first[6]: "optimizer: loss is nan"})  # rejected again: it moves to another reason
    agree()

    held = [s.id for s in queue.claim_batch(3, 10**6)]
    with db.write() as s:
        s.execute(update(SampleRow).where(SampleRow.id.in_(held[:2])).values(claimed_at=utcnow() - timedelta(hours=1)))
    assert queue.requeue_expired(lease_s=300) == 2
    agree()
    heldout = queue.get(first[4])
    assert heldout is not None and queue.requeue_heldout([text_hash(heldout.text)]) == 1
    assert queue.requeue_outside({0}) == 3  # version 1 was rolled back
    agree()
    again = [s.id for s in queue.claim_batch(4, 10**6)]
    queue.ack(again[:2], version=2)
    queue.requeue(again[:1])  # version 2 lost the promotion race to a rollback
    queue.reject({again[2]: "something else"})
    assert queue.requeue_stale() == 2  # held[2] and again[3]
    agree()
    prefs = PreferenceQueue(db)
    prefs.reject({p.id: "gate: no" for p in prefs.for_generation(gid)})
    agree()  # preferences are not samples: their moves count for nothing here

    c = queue.counts()
    assert sum(c.by_status.values()) == count_rows(db) == 13
    assert c.rejected_by_reason == {"too_long": 1, "gate": 1, "optimizer": 1, "other": 1}
    assert c.by_status["queued"] == queue.depth()


def test_reading_the_counts_does_not_read_the_samples_table(queue: SampleQueue) -> None:
    """Before, /metrics counted every sample by status and reason on each scrape, and the trainer
    counted the queue on each poll: a cost that grew with the table."""
    ids = queue.enqueue([NewSample(f"text {i}") for i in range(300)])
    queue.claim_batch(100, 10**6)
    queue.reject({sid: "gate: worse" for sid in ids[:50]})
    for read in (queue.counts, queue.depth):
        _, statements = sql_of(read)
        assert statements and not any(reads_samples(s) for s in statements), statements
    assert queue.depth() == 200
    assert queue.counts().rejected_by_reason == {"gate": 50}
    assert reads_samples('SELECT count(*) FROM samples WHERE status = "queued"')  # what it would catch


# ---- the checkpoint index -------------------------------------------------------------------


def test_checkpoint_activate_compare_and_set(db: Database) -> None:
    index = CheckpointIndex(db)
    index.add(CheckpointRecord(0, None, CheckpointStatus.promoted, "base", 0, 0, {}))
    index.add(CheckpointRecord(1, 0, CheckpointStatus.candidate, "v000001", 10, 4, {"heldout_loss": 1.25}))
    index.add(CheckpointRecord(2, 0, CheckpointStatus.candidate, "v000002", 20, 8, {}))
    assert index.active_version() is None
    assert index.activate(1, expected=0) is False  # nothing active yet: the CAS fails

    assert index.activate(0) is True
    assert index.activate(1, expected=0, promote=True) is True
    assert index.active_version() == 1
    one = index.get(1)
    assert one is not None and one.status is CheckpointStatus.promoted
    assert one.metrics == {"heldout_loss": 1.25} and (one.step, one.samples_seen) == (10, 4)

    # A trainer that started from 0 tries to promote 2 after the active version moved to 1.
    assert index.activate(2, expected=0, promote=True) is False
    assert index.active_version() == 1
    two = index.get(2)
    assert two is not None and two.status is CheckpointStatus.candidate

    assert [r.version for r in index.list()] == [2, 1, 0]
    assert index.parents() == {0: None, 1: 0, 2: 0}


def test_promotion_waits_for_a_rollback_in_progress_and_loses_to_it(db: Database) -> None:
    """A trainer's compare-and-set that runs while a rollback's transaction is open must see the
    rollback once it commits, not overwrite it."""
    index = CheckpointIndex(db)
    for v in (0, 1, 2):
        index.add(CheckpointRecord(v, 0 if v else None, CheckpointStatus.candidate, f"v{v:06d}", 0, 0, {}))
    index.activate(0)
    result: list[bool] = []

    with db.write() as s:  # the rollback to 2, not yet committed
        meta = s.get(MetaRow, ACTIVE_KEY)
        assert meta is not None
        meta.value = "2"
        s.flush()
        trainer = threading.Thread(target=lambda: result.append(index.activate(1, expected=0, promote=True)))
        trainer.start()
        time.sleep(0.5)  # let the promotion reach the row the rollback holds
    trainer.join(30)

    assert result == [False]
    assert index.active_version() == 2
    one = index.get(1)
    assert one is not None and one.status is CheckpointStatus.candidate


def test_prune_and_rollback_in_two_processes_never_leave_a_pruned_version_active(db: Database) -> None:
    """The trainer process prunes while the API process rolls back: whichever transaction comes
    second sees the first. A rollback that lands first keeps its version; one that comes after
    the prune is refused, and the active version stays."""
    index = CheckpointIndex(db)
    for v in range(5):
        index.add(CheckpointRecord(v, v - 1 if v else None, CheckpointStatus.promoted, f"v{v:06d}", 0, 0, {}))
    index.activate(4)

    assert index.activate(1) is True  # the rollback first: pruning keeps it
    assert [r.version for r in index.prune(keep_last=1)] == [3, 2]
    assert index.active_version() == 1 and index.get(1) is not None

    assert index.activate(4) is True
    assert [r.version for r in index.prune(keep_last=1)] == [1]
    assert index.activate(1) is False  # the rollback after the prune: refused
    assert index.activate(7) is False  # never stored
    assert index.active_version() == 4
    assert [r.version for r in index.list()] == [4, 0]


# ---- SQLite specifics -----------------------------------------------------------------------


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'store.db'}")
    database.create_schema()
    yield database
    database.dispose()


def test_sqlite_is_wal_with_synchronous_full(sqlite_db: Database) -> None:
    assert sqlite_db.pragma("journal_mode") == "wal"
    assert sqlite_db.pragma("synchronous") == 2  # FULL: an acknowledged write survives power loss


def test_concurrent_writers_and_a_claimer_lose_nothing(db: Database) -> None:
    """8 threads x 50 enqueue calls while another thread claims batches: no "database is
    locked", every id returned is stored, and no sample is claimed twice."""
    queue = SampleQueue(db)
    writers, calls = 8, 50
    returned: list[str] = []
    claimed: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    done = threading.Event()

    def write(w: int) -> None:
        try:
            for i in range(calls):
                ids = queue.enqueue([NewSample(f"w{w} c{i} a"), NewSample(f"w{w} c{i} b", idempotency_key=f"{w}-{i}")])
                with lock:
                    returned.extend(ids)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def claim() -> None:
        try:
            while True:
                finished = done.is_set()
                batch = queue.claim_batch(max_samples=7, max_bytes=10_000)
                claimed.extend(s.id for s in batch)
                queue.ack([s.id for s in batch[::2]], version=1)
                if finished and not batch:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    claimer = threading.Thread(target=claim)
    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    claimer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    claimer.join(120)

    assert errors == []
    assert len(returned) == writers * calls * 2 == len(set(returned))
    assert count_rows(db) == len(returned)
    assert len(claimed) == len(set(claimed))
    assert set(claimed) == set(returned)  # the claimer drained everything after the writers stopped
    assert all(queue.get(sid) is not None for sid in returned)
    assert queue.counts() == counted(db)  # the writers' and the claimer's counts all added up


def test_the_generation_log_keeps_the_newest_and_those_feedback_names(db: Database) -> None:
    """Before, every generation was kept forever: the table grew with traffic."""
    from llmos.store.generations import GenerationLog, UnknownGeneration

    log = GenerationLog(db, keep=5)
    ids = [log.record(f"prompt {i}", f" answer {i}", 0, {}, 2, 2) for i in range(3)]
    log.add_feedback(ids[0], -1.0, None, None)  # the oldest has feedback: it stays
    ids += [log.record(f"prompt {i}", f" answer {i}", 0, {}, 2, 2) for i in range(3, 12)]
    kept = {i for i in ids if log.get(i) is not None}
    assert kept == {ids[0], *ids[-5:]}, (len(kept), ids.index(min(kept)))
    with pytest.raises(UnknownGeneration):
        log.add_feedback(ids[1], 1.0, None, None)
