"""One trainer per store: the trainer lease (llmos/store/lease.py) on every backend the ``db``
fixture gives, fencing of the writes a trainer makes, and two trainers on one store, one of them
stopped past its lease (as by SIGSTOP) while the other takes over."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings, wait_for
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from llmos.daemon import Daemon
from llmos.store.checkpoints import CheckpointIndex, CheckpointRecord
from llmos.store.db import Database
from llmos.store.lease import LeaseLost, TrainerLease
from llmos.store.queue import NewSample, SampleQueue
from llmos.store.tables import CheckpointStatus, SampleStatus, TrainerLeaseRow
from llmos.trainer.leader import Leader, pid_space
from llmos.trainer.loop import Trainer, TrainerPhase

SHORT_S = 0.3  # a lease that runs out while the test waits for it


@pytest.fixture
def lease(db: Database) -> TrainerLease:
    return TrainerLease(db)


# ---- the lease ----------------------------------------------------------------------------------


def test_a_live_lease_keeps_a_second_trainer_out_until_it_runs_out_then_passes_with_a_higher_token(
    lease: TrainerLease,
) -> None:
    assert lease.current().holder is None and not lease.current().live
    assert lease.acquire("a", SHORT_S) == 1
    assert lease.acquire("b", 30) is None  # a's lease is live
    assert lease.acquire("a", SHORT_S) == 1  # its holder asking again keeps its token
    assert not lease.renew("b", 1, 30)

    assert wait_for(lambda: lease.acquire("b", 30), timeout=SHORT_S + 10, interval=0.05) == 2
    now = lease.current()
    assert (now.holder, now.token, now.live) == ("b", 2, True)
    assert not lease.renew("a", 1, 30)  # a, resumed, finds it lost
    lease.release("a", 1)  # and cannot give back what is no longer its
    assert lease.current().holder == "b"
    assert lease.renew("b", 2, 30)

    lease.release("b", 2)  # a standby takes a lease given back at once
    assert lease.current().holder is None
    assert lease.acquire("c", 30) == 3


def test_a_holder_known_to_be_dead_is_replaced_at_once_and_no_other(lease: TrainerLease) -> None:
    assert lease.acquire("a", 300) == 1
    assert lease.acquire("b", 300, dead="someone else") is None
    assert lease.acquire("b", 300, dead="a") == 2


def test_of_trainers_starting_together_one_takes_the_lease(db: Database) -> None:
    lease = TrainerLease(db)
    start = threading.Barrier(6)
    got: dict[str, int | None] = {}

    def take(name: str) -> None:
        start.wait()
        got[name] = lease.acquire(name, 30)

    threads = [threading.Thread(target=take, args=(f"t{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = {name: token for name, token in got.items() if token is not None}
    assert len(got) == 6 and list(winners.values()) == [1], got
    assert lease.current().holder == next(iter(winners))


# ---- fencing ------------------------------------------------------------------------------------


def test_a_stale_token_promotes_nothing_and_checkpoints_nothing(db: Database, lease: TrainerLease) -> None:
    index = CheckpointIndex(db)
    index.add(CheckpointRecord(0, None, CheckpointStatus.promoted, "base", 0, 0))
    assert index.activate(0)
    old = lease.acquire("a", 300)
    assert old == 1
    index.add(CheckpointRecord(1, 0, CheckpointStatus.candidate, "v000001", 5, 3), fence=old)
    new = lease.acquire("b", 300, dead="a")  # b takes over while a is stopped
    assert new == 2

    # a resumes: its promotion would pass the compare-and-set (the active version is still its
    # parent), but its token is stale.
    assert not index.activate(1, expected=0, promote=True, fence=old)
    assert index.active_version() == 0
    rec = index.get(1)
    assert rec is not None and rec.status is CheckpointStatus.candidate
    with pytest.raises(LeaseLost):
        index.add(CheckpointRecord(2, 0, CheckpointStatus.candidate, "v000002", 6, 3), fence=old)
    assert index.get(2) is None

    assert index.activate(1, expected=0, promote=True, fence=new)  # the holder's token is good
    assert index.active_version() == 1
    assert index.activate(0)  # an admin's rollback carries no token


def test_a_process_paused_inside_a_lease_transaction_holds_a_standby_off_only_as_long_as_the_store_allows(
    db_url: str,
) -> None:
    # Trainer A pauses (SIGSTOP, a debugger) inside the transaction that renews its lease, holding
    # the lease row. PostgreSQL ends A's idle session after store.idle_transaction_s, and standby B
    # takes the run-out lease; SQLite cannot break another process's write lock: B waits its busy
    # timeout and fails, until A resumes (docs/limits.md).
    a_db = Database(db_url, busy_timeout_s=1.0, idle_transaction_s=1.0)
    a_db.create_schema()
    b_db = Database(db_url, busy_timeout_s=1.0, idle_transaction_s=1.0)
    assert TrainerLease(a_db).acquire("a", SHORT_S) == 1
    paused, resumed = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def pause_in_transaction() -> None:
        try:
            with a_db.write() as s:
                s.scalar(select(TrainerLeaseRow).with_for_update())
                paused.set()
                resumed.wait(30)
        except BaseException as e:  # noqa: BLE001 - what A meets when it resumes
            failures.append(e)

    a = threading.Thread(target=pause_in_transaction)
    a.start()
    try:
        assert paused.wait(10)
        started = time.monotonic()
        if b_db.is_sqlite:
            with pytest.raises(OperationalError, match="locked"):
                TrainerLease(b_db).acquire("b", 30)
        else:
            assert wait_for(lambda: TrainerLease(b_db).acquire("b", 30), timeout=20, interval=0.1) == 2
            assert time.monotonic() - started < 10
    finally:
        resumed.set()
        a.join(30)
        a_db.dispose()
        b_db.dispose()
    assert bool(failures) != b_db.is_sqlite  # on PostgreSQL, A's transaction was ended under it


def test_a_stale_trainer_claims_and_acknowledges_nothing(db: Database, lease: TrainerLease) -> None:
    queue = SampleQueue(db)
    ids = queue.enqueue([NewSample(f"text {i}") for i in range(3)])
    old = lease.acquire("a", 300)
    assert old is not None
    assert [s.id for s in queue.claim_batch(10, 10**6, fence=old)] == ids
    new = lease.acquire("b", 300, dead="a")
    assert new is not None

    with pytest.raises(LeaseLost):
        queue.ack(ids, 1, fence=old)
    assert {queue.get(i).status for i in ids} == {SampleStatus.training}  # type: ignore[union-attr]
    with pytest.raises(LeaseLost):
        queue.release(ids, fence=old)
    assert queue.requeue_stale(fence=new) == 3  # the new holder returns what the old one held
    with pytest.raises(LeaseLost):
        queue.claim_batch(10, 10**6, fence=old)
    assert queue.depth() == 3 and queue.counts().by_status.get("training", 0) == 0

    assert [s.id for s in queue.claim_batch(10, 10**6, fence=new)] == ids
    queue.ack(ids, 1, fence=new)
    assert {queue.get(i).status for i in ids} == {SampleStatus.trained}  # type: ignore[union-attr]
    lease.release("b", new)
    with pytest.raises(LeaseLost):  # a lease given back fences its last token too
        queue.requeue_stale(fence=new)


# ---- the trainer --------------------------------------------------------------------------------


@pytest.mark.skipif(pid_space() is None, reason="a process's death is told on Linux only")
def test_a_trainer_takes_at_once_the_lease_of_a_dead_process_of_its_machine(lease: TrainerLease) -> None:
    """A server restarted after kill -9 (or a trainer process its server replaced) does not wait
    for its dead predecessor's lease to run out; a live process's lease it waits for."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    assert lease.acquire(f"{socket.gethostname()}:{pid}:{pid_space()}:00000000", 300) == 1
    successor = Leader(lease, 300)
    assert successor.acquire() and successor.token == 2

    alive = f"{socket.gethostname()}:{os.getpid()}:{pid_space()}:00000000"  # this very process
    lease.release(successor.holder, successor.token)
    assert lease.acquire(alive, 300) == 3
    standby = Leader(lease, 300)
    assert not standby.acquire() and lease.current().holder == alive


