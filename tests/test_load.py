"""Load: 32 clients, each with its own API key, against the real `llmos serve` process, mixing
ingest and generation while the trainer trains: 30 s of warm-up, then 60 s more. Zero errors, and
the server's resident memory at the end within 10% of what it was after warm-up. bench/load.py
runs the same load and writes the figures to bench/results/load.md."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from helpers import run_load, start_server

CLIENTS = 32
KEYS = [f"load-client-{n:02d}-0123456789abcdef" for n in range(CLIENTS)]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_32_clients_for_60_s_after_warm_up_no_errors_and_flat_memory(tmp_path: Path) -> None:
    data, log, port = tmp_path / "data", tmp_path / "server.log", free_port()
    proc = start_server(data, port, log, {"LLMOS_AUTH__API_KEYS": json.dumps(KEYS)})
    try:
        report = run_load(f"http://127.0.0.1:{port}", proc.pid, KEYS, duration_s=60, warmup_s=30)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            trainer = c.get("/v1/trainer", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    warm, end = report.rss_after_warmup, report.rss_end
    print(
        f"requests {report.requests}, errors {len(report.errors)}, texts acknowledged {report.texts_acknowledged}; "
        f"RSS after warm-up {warm / 1024:.0f} MiB, at the end {end / 1024:.0f} MiB ({end / warm:.3f}x); "
        f"trainer at step {trainer['step']}, version {trainer['active_version']}"
    )
    assert report.errors == [], report.errors[:10]
    assert report.requests.get("ingest", 0) > 0 and report.requests.get("generate", 0) > 0
    assert trainer["step"] > 0, "the trainer did not train under load"
    # Memory leaks found this way: the bf16 kernels cached for every block length (now padded to
    # a few shapes), SQLite page caches of 30 pooled connections, the tokenizer's per-text cache.
    assert end / warm <= 1.10, f"resident memory grew {end / warm:.3f}x after warm-up"
    assert rc == 0
