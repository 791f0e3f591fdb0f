"""Claims: per-source caps inside a batch, and leases that return a dead trainer's samples."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

from conftest import LiveServer, admin_headers, make_settings, settled, wait_for
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


def test_a_lone_post_skips_the_rest_of_the_fill_wait_and_a_steady_stream_fills_one_batch(tmp_path: Path) -> None:
    # fill_wait_s is long: without the quiet rule a lone post would wait all of it.
    settings = make_settings(
        tmp_path / "data",
        **{
            "train.fill_wait_s": 30.0,
            "train.fill_quiet_s": 1.0,
            "train.passes_per_batch": 1,
            "train.heldout_fraction": 0.0,
            "eval.heldout_budget": 1e9,
        },
    )
    with LiveServer(settings) as srv, srv.client() as c:
        lone = c.post("/v1/texts", json={"text": "A lone post, trained without a long wait."}).json()["ids"]
        wait_for(lambda: c.get(f"/v1/texts/{lone[0]}").json()["status"] != "queued", timeout=15)
        wait_for(lambda: settled(c, lone), timeout=60)

        # Posts 0.2 s apart for 1.2 s: longer than the quiet time in all, never that long between two.
        stream = []
        for i in range(7):
            stream += c.post("/v1/texts", json={"text": f"Stream post {i}: one of a steady series."}).json()["ids"]
            time.sleep(0.2)
        wait_for(lambda: settled(c, stream), timeout=60)
        versions = {c.get(f"/v1/texts/{sid}").json()["trained_in_version"] for sid in stream}
        assert len(versions) == 1 and None not in versions, versions


def test_a_pause_ends_the_fill_wait_without_claiming_and_a_resume_claims_at_once(tmp_path: Path) -> None:
    # A fill wait of 30 s that only a control action can cut short: no second post comes.
    settings = make_settings(
        tmp_path / "data",
        **{
            "train.fill_wait_s": 30.0,
            "train.fill_quiet_s": 30.0,
            "train.passes_per_batch": 1,
            "eval.heldout_budget": 1e9,
        },
    )
    with LiveServer(settings) as srv, srv.client() as c:
        sid = c.post("/v1/texts", json={"text": "Posted just before a pause."}).json()["ids"][0]
        time.sleep(1.0)  # the post woke the trainer: it is in its fill wait now
        assert c.post("/v1/admin/trainer/pause", headers=admin_headers()).status_code == 200
        wait_for(lambda: c.get("/v1/trainer").json()["state"] == "paused", timeout=10)
        time.sleep(1.0)
        assert c.get(f"/v1/texts/{sid}").json()["status"] == "queued"  # nothing claimed while paused
        assert c.post("/v1/admin/trainer/resume", headers=admin_headers()).status_code == 200
        # The wait ended at the pause: the text is claimed now, not when the 30 s run out.
        wait_for(lambda: c.get(f"/v1/texts/{sid}").json()["status"] != "queued", timeout=15)
