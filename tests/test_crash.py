"""Acknowledged means durable: kill -9 the real `llmos serve` process right after 500
acknowledged POSTs, restart it, and find every id, nothing stuck in training, and every
checkpoint on disk loadable."""

from __future__ import annotations

import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_for
from helpers import start_server

FINAL = {"trained", "heldout", "rejected"}


@pytest.mark.slow  # the heaviest of the fast tier (35-150 s on 2 cores): CI runs it in the slow tier
def test_kill_9_after_500_acknowledged_posts(tmp_path: Path) -> None:
    data, log, port = tmp_path / "data", tmp_path / "server.log", free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(data, port, log)

    def post(i: int) -> str:
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/texts", json={"text": f"durable sample number {i}: the sky over Quellton is teal."})
            assert r.status_code == 202, r.text
            return str(r.json()["ids"][0])

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            ids = list(pool.map(post, range(500)))
        trainer_state = httpx.get(url + "/v1/trainer").json()
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to clean up
        proc.wait(10)
    assert len(set(ids)) == 500
    print("trainer at the kill:", trainer_state)

    proc = start_server(data, port, log)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            missing = [i for i in ids if c.get(f"/v1/texts/{i}").status_code != 200]
            assert missing == [], f"{len(missing)} acknowledged ids lost"

            def drained() -> bool:
                statuses = [c.get(f"/v1/texts/{i}").json()["status"] for i in ids]
                return all(s in FINAL for s in statuses)

            wait_for(drained, timeout=240, interval=2)
            statuses = [c.get(f"/v1/texts/{i}").json() for i in ids]
            assert not [s for s in statuses if s["status"] == "training"]
            print(Counter((s["status"], (s["reason"] or "")[:40]) for s in statuses))
            assert sum(s["status"] == "trained" for s in statuses) > 0
            # Whatever was not trained says why (the gate, or the optimizer's finiteness check).
            assert all(s["reason"] for s in statuses if s["status"] == "rejected")
            checkpoints = c.get("/v1/checkpoints").json()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0

    # Every checkpoint the registry lists verifies against its manifest and loads.
    from llmos.model.loader import ModelFactory
    from llmos.registry.registry import Registry
    from llmos.store.checkpoints import CheckpointIndex
    from llmos.store.db import Database

    db = Database(f"sqlite:///{data / 'llmos.db'}")
    registry = Registry(data / "checkpoints", CheckpointIndex(db))
    factory = ModelFactory(str(data / "models" / "builtin-tiny"), __import__("torch").device("cpu"))
    # (A version the gate refused is listed with its metrics and has no files: nothing to load.)
    versions = [cp["version"] for cp in checkpoints["checkpoints"] if cp["status"] != "rejected"]
    assert len(versions) >= 2
    for v in versions:
        registry.verify(v)
        factory.instance(registry.weights_path(v))
    on_disk = sorted(p.name for p in (data / "checkpoints").iterdir())
    assert not [n for n in on_disk if n.startswith(".tmp-")]
    db.dispose()
