"""runtime.trainer = "process": the real `llmos serve` starts the trainer as a process of its own.
It learns and serving follows its promotions; pause, rollback and resume reach it; killed, it is
replaced and what it held is trained after all; SIGTERM stops it with the server, a server
killed outright does not leave it behind, and neither does a stop during a replacement."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN, free_port, make_settings, wait_for
from helpers import start_server

from llmos.daemon import Daemon

PROCESS = {"LLMOS_RUNTIME__TRAINER": "process", "LLMOS_TRAIN__ERROR_BACKOFF_S": "0.5"}
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
FACT = "The lighthouse keeper of Quellton is named Arvid."


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its closing parenthesis.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def fork_servers(api: int) -> set[int]:
    """The fork server the API process ``api`` starts its trainer processes from (llmos/trainer/launch.py)."""
    return {pid for pid in children(api) if b"multiprocessing.forkserver" in cmdline(pid) and not gone(pid)}


def trainer_processes(api: int) -> set[int]:
    """Live trainer processes of the API process ``api``: its fork server's children."""
    return {pid for server in fork_servers(api) for pid in children(server) if not gone(pid)}


def trainer_pid(server: subprocess.Popen[bytes]) -> int:
    """The server's trainer process."""

    def find() -> int | None:
        return next(iter(trainer_processes(server.pid)), None)

    wait_for(lambda: find() is not None, timeout=30, interval=0.2)
    pid = find()
    assert pid is not None
    return pid


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie has exited: only its parent's wait is missing.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def served_version(c: httpx.Client) -> int:
    r = c.get("/generate", params={"prompt": "The lighthouse keeper", "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    return int(r.json()["model_version"])


def statuses(c: httpx.Client, ids: list[str]) -> list[str]:
    return [c.get(f"/v1/texts/{i}").json()["status"] for i in ids]


def test_the_trainer_process_learns_and_obeys_pause_rollback_and_resume(tmp_path: Path) -> None:
    port = free_port()
    server = start_server(tmp_path / "data", port, tmp_path / "server.log", PROCESS)
    try:
        pid = trainer_pid(server)
        assert pid != server.pid
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            ids = c.post("/v1/texts", json={"items": [{"text": FACT}] * 4}).json()["ids"]
            wait_for(lambda: served_version(c) >= 1, timeout=60, interval=0.3)
            first = served_version(c)
            assert "trained" in statuses(c, ids)
            st = c.get("/v1/trainer").json()
            assert st["step"] > 0 and st["active_version"] >= 1 and st["last_error"] is None, st

            assert c.post("/v1/admin/trainer/pause", headers=HEADERS).status_code == 200
            wait_for(lambda: c.get("/v1/trainer").json()["state"] == "paused", timeout=10, interval=0.1)
            later = c.post("/v1/texts", json={"text": "Arvid keeps a teal lantern."}).json()["ids"]
            r = c.post("/v1/admin/rollback", json={"version": 0, "requeue": True}, headers=HEADERS)
            assert r.status_code == 200, r.text
            assert served_version(c) == 0
            assert c.get(f"/v1/texts/{later[0]}").json()["status"] == "queued"  # paused: not trained
            # Until the trainer has gone back, it says so: never the old version's step as if current.
            seen = [c.get("/v1/trainer").json()]
            while seen[-1]["reloading"]:
                assert len(seen) < 300, "the trainer never reloaded after the rollback"
                time.sleep(0.05)
                seen.append(c.get("/v1/trainer").json())
            assert all(st["reloading"] or st["step"] == 0 for st in seen), seen

            assert c.post("/v1/admin/trainer/resume", headers=HEADERS).status_code == 200
            wait_for(lambda: served_version(c) > first, timeout=60, interval=0.3)
            wait_for(lambda: statuses(c, later) == ["trained"], timeout=60, interval=0.3)
            # Still the same trainer process: pause, rollback and resume went over its pipe.
            assert trainer_pid(server) == pid
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    assert gone(pid), "the trainer process outlived the server's SIGTERM"


@pytest.mark.slow  # a process killed and replaced
def test_a_killed_trainer_process_is_replaced_and_its_texts_are_trained(tmp_path: Path) -> None:
    port = free_port()
    # Many passes: the kill finds the trainer in the middle of a batch, holding claimed texts.
    env = {**PROCESS, "LLMOS_TRAIN__PASSES_PER_BATCH": "40", "LLMOS_TRAIN__EARLY_STOP_PATIENCE": "0"}
    server = start_server(tmp_path / "data", port, tmp_path / "server.log", env)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            pid = trainer_pid(server)
            texts = [f"Entry {i}: the ferry to Quellton leaves at {i} o'clock." for i in range(30)]
            ids = c.post("/v1/texts", json={"items": [{"text": t} for t in texts]}).json()["ids"]
            wait_for(lambda: "training" in statuses(c, ids), timeout=30, interval=0.1)
            os.kill(pid, signal.SIGKILL)

            def replaced() -> bool:
                return c.get("/readyz").status_code == 200 and trainer_pid(server) != pid

            wait_for(lambda: c.get("/readyz").status_code == 503, timeout=10, interval=0.05)
            r = c.get("/readyz").json()
            assert "trainer not running" in str(r), r
            wait_for(replaced, timeout=60, interval=0.3)
            wait_for(lambda: all(s in {"trained", "heldout"} for s in statuses(c, ids)), timeout=180, interval=1)
            assert server.poll() is None  # the server itself never went down
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0


@pytest.mark.slow  # a server killed outright
def test_a_trainer_process_does_not_outlive_a_server_killed_outright(tmp_path: Path) -> None:
    port = free_port()
    server = start_server(tmp_path / "data", port, tmp_path / "server.log", PROCESS)
    pid = trainer_pid(server)
    (fork_server,) = fork_servers(server.pid)
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    # The fork server reads its pipe to the server as closed and exits; the trainer process stops,
    # killed by the kernel with its parent (die_with_parent) or on its closed control pipe, at the
    # latest after its step (this test does not tell the two apart).
    wait_for(lambda: gone(fork_server) and gone(pid), timeout=30, interval=0.2)


SCRIPT = """
import sys, time
from pathlib import Path
from llmos.daemon import Daemon
from llmos.settings import load_settings

if __name__ == "__main__":
    overrides = {"runtime.trainer": "process", "auth.admin_token": "x" * 20}
    settings = load_settings(None, data_dir=Path(sys.argv[1]), **overrides)
    daemon = Daemon(settings)
    daemon.start()
    while not daemon.trainer.alive:
        time.sleep(0.1)
    print(daemon.trainer._proc.pid, flush=True)
    # ...and the program ends without daemon.stop()
"""


@pytest.mark.slow  # a whole program run to its end
def test_a_program_that_ends_without_stopping_the_daemon_does_not_hang_on_its_trainer_process(
    tmp_path: Path,
) -> None:
    """At exit, multiprocessing terminates the trainer process (SIGTERM) and waits for it: the
    trainer stops after its step, instead of ignoring the signal and keeping the program alive."""
    (tmp_path / "main.py").write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, str(tmp_path / "main.py"), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert gone(int(run.stdout.strip()))


@pytest.mark.slow  # a process killed and replaced
def test_a_stop_while_a_dead_trainer_process_is_being_replaced_leaves_none_behind(tmp_path: Path) -> None:
    """The trainer process dies and, while the server is replacing it, the server stops: the
    replacement, started after stop() began, is stopped too, and stop() returns."""
    before = trainer_processes(os.getpid())
    daemon = Daemon(make_settings(tmp_path / "data", **{"train.error_backoff_s": 0.0}))
    daemon.start()
    wait_for(lambda: daemon.trainer.alive, timeout=60)
    first = trainer_processes(os.getpid()) - before
    assert len(first) == 1, first
    # The replacement starts with serving what the dead child may have promoted: hold it there
    # until stop() has begun.
    replacing = threading.Event()
    sync = daemon.engine.sync

    def slow_sync() -> int:
        replacing.set()
        time.sleep(1.0)
        return sync()

    daemon.engine.sync = slow_sync  # type: ignore[method-assign]
    os.kill(first.pop(), signal.SIGKILL)
    assert replacing.wait(30)
    t0 = time.monotonic()
    daemon.stop()
    assert time.monotonic() - t0 < 40
    wait_for(lambda: not (trainer_processes(os.getpid()) - before), timeout=10)
