"""Load: 32 clients, each with its own API key, against the real `llmos serve` process, mixing
ingest and generation while the trainer trains: 120 s of warm-up, then 60 s more. Zero errors, and
the server's resident memory over the last 20 s at most 1.30x that of the 20 s after warm-up (each
the peak of RSS sampled four times a second). bench/load.py runs the same load and writes the
figures to bench/results/load.md.

Why peaks over windows: one RSS sample lands anywhere in a training step, whose working set swings
by ~55 MiB (8% of the process) on the built-in model.

Why 1.30 and not 1.10 (not settled; see the session 4 note): resident memory still grows in steps
of up to ~135 MiB at unpredictable times in the first three minutes. glibc's per-thread malloc
arenas (up to 8 per core) appear as request threads come and each keeps a few to tens of MiB (seen
in /proc/<pid>/smaps and malloc_stats). In 17 runs (30-120 s warm-ups) the ratio was 0.98-1.24:
1.151 and 1.240 with a 60 s warm-up, 1.177 with this one (in CI). In 150-210 s runs most of the
growth came before 120 s, but not always. What fills is not known: malloc_trim after each cycle,
MALLOC_ARENA_MAX=2 and a smaller oneDNN kernel cache did not stop it. So this check catches a leak
of more than ~30% a minute, not a slow one; bench/load.md reports the figure.
"""

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
@pytest.mark.timeout(500)
def test_32_clients_for_60_s_after_warm_up_no_errors_and_flat_memory(tmp_path: Path) -> None:
    data, log, port = tmp_path / "data", tmp_path / "server.log", free_port()
    # ~500 texts/s are acknowledged and the trainer takes few: lift the queue bound (tested elsewhere)
    # so that its 429s do not end the run
    env = {"LLMOS_AUTH__API_KEYS": json.dumps(KEYS), "LLMOS_LIMITS__MAX_QUEUE_DEPTH": "1000000"}
    proc = start_server(data, port, log, env)
    try:
        report = run_load(f"http://127.0.0.1:{port}", proc.pid, KEYS, duration_s=60, warmup_s=120)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            trainer = c.get("/v1/trainer", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    warm, end = report.rss_after_warmup, report.rss_end
    print(
        f"requests {report.requests}, errors {len(report.errors)}, texts acknowledged {report.texts_acknowledged}; "
        f"RSS peak after warm-up {warm / 1024:.0f} MiB, at the end {end / 1024:.0f} MiB ({end / warm:.3f}x); "
        f"trainer at step {trainer['step']}, version {trainer['active_version']}"
    )
    assert report.errors == [], report.errors[:10]
    assert report.requests.get("ingest", 0) > 0 and report.requests.get("generate", 0) > 0
    assert trainer["step"] > 0, "the trainer did not train under load"
    # Memory leaks found this way: the bf16 kernels cached for every block length (now padded to
    # a few shapes), SQLite page caches of 30 pooled connections, the tokenizer's per-text cache.
    assert end / warm <= 1.30, f"resident memory grew {end / warm:.3f}x after warm-up"
    assert rc == 0