TRAINER_LEASE_S = 2.0  # short, yet longer than a loaded machine stalls a trainer thread


def two_trainers(data: Path) -> tuple[Daemon, Daemon]:
    """Two servers on one data directory and store, each with a trainer the test drives (its cycles,
    or its thread); a short trainer lease, one pass per batch and every version promoted (no
    held-out texts, no replay)."""
    settings = make_settings(
        data,
        **{
            "runtime.trainer": "thread",
            "runtime.torch_threads": 1,
            "train.trainer_lease_s": TRAINER_LEASE_S,
            "train.passes_per_batch": 1,
            "train.heldout_fraction": 0.0,
            "eval.heldout_budget": 1e9,
            "replay.enabled": False,
        },
    )
    a, b = Daemon(settings), Daemon(settings)
    a.start(run_trainer=False)
    b.start(run_trainer=False)
    return a, b


class HeldAtPromotion:
    """The trainer stops (as if by SIGSTOP) as its promotion is about to reach the store, until let go."""

    def __init__(self, d: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached, self.go = threading.Event(), threading.Event()
        self.results: list[bool] = []
        promote = d.registry.promote

        def held(*a: Any, **kw: Any) -> bool:
            self.reached.set()
            assert self.go.wait(120)
            self.results.append(promote(*a, **kw))
            return self.results[-1]

        monkeypatch.setattr(d.registry, "promote", held)


class Cycle:
    """One trainer cycle on a thread of its own."""

    def __init__(self, d: Daemon) -> None:
        assert isinstance(d.trainer, Trainer)
        self.worked: list[bool] = []
        trainer = d.trainer
        self.thread = threading.Thread(target=lambda: self.worked.append(trainer.cycle()), daemon=True)
        self.thread.start()

    def join(self) -> list[bool]:
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self.worked


def in_store(d: Daemon, ids: list[str]) -> set[tuple[SampleStatus, int | None]]:
    """The status and version of each of these samples."""
    rows = [d.queue.get(i) for i in ids]
    return {(r.status, r.trained_in_version) for r in rows if r is not None}


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    a, b = two_trainers(tmp_path / "data")
    yield a, b
    a.stop()
    b.stop()


def test_a_standby_takes_over_from_a_trainer_stopped_past_its_lease_which_then_promotes_and_acks_nothing(
    daemons: tuple[Daemon, Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = daemons
    lease = TrainerLease(a.db)
    ids = a.ingest([NewSample(f"Parcel {i} leaves the Lyon depot on Tuesday.") for i in range(3)])

    def statuses() -> set[tuple[SampleStatus, int | None]]:
        return in_store(a, ids)

    held_a, held_b = HeldAtPromotion(a, monkeypatch), HeldAtPromotion(b, monkeypatch)
    try:
        run_a = Cycle(a)
        assert held_a.reached.wait(120)  # a took the lease, trained the batch and wrote version 1
        assert lease.current().token == 1
        assert a.registry.get(1).status is CheckpointStatus.candidate

        assert not b.trainer.cycle()  # a standby: it claims nothing
        assert b.trainer.status().state is TrainerPhase.standby
        assert statuses() == {(SampleStatus.training, None)}

        # a is stopped: it renews nothing. Once its lease has run out, b takes over.
        wait_for(lambda: not lease.current().live, timeout=TRAINER_LEASE_S + 10, interval=0.05)
        run_b = Cycle(b)
        assert held_b.reached.wait(120)  # b: token 2, a's samples back to the queue, trained, version 2 written
        assert lease.current().token == 2 and b.registry.get(2).status is CheckpointStatus.candidate
        assert statuses() == {(SampleStatus.training, None)}  # now b's claims

        # a resumes. Its promotion would pass the compare-and-set (the active version is still
        # version 1's parent), but it carries a stale token: refused. Nothing of a's is acknowledged.
        assert a.registry.active_version() == 0
        held_a.go.set()
        assert run_a.join() == [True]
        assert held_a.results == [False]
        assert a.registry.active_version() == 0 and a.registry.get(1).status is CheckpointStatus.candidate
        assert statuses() == {(SampleStatus.training, None)}
        st = a.trainer.status()
        assert st.state is TrainerPhase.standby and st.promotions == 0

        held_b.go.set()
        assert run_b.join() == [True]
        assert held_b.results == [True]
        assert a.registry.active_version() == 2
        assert statuses() == {(SampleStatus.trained, 2)}
        assert b.trainer.status().promotions == 1
        assert not a.trainer.cycle()  # a stays a standby while b holds the lease
    finally:
        held_a.go.set()
        held_b.go.set()


def test_of_two_trainer_threads_on_one_store_one_trains_and_the_other_takes_over_once_it_stops_renewing(
    daemons: tuple[Daemon, Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainers as they run in a server: a's thread takes the lease, b's waits as a standby.
    a stops (as if by SIGSTOP) just before it claims; b takes over and trains what was posted;
    a, resumed, claims nothing and waits as a standby."""
    a, b = daemons
    assert isinstance(a.trainer, Trainer) and isinstance(b.trainer, Trainer)
    lease = TrainerLease(a.db)
    a.trainer.start()
    wait_for(lambda: lease.current().token == 1, timeout=30, interval=0.05)
    b.trainer.start()
    wait_for(lambda: b.trainer.status().state is TrainerPhase.standby, timeout=30, interval=0.05)
    holder = lease.current().holder

    reached, go = threading.Event(), threading.Event()
    claim_batch = a.trainer.queue.claim_batch
    claimed: list[object] = []  # what each of a's claims got, or the error it met

    def stopped_before_claiming(*args: Any, **kw: Any) -> Any:
        reached.set()
        assert go.wait(120)
        try:
            claimed.append(claim_batch(*args, **kw))
        except LeaseLost as exc:
            claimed.append(exc)
            raise
        return claimed[-1]

    monkeypatch.setattr(a.trainer.queue, "claim_batch", stopped_before_claiming)
    try:
        ids = a.ingest([NewSample(f"Invoice {i} is paid within 30 days.") for i in range(3)])
        assert reached.wait(60)
        assert lease.current().holder == holder  # a holds it, and renews it no more
        wait_for(lambda: lease.current().token == 2, timeout=TRAINER_LEASE_S + 5, interval=0.05)
        wait_for(lambda: b.trainer.status().promotions == 1, timeout=60)
        assert a.registry.active_version() == 1 and in_store(a, ids) == {(SampleStatus.trained, 1)}

        go.set()  # a resumes: its claim carries a stale token
        wait_for(lambda: a.trainer.status().state is TrainerPhase.standby, timeout=30, interval=0.05)
        assert len(claimed) == 1 and isinstance(claimed[0], LeaseLost)
        assert a.trainer.status().promotions == 0 and lease.current().token == 2
        assert a.registry.active_version() == 1
    finally:
        go.set()
