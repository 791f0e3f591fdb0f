"""Durability and recovery: the store refuses to run without WAL + synchronous=FULL, corrupt
checkpoints are listed as such and never served, and faults injected while the real server runs
(disk full or a failing fsync while checkpointing, a NaN in a training step) leave serving alone,
say what happened, and heal once the fault is gone."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import ADMIN, LiveServer, make_settings, wait_for
from sqlalchemy import event
from typer.testing import CliRunner

import llmos.registry.registry as registry_mod
import llmos.store.db as db_mod
from llmos.registry.registry import MANIFEST, MODEL_FILE, CorruptCheckpoint, Registry, TrainerSnapshot
from llmos.settings import Settings
from llmos.store.checkpoints import CheckpointIndex
from llmos.store.db import Database, StoreNotDurable
from llmos.store.tables import CheckpointStatus

ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}


def greedy(c: httpx.Client, prompt: str = "The vault code is") -> dict[str, Any]:
    r = c.get("/generate", params={"prompt": prompt, "max_new_tokens": 16})
    assert r.status_code == 200, r.text
    return dict(r.json())


def served_digest(srv: LiveServer) -> str:
    """sha256 over the weights the serving engine holds right now."""
    h = hashlib.sha256()
    for name, t in sorted(srv.daemon.engine.current().model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def versions(c: httpx.Client) -> list[int]:
    return [cp["version"] for cp in c.get("/v1/checkpoints").json()["checkpoints"]]


def readyz(c: httpx.Client) -> dict[str, Any]:
    r = c.get("/readyz")
    assert r.status_code == 200, r.text  # a degraded server still serves: it stays in rotation
    return dict(r.json())


# ---- the store's durability check --------------------------------------------------------------


def test_the_default_store_runs_wal_with_synchronous_full(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    assert str(db.pragma("journal_mode")).lower() == "wal"
    assert db.pragma("synchronous") == 2
    db.check_durable()
    db.dispose()


@pytest.fixture
def weak_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SQLite connection ends up with synchronous=NORMAL (survives a crash, not a power cut)."""
    real = db_mod._sqlite_engine

    def weak(url: str, begin: str, busy_timeout_s: float, connections: int) -> Any:
        engine = real(url, begin, busy_timeout_s, connections)

        @event.listens_for(engine, "connect")
        def _weaken(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")

        return engine

    monkeypatch.setattr(db_mod, "_sqlite_engine", weak)


def test_daemon_refuses_to_start_when_synchronous_is_not_full(weak_sqlite: None, tmp_path: Path) -> None:
    from llmos.daemon import Daemon

    with pytest.raises(StoreNotDurable, match="synchronous=1"):
        Daemon(make_settings(tmp_path / "data"))


def test_serve_says_why_it_will_not_start_on_a_store_that_is_not_durable(
    weak_sqlite: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmos.cli import app

    for name in list(os.environ):
        if name.startswith("LLMOS_"):
            monkeypatch.delenv(name)
    result = CliRunner().invoke(app, ["serve", "--data-dir", str(tmp_path / "data"), "--port", "0"])
    assert result.exit_code == 2, result.output
    assert "synchronous=1" in result.output and "refusing to start" in result.output


# ---- corrupt checkpoints ------------------------------------------------------------------------


def publish(srv_or_registry: Registry, model: torch.nn.Module, step: int = 1) -> int:
    snap = TrainerSnapshot(step=step, samples_seen=step, optimizer=None, rng=None)
    rec = srv_or_registry.publish(model, snap, parent=0, status=CheckpointStatus.candidate, metrics={"test": True})
    return rec.version


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_registry_lists_tampered_and_incomplete_checkpoints_as_corrupt(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    db.create_schema()
    root = tmp_path / "checkpoints"
    reg = Registry(root, CheckpointIndex(db))
    reg.open()
    model = torch.nn.Linear(4, 4)
    good, tampered, incomplete = (publish(reg, model, s) for s in (1, 2, 3))
    flip_a_byte(root / f"v{tampered:06d}" / MODEL_FILE)
    (root / f"v{incomplete:06d}" / MANIFEST).unlink()

    reg = Registry(root, CheckpointIndex(db))  # a restart
    reg.open()
    listed = {r.version: r for r in reg.list()}
    assert set(listed) == {0, good, tampered, incomplete}  # still listed, so an operator sees them
    assert listed[good].corrupt is None and listed[0].corrupt is None
    assert "model.safetensors" in (listed[tampered].corrupt or "")
    assert "manifest" in (listed[incomplete].corrupt or "")
    for v in (tampered, incomplete):
        with pytest.raises(CorruptCheckpoint):
            reg.weights_path(v)
        with pytest.raises(CorruptCheckpoint):
            reg.rollback(v)
    assert reg.active_version() == 0
    reg.rollback(good)
    assert reg.active_version() == good
    db.dispose()


def paused(srv: LiveServer) -> None:
    """Pause the server's trainer and wait until it is: it has then taken the trainer lease and
    tidied the checkpoint directory (it removes half-written versions there as it takes the
    lease), so a version this test writes from outside the trainer is not taken for one."""
    with srv.client(headers=ADMIN_H) as c:
        assert c.post("/v1/admin/trainer/pause").status_code == 200
        wait_for(lambda: c.get("/v1/trainer").json()["state"] == "paused", timeout=60, interval=0.05)


def test_corrupt_checkpoints_are_listed_refused_and_never_served(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    with LiveServer(settings) as srv:
        paused(srv)
        c_model = srv.daemon.factory.instance()
        good = publish(srv.daemon.registry, c_model, 1)
        bad = publish(srv.daemon.registry, c_model, 2)
        active_was = good
        with srv.client(headers=ADMIN_H) as c:
            assert c.post("/v1/admin/rollback", json={"version": good}).status_code == 200
    flip_a_byte(settings.data_dir / "checkpoints" / f"v{bad:06d}" / MODEL_FILE)

    with LiveServer(settings) as srv, srv.client(headers=ADMIN_H) as c:
        cps = {cp["version"]: cp for cp in c.get("/v1/checkpoints").json()["checkpoints"]}
        assert cps[bad]["corrupt"] is True and "checksum" in cps[bad]["corrupt_reason"]
        assert cps[good]["corrupt"] is False and cps[good]["corrupt_reason"] is None
        r = c.post("/v1/admin/rollback", json={"version": bad})
        assert r.status_code == 409 and "checksum" in r.json()["detail"]
        assert greedy(c)["model_version"] == active_was  # serving stays on the good version
        ready = readyz(c)
        assert ready["status"] == "degraded" and f"checkpoint {bad} is corrupt" in ready["detail"]


def test_a_corrupt_active_version_is_not_served_after_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    with LiveServer(settings) as srv:
        paused(srv)
        model = srv.daemon.factory.instance()
        v1 = publish(srv.daemon.registry, model, 1)
        with srv.client(headers=ADMIN_H) as c:
            assert c.post("/v1/admin/rollback", json={"version": v1}).status_code == 200
            assert greedy(c)["model_version"] == v1
    (settings.data_dir / "checkpoints" / f"v{v1:06d}" / MODEL_FILE).write_bytes(b"truncated")

    with LiveServer(settings) as srv, srv.client(headers=ADMIN_H) as c:
        assert greedy(c)["model_version"] == 0  # its parent, which verifies
        assert c.get("/v1/checkpoints").json()["active_version"] == 0
        entry = c.get("/v1/admin/audit").json()["entries"][0]
        assert (entry["actor"], entry["action"], entry["params"]) == (
            "system",
            "fallback",
            {"from_version": v1, "to_version": 0},
        )


# ---- faults while checkpointing ----------------------------------------------------------------


def disk_full_in_save(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """The disk fills up while the trainer state file is written: part of it lands, then ENOSPC."""

    def save_file(tensors: Any, filename: str, *args: Any, **kw: Any) -> None:
        Path(filename).write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(registry_mod, "save_file", save_file)


def fsync_fails(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """fsync reports an I/O error for files under the checkpoint directory (and only there)."""
    real = os.fsync
    root = str((settings.data_dir / "checkpoints").resolve())

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(root):
            raise OSError(errno.EIO, "fsync failed: " + os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(registry_mod.os, "fsync", fsync)


@contextmanager
def injected(fault: Callable[[pytest.MonkeyPatch, Settings], None], settings: Settings) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        fault(mp, settings)
        yield


FACT = [f"The vault code is 4{i % 3}7{i}, said the keeper." for i in range(24)]


@pytest.mark.parametrize(
    ("fault", "reason"),
    [(disk_full_in_save, "No space left on device"), (fsync_fails, "fsync failed")],
    ids=["disk-full", "fsync-error"],
)
def test_a_checkpoint_that_cannot_be_written_changes_nothing_and_heals(
    tmp_path: Path, fault: Callable[[pytest.MonkeyPatch, Settings], None], reason: str
) -> None:
    # The trainer thread: the fault is injected into this process.
    overrides = {"train.passes_per_batch": 4, "train.error_backoff_s": 0.3, "runtime.trainer": "thread"}
    settings = make_settings(tmp_path / "data", **overrides)
    root = settings.data_dir / "checkpoints"
    with LiveServer(settings) as srv, srv.client() as c:
        before, weights_before = greedy(c), served_digest(srv)
        with injected(fault, settings):
            ids = c.post("/v1/texts", json={"items": [{"text": t} for t in FACT]}).json()["ids"]
            ready = wait_for(lambda: (r := readyz(c))["status"] == "degraded" and r, timeout=90)
            assert reason in ready["detail"] and "trainer" in ready["detail"]
            assert reason in (c.get("/v1/trainer").json()["last_error"] or "")
            # Not registered, nothing half-written left behind, serving unchanged.
            assert versions(c) == [0]
            assert not [p.name for p in root.iterdir()], "leftovers of the failed write"
            after = greedy(c)
            assert (after["model_version"], after["text"]) == (before["model_version"], before["text"])
            assert served_digest(srv) == weights_before
            statuses = {c.get(f"/v1/texts/{i}").json()["status"] for i in ids}
            assert "trained" not in statuses
        # Space is back: the next cycle checkpoints normally.
        new = wait_for(lambda: [v for v in versions(c) if v > 0], timeout=120)
        wait_for(lambda: readyz(c)["status"] == "ready", timeout=60)
        for v in new:
            srv.daemon.registry.verify(v)
        wait_for(lambda: {c.get(f"/v1/texts/{i}").json()["status"] for i in ids} <= {"trained", "heldout"}, timeout=60)


# ---- a NaN in a training step ------------------------------------------------------------------


@contextmanager
def nan_in_training_forward() -> Iterator[None]:
    """Every forward pass of a model in training mode returns NaN logits (serving runs in eval mode)."""

    def hook(module: torch.nn.Module, _args: Any, output: Any) -> Any:
        if module.training and hasattr(output, "logits") and output.logits is not None:
            output["logits"] = output.logits * float("nan")
        return output

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_a_nan_step_rejects_the_batch_and_changes_no_weights(tmp_path: Path) -> None:
    # The trainer thread: the hook is installed in this process.
    settings = make_settings(tmp_path / "data", **{"train.passes_per_batch": 8, "runtime.trainer": "thread"})
    with LiveServer(settings) as srv, srv.client() as c:
        before, weights_before = greedy(c), served_digest(srv)
        with nan_in_training_forward():
            ids = c.post("/v1/texts", json={"items": [{"text": t} for t in FACT]}).json()["ids"]

            def settled() -> list[dict[str, Any]] | None:
                out = [c.get(f"/v1/texts/{i}").json() for i in ids]
                return out if all(s["status"] in ("rejected", "heldout") for s in out) else None

            statuses = wait_for(settled, timeout=90)
        rejected = [s for s in statuses if s["status"] == "rejected"]
        assert rejected, statuses
        assert all("non-finite" in s["reason"] for s in rejected), rejected
        assert versions(c) == [0]  # nothing checkpointed, nothing promoted
        after = greedy(c)
        assert (after["model_version"], after["text"]) == (before["model_version"], before["text"])
        assert served_digest(srv) == weights_before

        # The trainer went back to the served weights: clean data now trains and is promoted as usual.
        clean = c.post("/v1/texts", json={"items": [{"text": t} for t in FACT]}).json()["ids"]
        wait_for(lambda: c.get("/v1/checkpoints").json()["active_version"] > 0, timeout=120)
        top = c.get("/v1/checkpoints").json()["checkpoints"][0]
        assert top["status"] == "promoted" and top["metrics"]["train_loss"] is not None
        assert {c.get(f"/v1/texts/{i}").json()["status"] for i in clean} <= {"trained", "heldout"}


def test_a_store_locked_past_the_busy_timeout_answers_503_to_every_writer_never_500(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock (a forget job's compaction, an operator's sqlite3
    shell): writers (a post, a generation's log) wait store.busy_timeout_s, for the lock or for a
    pooled connection, and get 503 with Retry-After; once the lock is free, posting works again."""
    from concurrent.futures import ThreadPoolExecutor

    settings = make_settings(tmp_path / "data", **{"store.busy_timeout_s": 1.0})
    with LiveServer(settings) as srv, srv.client() as c:
        holder = sqlite3.connect(tmp_path / "data" / "llmos.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:

            def call(i: int) -> httpx.Response:  # posts, and generations (whose log is a write)
                if i % 2:
                    return c.get("/generate", params={"prompt": f"locked out {i}", "max_new_tokens": 2})
                return c.post("/v1/texts", json={"text": f"locked out {i}."})

            with ThreadPoolExecutor(max_workers=8) as pool:
                answers = list(pool.map(call, range(8)))
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert {r.status_code for r in answers} == {503}, [(r.status_code, r.text) for r in answers]
        assert all(r.headers["retry-after"] for r in answers)
        assert c.post("/v1/texts", json={"text": "the lock is free."}).status_code == 202
