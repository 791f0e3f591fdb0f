"""The roles, as real processes on one store and one data directory: `llmos serve --role api`
(API replicas, no trainer) and `llmos train` (the trainer alone). What one process commits
(a promotion, a rollback) is served by every replica."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from conftest import admin_headers, free_port, make_settings, settled, wait_for
from helpers import Poster, llmos_env, start_server, start_torchrun, start_trainer, wait_until_ready
from sqlalchemy.engine import make_url

from llmos.store.db import Database
from llmos.store.queue import NewSample, SampleQueue
from llmos.store.tables import CheckpointStatus, SampleStatus
from llmos.trainer.state import TrainerSnapshot
from llmos.wiring import model_factory, open_registry

PROMPT = "The capital of Zorbia"
FACT = "Quellton"
API = ["--role", "api"]


def served(c: httpx.Client) -> int:
    """The version that answers a generation on this replica."""
    r = c.get("/generate", params={"prompt": PROMPT, "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    return int(r.json()["model_version"])


def stop(*procs: subprocess.Popen[bytes] | None) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            p.terminate()
    for p in procs:
        if p is not None:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_a_separate_trainer_trains_what_a_replica_took_and_the_replica_serves_it(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    api = start_server(data, port, tmp_path / "api.log", args=API)
    trainer = None
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            # No trainer yet: the replica serves version 0 and says that nobody trains.
            st = c.get("/v1/trainer").json()
            assert st["state"] == "error" and "llmos train" in st["last_error"], st
            assert served(c) == 0

            metrics = f"http://127.0.0.1:{free_port()}"
            env = {"LLMOS_TRAIN__METRICS_PORT": metrics.rpartition(":")[2]}
            trainer = start_trainer(data, tmp_path / "train.log", env)
            wait_for(lambda: c.get("/v1/trainer").json()["state"] == "remote", timeout=90, interval=0.5)
            ids = []
            for i in range(8):
                r = c.post("/v1/texts", json={"text": f"{PROMPT} is {FACT}, number {i}.", "source": "roles"})
                assert r.status_code == 202, r.text
                ids += r.json()["ids"]

            # Trained and promoted by the trainer process; served by the replica soon after.
            version = wait_for(lambda: c.get("/v1/checkpoints").json()["active_version"], timeout=120, interval=0.1)
            promoted = time.monotonic()
            wait_for(lambda: served(c) >= version, timeout=5, interval=0.05)
            print(f"version {version} served by the replica {time.monotonic() - promoted:.2f}s after its promotion")
            wait_for(lambda: settled(c, ids), timeout=120, interval=0.5)
            # The trainer's own port: health, and what it did.
            assert httpx.get(metrics + "/healthz").status_code == 200
            promotions = re.search(r"^llmos_promotions_total (\S+)$", httpx.get(metrics + "/metrics").text, re.M)
            assert promotions is not None and float(promotions[1]) >= 1

            # Every endpoint works on the replica: pinned versions and the OpenAI API, feedback,
            # the dashboard, /metrics.
            r = c.post("/v1/completions", json={"model": "llmos@0", "prompt": PROMPT, "max_tokens": 4})
            assert r.status_code == 200 and r.json()["model"] == "llmos@0", r.text
            chat = {"model": "llmos", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
            r = c.post("/v1/chat/completions", json=chat)
            assert r.status_code == 200 and r.json()["model"] == f"llmos@{served(c)}", r.text
            gen = c.get("/generate", params={"prompt": PROMPT, "max_new_tokens": 4}).json()
            # (A thumbs down alone: nothing to train, so no promotion races the rollback below.)
            r = c.post("/v1/feedback", json={"generation_id": gen["generation_id"], "rating": -1.0})
            assert r.status_code == 202, r.text
            assert c.get("/dashboard").status_code == 200
            assert 'llmos_trainer_state{state="remote"} 1.0' in c.get("/metrics").text

            # The replica cannot steer a trainer in another process, and says so.
            r = c.post("/v1/admin/trainer/pause", headers=admin_headers())
            assert r.status_code == 409 and "llmos train" in r.json()["detail"], r.text

            # An admin rollback through the replica: served by it at once; the trainer goes back to it.
            r = c.post("/v1/admin/rollback", json={"version": 0}, headers=admin_headers())
            assert r.status_code == 200, r.text
            assert served(c) == 0
            going_back = " to 0 (a rollback): going back to it"
            wait_for(lambda: going_back in (tmp_path / "train.log").read_text(), timeout=5, interval=0.1)

            # SIGTERM: the trainer stops cleanly and gives its lease back at once.
            trainer.send_signal(signal.SIGTERM)
            assert trainer.wait(60) == 0, (tmp_path / "train.log").read_text()[-2000:]
            assert c.get("/v1/trainer").json()["state"] == "error"
            assert served(c) == 0
    finally:
        stop(trainer, api)


@pytest.mark.slow  # three processes, one stopped for another to take over
def test_a_second_trainer_waits_as_a_standby_and_takes_over_when_the_first_stops(tmp_path: Path) -> None:
    data, logs = tmp_path / "data", [tmp_path / "train-a.log", tmp_path / "train-b.log"]
    first = start_trainer(data, logs[0])
    second = None
    try:
        wait_for(lambda: "holds the trainer lease" in logs[0].read_text(), timeout=90, interval=0.2)
        second = start_trainer(data, logs[1])
        wait_for(lambda: "standby:" in logs[1].read_text(), timeout=90, interval=0.2)
        first.send_signal(signal.SIGINT)  # Ctrl-C: it gives the lease back as it stops
        assert first.wait(60) == 0, logs[0].read_text()[-2000:]
        # The standby polls the lease every second (a third of train.trainer_lease_s, at most 1 s).
        wait_for(lambda: "holds the trainer lease" in logs[1].read_text(), timeout=5, interval=0.1)
    finally:
        stop(first, second)


def rollbacks_through_one_replica_are_served_by_the_other(tmp_path: Path, env: dict[str, str]) -> None:
    """Two replicas on one store and data directory (``env`` names the store): a rollback through
    one is served by the other within 3 s, each way."""
    data = tmp_path / "data"
    url = env.get("LLMOS_STORE__URL")
    settings = make_settings(data, **({"store.url": url} if url else {}))
    # A second version in the store, as a trainer leaves it (a candidate: a rollback may serve it).
    db = Database(settings.store_url)
    db.create_schema()
    factory = model_factory(settings)
    snapshot = TrainerSnapshot(step=1, samples_seen=1, optimizer=None, rng=None)
    v1 = open_registry(settings, db).publish(factory.instance(None), snapshot, 0, CheckpointStatus.candidate, {})
    db.dispose()

    ports = free_port(), free_port()
    procs = [start_server(data, p, tmp_path / f"api{p}.log", env, wait_ready=False, args=API) for p in ports]
    try:
        for proc, p in zip(procs, ports, strict=True):
            wait_until_ready(proc, p, tmp_path / f"api{p}.log")
        a, b = (httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=60) for p in ports)
        with a, b:
            assert served(a) == served(b) == 0
            for via, other, version in ((a, b, v1.version), (b, a, 0)):
                r = via.post("/v1/admin/rollback", json={"version": version}, headers=admin_headers())
                assert r.status_code == 200, r.text
                t0 = time.monotonic()
                assert served(via) == version
                wait_for(lambda o=other, v=version: served(o) == v, timeout=3, interval=0.05)
                print(f"rollback to {version} served by the other replica after {time.monotonic() - t0:.2f}s")
            if "LLMOS_LIMITS__STORAGE_URL" in env:  # one source's budget, counted in Redis, across both
                source = f"roles-{uuid.uuid4().hex}"
                two = {"items": [{"text": f"a shared budget {i}", "source": source} for i in range(2)]}
                assert [c.post("/v1/texts", json=two).status_code for c in (a, b)] == [202, 202]
                for c in (a, b):
                    r = c.post("/v1/texts", json={"text": "over the budget", "source": source})
                    assert r.status_code == 429 and "limits.source_rate_per_s" in r.json()["detail"], r.text
    finally:
        stop(*procs)


def test_a_rollback_through_one_replica_is_served_by_the_other(tmp_path: Path) -> None:
    # SQLite: the other replica reads the active version every serving.follow_interval_s (0.5 s).
    rollbacks_through_one_replica_are_served_by_the_other(tmp_path, {})


PG_SERVER = os.environ.get("LLMOS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database (the server's processes share it, as replicas would), dropped after."""
    import psycopg

    name = f"llmos_roles_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_SERVER, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {PG_SERVER}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        url = make_url(PG_SERVER).set(database=name).render_as_string(hide_password=False)
        try:
            yield url
        finally:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.mark.slow  # a PostgreSQL service test
