"""Claims: per-source caps inside a batch, and leases that return a dead trainer's samples but
not a live one's, however long its work waits for an evaluation."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import LiveServer, admin_headers, make_settings, settled, wait_for
from sqlalchemy import update

from llmos.daemon import Daemon
from llmos.store.db import Database
from llmos.store.queue import NewSample, SampleQueue
from llmos.store.tables import SampleRow, SampleStatus, utcnow
from llmos.trainer.loop import Trainer


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


# ---- leases through a long wait for the next evaluation ----------------------------------------

LEASE_S = 2.0
GAP_S = 3 * LEASE_S  # an idle gap several leases long


def lease_daemon(data: Path, **overrides: object) -> Daemon:
    """A trainer thread with a short lease, one pass per batch and every version promoted (no
    held-out texts, no replay): one optimizer step for a batch's texts, one for its preference pairs."""
    settings = make_settings(
        data,
        **{
            "runtime.trainer": "thread",
            "runtime.torch_threads": 1,
            "train.lease_s": LEASE_S,
            "train.passes_per_batch": 1,
            "train.heldout_fraction": 0.0,
            "eval.heldout_budget": 1e9,
            "replay.enabled": False,
            **overrides,
        },
    )
    return Daemon(settings)


class Claims:
    """Every sample and preference id the trainer claims, as often as it claims it."""

    def __init__(self, d: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
        trainer = d.trainer
        assert isinstance(trainer, Trainer) and trainer.preferences is not None
        self.samples: list[str] = []
        self.prefs: list[str] = []
        claim_batch, claim_prefs = trainer.queue.claim_batch, trainer.preferences.claim

        def spy_batch(*a: Any, **kw: Any) -> Any:
            got = claim_batch(*a, **kw)
            self.samples += [s.id for s in got]
            return got

        def spy_prefs(*a: Any, **kw: Any) -> Any:
            got = claim_prefs(*a, **kw)
            self.prefs += [p.id for p in got]
            return got

        monkeypatch.setattr(trainer.queue, "claim_batch", spy_batch)
        monkeypatch.setattr(trainer.preferences, "claim", spy_prefs)

    def each_once(self) -> bool:
        return len(self.samples) == len(set(self.samples)) and len(self.prefs) == len(set(self.prefs))


def correct(d: Daemon, prompt: str, wrong: str, right: str) -> tuple[str, str]:
    """A served answer and its correction: the ids of the text and the preference pair it makes."""
    gid = d.generations.record(prompt, wrong, 0, {}, len(prompt), len(wrong))
    fb = d.feedback(gid, None, right)
    [pair] = d.preferences.for_generation(gid)
    assert fb.sample_id is not None and pair.paired
    return fb.sample_id, pair.id


def statuses(d: Daemon, ids: list[str], pref_ids: Sequence[str] = ()) -> set[tuple[SampleStatus, int | None]]:
    rows = [d.queue.get(i) for i in ids] + [d.preferences.get(i) for i in pref_ids]
    return {(r.status, r.trained_in_version) for r in rows if r is not None}


def trained_and_idle(d: Daemon, step_before: int) -> bool:
    """The trainer made steps since ``step_before`` and finished its cycle."""
    st = d.trainer.status()
    return st.step > step_before and st.state.value == "idle"


@pytest.mark.parametrize("gap", ["idle", "paused"])
def test_a_batch_waiting_for_evaluate_every_steps_trains_once_after_a_gap_longer_than_its_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gap: str
) -> None:
    """evaluate_every_steps 3: a first batch (texts, and a correction's pair: 2 steps) trains and
    waits, in no version, through a gap three leases long (the trainer idle, or paused); a second
    batch brings the steps to 3. One new version holds both, every sample and pair trained once:
    the trainer's own pending work did not go back to the queue when its claim swept expired leases."""
    d = lease_daemon(tmp_path / "data", **{"train.evaluate_every_steps": 3})
    claims = Claims(d, monkeypatch)
    first = d.ingest([NewSample(f"Parcel {i} leaves the Lyon depot on Tuesday.") for i in range(3)])
    text, pair = correct(d, "Q: Who signs the delivery note? A:", " nobody.", " the driver.")
    first.append(text)
    d.start()  # everything above in one batch
    try:
        wait_for(lambda: trained_and_idle(d, 0), timeout=60)
        assert d.registry.active_version() == 0  # 2 steps of 3: not evaluated
        if gap == "paused":
            d.trainer.pause()
        time.sleep(GAP_S)  # the gap itself: the trainer holds its pending work all along
        assert d.registry.active_version() == 0
        assert statuses(d, first, [pair]) == {(SampleStatus.training, None)}
        second = d.ingest([NewSample(f"Invoice {i} is paid within 30 days.") for i in range(3)])
        if gap == "paused":
            d.trainer.resume()
        everything = first + second
        wait_for(lambda: statuses(d, everything, [pair]) == {(SampleStatus.trained, 1)}, timeout=60)
        assert d.registry.active_version() == 1
        metrics = d.registry.get(1).metrics
        assert (metrics["samples"], metrics["preferences"]) == (len(everything), 1)
        assert claims.each_once(), (claims.samples, claims.prefs)
    finally:
        d.stop()


