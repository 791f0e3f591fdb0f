"""A PostgreSQL restart under a running server: while the store is down every request that needs it
gets 503 with Retry-After (never 500), what was acknowledged before is kept, and the server
recovers by itself once the store is back, the trainer included. A PostgreSQL of the test's own
(initdb, pg_ctl), so that it can be stopped without touching the shared one."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_for
from helpers import Poster, start_server, start_trainer

pytestmark = pytest.mark.slow  # a server and a PostgreSQL of its own, restarted


class PrivatePostgres:
    """A PostgreSQL cluster in a temporary directory, on a free loopback port, trust auth. As root
    it runs as the ``postgres`` user (the server refuses root)."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        if not bins and shutil.which("pg_ctl") is None:
            pytest.fail("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
        self.bin = Path(bins[-1]) if bins else Path(str(shutil.which("pg_ctl"))).parent
        self.dir = Path(tempfile.mkdtemp(prefix="llmos-pg-"))
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            pg = pwd.getpwnam("postgres")
            os.chown(self.dir, pg.pw_uid, pg.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        # fast: connections are cut at once, as an operator's restart or a failover does
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    pg.start()
    try:
        yield pg
    finally:
        pg.remove()


@pytest.mark.parametrize("roles", ["serve", "api replica and llmos train"])
def test_a_postgresql_restart_gives_503s_then_the_server_recovers_and_keeps_every_acked_text(
    tmp_path: Path, postgres: PrivatePostgres, roles: str
) -> None:
    port, log = free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    env = {"LLMOS_STORE__URL": postgres.url}
    trainer = None
    if roles == "serve":
        proc = start_server(tmp_path / "data", port, log, env)
    else:  # scaled out: the API replica answers, the trainer alone trains; both ride out the restart
        proc = start_server(tmp_path / "data", port, log, env, args=["--role", "api"])
        trainer = start_trainer(tmp_path / "data", tmp_path / "trainer.log", env)
    poster = Poster(url)
    try:
        if trainer is not None:  # the trainer is running when the store goes (one that starts then waits for it)
            wait_until_remote(url)
        poster.thread.start()
        wait_for(lambda: len(poster.acked) >= 20, timeout=60)

        postgres.stop()
        down = time.monotonic()
        wait_for(lambda: poster.since(down).count(503) >= 5, timeout=30)
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/healthz").status_code == 200  # alive: a restart would not help
            ready = c.get("/readyz")
            assert ready.status_code == 503, ready.text
            gen = c.get("/generate", params={"prompt": "The tide", "max_new_tokens": 4})
            assert gen.status_code == 503 and gen.headers.get("retry-after"), gen.text
        time.sleep(2)

        postgres.start()
        up = time.monotonic()
        wait_for(lambda: 202 in poster.since(up), timeout=10, interval=0.05)
        recovered_in = min(when for when, code, _ in poster.answers if when >= up and code == 202) - up
        with httpx.Client(base_url=url, timeout=30) as c:
            wait_for(lambda: c.get("/readyz").status_code == 200, timeout=10)
        time.sleep(1)
        poster.stop.set()
        poster.thread.join(30)

        during = [(code, retry) for when, code, retry in poster.answers if down <= when < up]
        assert during and all(code in (202, 503) for code, _ in during), during  # never a 500, never a reset
        assert all(retry for code, retry in during if code == 503), "a 503 without Retry-After"
        assert all(code in (202, 503) for _, code, _ in poster.answers), poster.answers
        print(
            f"{len(during)} answers while down ({sum(c == 503 for c, _ in during)} were 503); "
            f"the first 202 {recovered_in:.2f}s after PostgreSQL was back"
        )

        # Every acknowledged text is in the store, and the trainer, back too, trains them.
        with httpx.Client(base_url=url, timeout=30) as c:
            last = poster.acked[-1]
            wait_for(lambda: c.get(f"/v1/texts/{last}").json()["status"] == "trained", timeout=120, interval=0.5)
            missing = [i for i in poster.acked if c.get(f"/v1/texts/{i}").status_code != 200]
        assert not missing, missing
    finally:
        poster.stop.set()
        for p in (proc, trainer):
            if p is None:
                continue
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_until_remote(url: str) -> None:
    """Until the replica says a trainer holds the store (``llmos train`` has started)."""
    with httpx.Client(base_url=url, timeout=30) as c:
        wait_for(lambda: c.get("/v1/trainer").json()["state"] == "remote", timeout=120, interval=0.5)


def test_llmos_train_started_while_postgresql_is_down_waits_for_it_then_trains(
    tmp_path: Path, postgres: PrivatePostgres
) -> None:
    """A trainer started beside its database (compose starts both at once) or during a restart of
    it: it waits, says so, and trains once the store answers, instead of exiting."""
    port = free_port()
    env = {"LLMOS_STORE__URL": postgres.url}
    postgres.stop()
    trainer = start_trainer(tmp_path / "data", tmp_path / "trainer.log", env)
    proc = None
    try:
        wait_for(lambda: "waiting for it" in (tmp_path / "trainer.log").read_text(), timeout=120, interval=0.5)
        assert trainer.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
        postgres.start()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(tmp_path / "data", port, tmp_path / "server.log", env, args=["--role", "api"])
        wait_until_remote(url)
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/texts", json={"text": "The tide at Orn turns at nine."})
            assert r.status_code == 202, r.text
            sid = r.json()["ids"][0]
            wait_for(lambda: c.get(f"/v1/texts/{sid}").json()["status"] in ("trained", "heldout"), timeout=120)
    finally:
        for p in (proc, trainer):
            if p is None:
                continue
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