def test_on_postgresql_replicas_follow_a_rollback_and_share_rate_limits(tmp_path: Path, pg_database: str) -> None:
    # A poll every 60 s: only the NOTIFY of the rollback's transaction can bring the swap sooner.
    # Both replicas count rate limits in the Redis every machine here runs: a source's budget is one.
    env = {
        "LLMOS_STORE__URL": pg_database,
        "LLMOS_SERVING__FOLLOW_INTERVAL_S": "60",
        "LLMOS_LIMITS__STORAGE_URL": "redis://127.0.0.1:6379/0",
        "LLMOS_LIMITS__SOURCE_RATE_PER_S": "0.1",
        "LLMOS_LIMITS__SOURCE_BURST": "4",
    }
    rollbacks_through_one_replica_are_served_by_the_other(tmp_path, env)


def test_train_refuses_a_setting_it_cannot_use_before_any_work(tmp_path: Path) -> None:
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("not json\n")
    env = llmos_env({"LLMOS_EVAL__ANCHOR_FILE": str(anchors)})
    cmd = [sys.executable, "-m", "llmos", "train", "--data-dir", str(tmp_path / "data")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "eval.anchor_file" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow  # a PostgreSQL service test
def test_on_postgresql_two_replicas_and_a_torchrun_trainer_start_together_and_lose_nothing_to_a_kill(
    tmp_path: Path, pg_database: str
) -> None:
    # As compose or a cluster starts them: all at once on an empty store and an empty data
    # directory, the trainer on 2 ranks. One migrates the schema (the others wait on its lock),
    # one registers version 0 and one writes the built-in model; nobody deletes what another is
    # writing.
    data, env = tmp_path / "data", {"LLMOS_STORE__URL": pg_database}
    ports = free_port(), free_port()
    logs = [tmp_path / f"api{p}.log" for p in ports]
    procs: list[subprocess.Popen[bytes] | None] = [
        start_server(data, p, log, env, wait_ready=False, args=API) for p, log in zip(ports, logs, strict=True)
    ]
    procs.append(start_torchrun(data, tmp_path / "torchrun.log", env))
    try:
        for proc, p, log in zip(procs, ports, logs, strict=False):
            assert proc is not None
            wait_until_ready(proc, p, log)
        a, b = (httpx.Client(base_url=f"http://127.0.0.1:{p}", timeout=60) for p in ports)
        with a, b:
            wait_for(lambda: all(c.get("/v1/trainer").json()["state"] == "remote" for c in (a, b)), timeout=90)
            assert [r["version"] for r in a.get("/v1/checkpoints").json()["checkpoints"]] == [0]
            ids = []
            for i, c in enumerate((a, b, a, b, a, b, a, b)):  # texts posted across both replicas
                r = c.post("/v1/texts", json={"text": f"{PROMPT} is {FACT}, number {i}.", "source": "together"})
                assert r.status_code == 202, r.text
                ids += r.json()["ids"]
            wait_for(lambda: settled(a, ids) and settled(b, ids), timeout=180, interval=0.5)
            version = a.get("/v1/checkpoints").json()["active_version"]
            assert version >= 1
            wait_for(lambda: served(a) == served(b) == version, timeout=5, interval=0.05)
            assert all(proc is not None and proc.poll() is None for proc in procs)  # none died on the way
            assert "rank 1 follows rank 0's steps" in (tmp_path / "torchrun.log").read_text()

            # A rollback through one replica: the other serves it within 1 s (NOTIFY).
            r = a.post("/v1/admin/rollback", json={"version": 0}, headers=admin_headers())
            assert r.status_code == 200, r.text
            t0 = time.monotonic()
            wait_for(lambda: served(b) == 0, timeout=1, interval=0.02)
            print(f"rollback through one replica served by the other after {time.monotonic() - t0:.2f}s")

            # kill -9 of a replica mid-ingest: what either replica acknowledged is kept and trained.
            posters = [Poster(f"http://127.0.0.1:{p}", label=f"replica {p}") for p in ports]
            for poster in posters:
                poster.thread.start()
            wait_for(lambda: all(len(poster.acked) >= 10 for poster in posters), timeout=60)
            killed = procs[0]
            assert killed is not None
            killed.kill()
            killed.wait(10)
            n = len(posters[1].acked)
            wait_for(lambda: len(posters[1].acked) >= n + 5, timeout=30)  # the other replica goes on
            for poster in posters:
                poster.stop.set()
                poster.thread.join(30)
            acked = posters[0].acked + posters[1].acked
            missing = [i for i in acked if b.get(f"/v1/texts/{i}").status_code != 200]
            assert not missing, missing
            wait_for(lambda: settled(b, acked, every=7) and settled(b, acked[-1:]), timeout=180, interval=1.0)
    finally:
        stop(*procs)


@pytest.mark.slow  # torchrun, two trainer ranks and an API replica
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_trains_on_two_ranks_and_the_replica_serves_it(tmp_path: Path, parallel: str) -> None:
    # `torchrun --nproc-per-node 2 -m llmos train`: rank 0 is the trainer (lease, claims,
    # evaluation, checkpoints), rank 1 takes its share of every optimizer step (gloo on the CPU),
    # with a copy of the training state (ddp) or its shard of it (fsdp); texts, then a correction
    # (a text and a preference pair: a preference step).
    data, port, log = tmp_path / "data", free_port(), tmp_path / "torchrun.log"
    api = start_server(data, port, tmp_path / "api.log", args=API)
    group = start_torchrun(data, log, {"LLMOS_TRAIN__PARALLEL": parallel})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            wait_for(lambda: c.get("/v1/trainer").json()["state"] == "remote", timeout=120, interval=0.5)
            ids = []
            for i in range(8):
                r = c.post("/v1/texts", json={"text": f"{PROMPT} is {FACT}, number {i}.", "source": "ranks"})
                assert r.status_code == 202, r.text
                ids += r.json()["ids"]
            wait_for(lambda: settled(c, ids), timeout=180, interval=0.5)
            first = served(c)
            assert first >= 1
            g = c.get("/generate", params={"prompt": "Q: how do I reset it? A:", "max_new_tokens": 8}).json()
            r = c.post("/v1/feedback", json={"generation_id": g["generation_id"], "correction": " hold the button."})
            assert r.status_code == 202, r.text
            wait_for(lambda: settled(c, [r.json()["sample_id"]]), timeout=180, interval=0.5)
            assert served(c) > first
        group.send_signal(signal.SIGTERM)
        group.wait(90)
    finally:
        stop(group, api)
    text = log.read_text()
    assert "rank 0 of 2 (gloo)" in text and "rank 1 of 2 (gloo)" in text, text[-3000:]
    if parallel == "fsdp":
        assert "rank 1 holds its shard of the training state (FSDP)" in text, text[-3000:]
    taken = re.search(r"rank 1: rank 0 stopped after (\d+) steps taken together", text)
    assert taken is not None and int(taken[1]) > 0, text[-3000:]


def pause_outside_a_write(proc: subprocess.Popen[bytes], db_file: Path) -> None:
    """SIGSTOP ``proc`` at a moment it holds no SQLite write lock. SQLite has one write lock per
    file, and a process paused inside a write transaction keeps it until it resumes: every other
    writer waits (docs/limits.md). The test is about a trainer paused while it trains, so
    pause it again until the lock is free (a write takes milliseconds; CI once caught one)."""
    for _ in range(50):
        proc.send_signal(signal.SIGSTOP)
        con = sqlite3.connect(db_file, timeout=1.0)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.rollback()
            return
        except sqlite3.OperationalError:
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        finally:
            con.close()
    raise AssertionError("the trainer held SQLite's write lock at 50 pauses in a row")


@pytest.mark.slow  # two trainer processes, one stopped past its lease
def test_a_trainer_stopped_past_its_lease_promotes_nothing_when_it_resumes(tmp_path: Path) -> None:
    # SIGSTOP freezes trainer A mid-training with texts claimed; B, its standby, takes the lease
    # once it runs out, trains those texts and promotes. SIGCONT: A finds its lease gone (fencing
    # token refused) and stands down; nothing it writes lands, and every text trains once.
    data, logs = tmp_path / "data", [tmp_path / "train-a.log", tmp_path / "train-b.log"]
    env = {"LLMOS_TRAIN__TRAINER_LEASE_S": "3", "LLMOS_TRAIN__PASSES_PER_BATCH": "60"}
    a = start_trainer(data, logs[0], env)
    b = None
    try:
        wait_for(lambda: "holds the trainer lease" in logs[0].read_text(), timeout=90, interval=0.2)
        b = start_trainer(data, logs[1], env)
        wait_for(lambda: "standby:" in logs[1].read_text(), timeout=90, interval=0.2)
        settings = make_settings(data)
        db = Database(settings.store_url)
        queue = SampleQueue(db)
        ids = queue.enqueue([NewSample(f"{PROMPT} is {FACT}, copy {i}.") for i in range(24)])
        training = SampleStatus.training.value
        wait_for(lambda: queue.counts().by_status.get(training, 0) > 0, timeout=60, interval=0.05)
        pause_outside_a_write(a, data / "llmos.db")
        try:
            wait_for(lambda: "promoted:" in logs[1].read_text(), timeout=120, interval=0.2)  # B took over
        except AssertionError:
            raise AssertionError("\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)) from None
        finally:
            resumed_at = len(logs[0].read_bytes())
            a.send_signal(signal.SIGCONT)
        wait_for(lambda: "lost the trainer lease" in logs[0].read_text()[resumed_at:], timeout=30, interval=0.2)
        left = (training, SampleStatus.queued.value)
        wait_for(lambda: not any(queue.counts().by_status.get(k, 0) for k in left), timeout=120, interval=0.2)
        after = logs[0].read_text()[resumed_at:]
        assert "promoted:" not in after, after  # A wrote nothing once resumed
        statuses = {queue.get(i).status for i in ids}  # type: ignore[union-attr]
        assert statuses <= {SampleStatus.trained, SampleStatus.heldout}, statuses
        db.dispose()
    finally:
        stop(a, b)


@pytest.mark.slow  # torchrun, then a trainer alone
def test_kill_9_of_one_rank_mid_step_stops_the_group_and_loses_no_text(tmp_path: Path) -> None:
    # Rank 1 dies mid-step: torchrun stops the whole group; the texts rank 0 had claimed go back
    # to the queue (at once when rank 0 stops cleanly, else after train.lease_s), and the next
    # trainer trains every one of them.
    data, log = tmp_path / "data", tmp_path / "torchrun.log"
    group = start_torchrun(data, log, {"LLMOS_TRAIN__PASSES_PER_BATCH": "200", "LLMOS_TRAIN__LEASE_S": "5"})
    alone = None
    try:
        pid = wait_for(lambda: re.search(r"rank 1 of 2 \(gloo\), pid (\d+)", log.read_text()), timeout=120)
        wait_for(lambda: "holds the trainer lease" in log.read_text(), timeout=120, interval=0.2)
        db = Database(make_settings(data).store_url)
        queue = SampleQueue(db)
        ids = queue.enqueue([NewSample(f"{PROMPT} is {FACT}, copy {i}.") for i in range(24)])
        training = SampleStatus.training.value
        wait_for(lambda: queue.counts().by_status.get(training, 0) > 0, timeout=60, interval=0.05)
        time.sleep(1.0)  # mid-step: rank 1 is in its share of a step or waiting on rank 0's next one
        os.kill(int(pid[1]), signal.SIGKILL)
        assert group.wait(120) != 0  # the group stops: a rank failed
        alone = start_trainer(data, tmp_path / "train.log", {"LLMOS_TRAIN__LEASE_S": "5"})
        left = (training, SampleStatus.queued.value)
        wait_for(lambda: not any(queue.counts().by_status.get(k, 0) for k in left), timeout=180, interval=0.5)
        statuses = {queue.get(i).status for i in ids}  # type: ignore[union-attr]
        assert statuses <= {SampleStatus.trained, SampleStatus.heldout}, statuses
        db.dispose()
    finally:
        stop(group, alone)


def test_the_trainer_alone_hears_of_a_rollback_that_lands_before_a_poll_saw_the_promotion() -> None:
    """The replica's rollback undoes a promotion the trainer's watch never polled in between (the
    active version went 0 -> 1 -> 0 between two polls): the watch still sends the trainer back,
    since it compares the active version with the trainer's own, not with the last one it saw."""
    from llmos.trainer.alone import RollbackWatch

    class Registry:
        active = 0
        parents: ClassVar[dict[int, int | None]] = {0: None, 1: 0, 2: 1}

        def active_version(self) -> int:
            return self.active

        def lineage(self, version: int) -> set[int]:
            out, v = set(), version
            while v is not None:
                out.add(v)
                v = self.parents[v]
            return out

    class Trainer:
        base_version = 0
        resets = 0

        def request_reset(self) -> None:
            self.resets += 1

    registry, trainer = Registry(), Trainer()
    watch = RollbackWatch(registry, trainer)  # type: ignore[arg-type]
    assert watch.sync() == 0 and trainer.resets == 0
    trainer.base_version = registry.active = 1  # promoted by the trainer, then...
    registry.active = 0  # ...rolled back through a replica before the next poll
    assert watch.sync() == 0 and trainer.resets == 1
    assert watch.sync() == 0 and trainer.resets == 1  # asked once
    trainer.base_version = registry.active = 2  # a promotion along the line is not a rollback
    registry.parents[2] = 0
    assert watch.sync() == 2 and trainer.resets == 1