def test_a_batch_waiting_for_evaluate_every_s_is_promoted_without_more_data_and_keeps_its_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """evaluate_every_s longer than the lease: a batch posted once, and nothing after, is trained,
    waits in no version, and is promoted once its time comes, with no further post. Meanwhile a
    sweep of expired leases (what every claim does first) never finds it."""
    every_s = 2.5 * LEASE_S
    d = lease_daemon(tmp_path / "data", **{"train.evaluate_every_s": every_s})
    claims = Claims(d, monkeypatch)
    d.start()
    try:
        # A first batch's evaluation starts the clock: the next is due every_s after it.
        warm = d.ingest([NewSample("The Lyon depot opens at seven.")])
        wait_for(lambda: statuses(d, warm) == {(SampleStatus.trained, 1)}, timeout=every_s + 60)
        step, posted = d.trainer.status().step, time.monotonic()
        batch = d.ingest([NewSample(f"Parcel {i} leaves the Lyon depot on Tuesday.") for i in range(3)])
        wait_for(lambda: trained_and_idle(d, step), timeout=60)
        assert d.registry.active_version() == 1  # trained, waiting for its evaluation
        swept: list[int] = []

        def promoted() -> bool:
            swept.append(d.queue.requeue_expired(LEASE_S))
            return statuses(d, batch) == {(SampleStatus.trained, 2)}

        wait_for(promoted, timeout=every_s + 60)
        assert time.monotonic() - posted > LEASE_S  # the sweeps spanned more than a lease
        assert sum(swept) == 0, swept
        assert d.registry.active_version() == 2
        assert d.registry.get(2).metrics["samples"] == len(batch)
        assert claims.each_once(), claims.samples
    finally:
        d.stop()


def test_a_trainer_that_stops_renewing_loses_its_pending_work_after_the_lease(tmp_path: Path) -> None:
    """Work pending an evaluation is held by a live trainer only: once nothing renews it (the
    trainer died or hung), a sweep after the lease returns its samples and pairs to their queues."""
    d = lease_daemon(tmp_path / "data", **{"train.evaluate_every_steps": 1000})
    d.start(run_trainer=False)  # the test drives the trainer: after one cycle, it is gone
    try:
        ids = d.ingest([NewSample(f"Parcel {i} leaves the Lyon depot on Tuesday.") for i in range(3)])
        text, pair = correct(d, "Q: Who signs the delivery note? A:", " nobody.", " the driver.")
        ids.append(text)
        assert d.trainer.cycle()
        assert d.registry.active_version() == 0
        assert statuses(d, ids, [pair]) == {(SampleStatus.training, None)}
        returned = wait_for(lambda: d.queue.requeue_expired(LEASE_S), timeout=LEASE_S + 30)
        assert returned == len(ids)
        assert d.preferences.requeue_expired(LEASE_S) == 1
        assert statuses(d, ids, [pair]) == {(SampleStatus.queued, None)}
    finally:
        d.stop()
