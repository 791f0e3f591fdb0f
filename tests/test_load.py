"""Load: 32 clients, each with its own API key, against the real `llmos serve` process, mixing
ingest and generation while the trainer trains: 120 s of warm-up, then 60 s more. Zero errors, and
memory flat: over the last 20 s against the 20 s after the warm-up, the C heap in use and Python's
live blocks (their floors, from /metrics) at most 1.15x and 1.05x, and resident memory (its peak),
of the server process and of its whole process tree (the fork server and the trainer process
included), at most 1.10x. bench/load.py runs the same load and writes the figures to
bench/results/load.md.

Why two measures. Resident memory can grow under this load while the memory in use does not: in
an 8-minute run (session 5) RSS went from ~540 to ~620 MiB while the C heap in use stayed at
165-190 MiB and Python's blocks at 1.80-1.86 million; what grew was what glibc's malloc arenas kept
free (39 -> 160 MiB). Large tensors (activations, logits, KV caches) come from the arenas once
glibc's dynamic mmap threshold has risen, and freed chunks in the middle of an arena stay resident.
A fixed threshold (MALLOC_MMAP_THRESHOLD_=65536) kept RSS flat but cost 35-45% of the trainer's
throughput (page faults on every fresh mapping). Since session 12 the trainer gives the free pages
back after each cycle, and the decoding thread every 10 s (malloc_trim, llmos/memory.py): in the
first run with it, RSS after warm-up / at the end was 534 / 534 MiB for the server and 1535 / 1533
MiB for the tree (one run, not a side-by-side comparison; in 17 runs before it, the server's RSS
end/warm was 0.98-1.24, and the limit was 1.30x). The floors of memory in use still catch a leak, slow or fast.

The C heap's floor swings too, with what the trainer holds at its quietest moment of a window:
in session 5's 8-minute run the heap in use moved between 159 and 190 MiB with nothing leaking.
On the same code in session 8, two runs gave 1.104x (a clean-clone CI run, 244 -> 270 MiB) and
1.033x (253 -> 262 MiB), so its limit is 1.15x (it was 1.10x): it fails on whatever adds more
than 15% to the heap in use between the two windows.
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
def test_32_clients_for_60_s_after_warm_up_no_errors_and_memory_in_use_flat(tmp_path: Path) -> None:
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
    rss = report.after_warmup("rss_kib"), report.at_end("rss_kib")
    tree = report.after_warmup("tree_rss_kib"), report.at_end("tree_rss_kib")
    heap = report.after_warmup("heap_in_use", min), report.at_end("heap_in_use", min)
    blocks = report.after_warmup("python_blocks", min), report.at_end("python_blocks", min)
    print(
        f"requests {report.requests}, errors {len(report.errors)}, texts acknowledged {report.texts_acknowledged}; "
        f"after warm-up / at the end: RSS peak {rss[0] / 1024:.0f} / {rss[1] / 1024:.0f} MiB ({rss[1] / rss[0]:.3f}x), "
        f"heap in use floor {heap[0] / 2**20:.0f} / {heap[1] / 2**20:.0f} MiB ({heap[1] / heap[0]:.3f}x), "
        f"Python blocks floor {blocks[0]:.0f} / {blocks[1]:.0f} ({blocks[1] / blocks[0]:.3f}x); "
        f"process tree RSS peak {tree[0] / 1024:.0f} / {tree[1] / 1024:.0f} MiB ({tree[1] / tree[0]:.3f}x); "
        f"trainer at step {trainer['step']}, version {trainer['active_version']}"
    )
    assert report.errors == [], report.errors[:10]
    assert report.requests.get("ingest", 0) > 0 and report.requests.get("generate", 0) > 0
    assert trainer["step"] > 0, "the trainer did not train under load"
    # Leaks found this way: the bf16 kernels cached for every block length (now padded to a few
    # shapes), SQLite page caches of 30 pooled connections, the tokenizer's per-text cache.
    assert heap[1] / heap[0] <= 1.15, f"the C heap in use grew {heap[1] / heap[0]:.3f}x after warm-up"
    assert blocks[1] / blocks[0] <= 1.05, f"Python's live blocks grew {blocks[1] / blocks[0]:.3f}x after warm-up"
    assert rss[1] / rss[0] <= 1.10, f"the server's resident memory grew {rss[1] / rss[0]:.3f}x after warm-up"
    assert tree[1] / tree[0] <= 1.10, f"the process tree's resident memory grew {tree[1] / tree[0]:.3f}x after warm-up"
    assert rc == 0
