"""Claims: per-source caps inside a batch, and leases that return a dead trainer's samples."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from llmos.store.db import Database
from llmos.store.queue import NewSample, SampleQueue
from llmos.store.tables import SampleRow, SampleStatus, utcnow


def test_one_source_cannot_fill_a_batch(db: Database) -> None:
    q = SampleQueue(db)
    flood = q.enqueue([NewSample(f"spam {i}", source="flood") for i in range(40)])
    others = q.enqueue([NewSample(f"real {i}", source=f"user{i % 3}") for i in range(6)])
    batch = q.claim_batch(max_samples=20, max_bytes=10**6, max_per_source=8)
    by_source = {s.source for s in batch}
    assert sum(s.source == "flood" for s in batch) == 8
    assert {s.id for s in batch if s.source != "flood"} == set(others)  # the others get in despite arriving later
    assert by_source == {"flood", "user0", "user1", "user2"}
    # The flood's surplus waits its turn; nothing is dropped.
    assert q.depth() == 40 - 8
    assert all(q.get(i) is not None for i in flood)


def test_expired_leases_return_to_the_queue_and_renewed_ones_do_not(db: Database) -> None:
    q = SampleQueue(db)
    q.enqueue([NewSample(f"text {i}") for i in range(4)])
    held = q.claim_batch(4, 10**6)
    ids = [s.id for s in held]
    long_ago = utcnow() - timedelta(hours=1)
    with db.write() as s:
        s.execute(update(SampleRow).where(SampleRow.id.in_(ids)).values(claimed_at=long_ago))
    q.renew(ids[:2])  # this trainer is alive and still holds two of them
    assert q.requeue_expired(lease_s=300) == 2
    assert [q.get(i).status for i in ids] == [  # type: ignore[union-attr]
        SampleStatus.training,
        SampleStatus.training,
        SampleStatus.queued,
        SampleStatus.queued,
    ]
