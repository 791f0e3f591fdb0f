"""Graceful shutdown: SIGTERM to the real `python -m llmos serve` while generations are in flight
and the trainer holds a batch. The requests finish, the trainer gives its claims back, the process
exits 0 within 10 s (a service manager's usual stop timeout)."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_for
from helpers import start_server
from prometheus_client.parser import text_string_to_metric_families


def arrived(url: str) -> int:
    """Generations this server has received: finished, plus in flight (decoding or waiting)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    got = {f.name: f.samples[0].value for f in text_string_to_metric_families(text) if f.samples}
    return int(got["llmos_generations"] + got["llmos_generations_in_flight"])


@pytest.mark.parametrize(
    ("concurrency", "requests", "new_tokens"),
    [  # one at a time (slow tier: the fast tier keeps the default); batched (the default): two batches of eight
        pytest.param(1, 6, 200, marks=pytest.mark.slow),
        (8, 16, 400),
    ],
    ids=["one-at-a-time", "batched"],
)
def test_sigterm_finishes_requests_in_flight_releases_claims_and_exits_0(
    tmp_path: Path, concurrency: int, requests: int, new_tokens: int
) -> None:
    data, log, port = tmp_path / "data", tmp_path / "server.log", free_port()
    url = f"http://127.0.0.1:{port}"
    # Long training cycles, so that the trainer is sure to hold claimed texts when the signal comes,
    # and enough generation that requests queue and some are in flight at the signal.
    env = {"LLMOS_TRAIN__PASSES_PER_BATCH": "200", "LLMOS_SERVING__MAX_CONCURRENCY": str(concurrency)}
    proc = start_server(data, port, log, extra_env=env)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            items = [{"text": f"shutdown sample {i}: the lighthouse keeper counts {i} gulls."} for i in range(200)]
            assert c.post("/v1/texts", json={"items": items}).status_code == 202
            wait_for(lambda: c.get("/v1/trainer").json()["state"] == "training", timeout=60)

        signalled = threading.Event()
        finished_after_signal: list[bool] = []

        def generate(i: int) -> int:
            with httpx.Client(base_url=url, timeout=60) as hc:
                r = hc.get("/generate", params={"prompt": f"request {i} says", "max_new_tokens": new_tokens})
                finished_after_signal.append(signalled.is_set())
                return r.status_code

        with ThreadPoolExecutor(max_workers=requests) as pool:
            futures = [pool.submit(generate, i) for i in range(requests)]  # more than run at once: a queue
            # Signal once the server holds every request: one still in the listen backlog (not yet
            # accepted) is not in flight; uvicorn closes the listener at the signal, which resets it.
            wait_for(lambda: arrived(url) == requests, timeout=30)
            proc.send_signal(signal.SIGTERM)
            signalled.set()
            t0 = time.monotonic()
            codes = [f.result() for f in futures]
        rc = proc.wait(timeout=10)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert codes == [200] * requests, codes
    assert any(finished_after_signal), "no request was still in flight at the signal"
    assert rc == 0, log.read_text()[-3000:]
    print(f"stopped {stopped_in:.1f}s after SIGTERM")
    with sqlite3.connect(data / "llmos.db") as db:
        counts = dict(db.execute("SELECT status, count(*) FROM samples GROUP BY status").fetchall())
    assert counts.get("training", 0) == 0, counts  # claims released, none left for a restart to find
    assert sum(counts.values()) == 200


def test_sigterm_to_the_whole_process_group_stops_the_trainer_process_after_its_step(tmp_path: Path) -> None:
    """A service manager (systemd's default KillMode) sends SIGTERM to every process of the
    server's group at once: the fork server the trainer process comes from must not die at once
    and take the trainer with it mid-step (die_with_parent); each finishes as when told to stop."""
    data, log, port = tmp_path / "data", tmp_path / "server.log", free_port()
    env = {"LLMOS_TRAIN__PASSES_PER_BATCH": "200"}
    proc = start_server(data, port, log, extra_env=env, own_group=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            items = [{"text": f"group sample {i}: the ferry carries {i} crates."} for i in range(100)]
            assert c.post("/v1/texts", json={"items": items}).status_code == 202
            wait_for(lambda: c.get("/v1/trainer").json()["state"] == "training", timeout=60)
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 0, log.read_text()[-3000:]
    with sqlite3.connect(data / "llmos.db") as db:
        counts = dict(db.execute("SELECT status, count(*) FROM samples GROUP BY status").fetchall())
    assert counts.get("training", 0) == 0, counts  # the trainer process gave its claims back
    assert sum(counts.values()) == 100
    # A stop asked for is no failure: nothing logged as an error, and no trainer restarted.
    text = log.read_text()
    assert " ERROR " not in text and "restarting" not in text, text[-3000:]
