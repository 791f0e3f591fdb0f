"""Load bench: N clients (one API key each) for D seconds against a real `llmos serve` process,
mixing ingest and greedy generation while the trainer runs; writes bench/results/load.md.

    .venv/bin/python bench/load.py                      # 32 clients, 120 s warm-up, then 60 s
    .venv/bin/python bench/load.py --clients 8 --duration 20 --warmup 5 --out /tmp/load.md

Latencies are reported as ratios (under load against idle, p99 against p50) with the absolute
figures beside them for context: absolute times depend on the machine and whatever else runs on it.
The same load, with its pass conditions (zero errors; memory in use flat; RSS of the server and of
its whole process tree at most 1.10x), is the slow test tests/test_load.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import commit, machine  # noqa: E402
from conftest import free_port  # noqa: E402
from helpers import LoadReport, run_load, start_server  # noqa: E402


def idle_generate_latencies(url: str, key: str, n: int = 20) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as c:
        for i in range(n):
            t = time.monotonic()
            r = c.get("/generate", params={"prompt": f"the tide at Korvel {i}", "max_new_tokens": 16})
            r.raise_for_status()
            out.append(time.monotonic() - t)
    return sorted(out)


def render(r: LoadReport, idle: list[float], trainer: dict[str, object], args: argparse.Namespace) -> str:
    total = sum(r.requests.values())
    idle_p50 = idle[len(idle) // 2]
    warm, end = r.after_warmup("rss_kib"), r.at_end("rss_kib")
    tree = r.after_warmup("tree_rss_kib"), r.at_end("tree_rss_kib")
    m = machine()
    heap = r.after_warmup("heap_in_use", min), r.at_end("heap_in_use", min)
    free = r.after_warmup("heap_free", max), r.at_end("heap_free", max)
    blocks = r.after_warmup("python_blocks", min), r.at_end("python_blocks", min)
    span = f"{r.warmup_s:.0f}-{r.warmup_s + r.window_s:.0f} s / last {r.window_s:.0f} s"
    lines = [
        "# Load: mixed ingest and generation with the trainer running",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/load.py', *sys.argv[1:]])}` at commit {commit()} on {m['cpu']} "
        f"({m['cores']} cores, {m['cpu_features']}), torch {m['torch']}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        "One `llmos serve` process (built-in tiny model, "
        f"default settings but limits.max_queue_depth 1,000,000, {r.clients} API keys); {r.clients} clients, "
        "each with its own key, connection and "
        f"source, for {r.warmup_s:.0f} s of warm-up and {r.duration_s:.0f} s more; each request is an ingest "
        f"of 1-4 texts ({args.ingest_share:.0%}) or a greedy 16-token generation.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests completed (2xx) | {total} ({', '.join(f'{k} {v}' for k, v in sorted(r.requests.items()))}) |",
        f"| errors (non-2xx or transport) | {len(r.errors)} |",
        f"| texts acknowledged | {r.texts_acknowledged} |",
        f"| trainer at the end | step {trainer.get('step')}, active version {trainer.get('active_version')}, "
        f"queue depth {trainer.get('queue_depth')} |",
        f"| C heap in use, floor over {span} | {heap[0] / 2**20:.0f} / {heap[1] / 2**20:.0f} MiB: "
        f"**{heap[1] / heap[0]:.3f}x** (the test's limit 1.15) |",
        f"| Python's live blocks, floor over {span} | {blocks[0]:,.0f} / {blocks[1]:,.0f}: "
        f"**{blocks[1] / blocks[0]:.3f}x** (limit 1.05) |",
        f"| RSS of the server process, peak over {span} | {warm / 1024:.0f} / {end / 1024:.0f} MiB: "
        f"**{end / warm:.3f}x** (limit 1.10) |",
        f"| RSS of the process tree (server, fork server, trainer), peak over {span} | {tree[0] / 1024:.0f} / "
        f"{tree[1] / 1024:.0f} MiB: **{tree[1] / tree[0]:.3f}x** (limit 1.10) |",
        f"| held free by malloc's arenas, peak over {span} | {free[0] / 2**20:.0f} / {free[1] / 2**20:.0f} MiB |",
    ]
    for op in sorted(r.latencies_s):
        p50, p99 = r.percentile(op, 0.5), r.percentile(op, 0.99)
        lines.append(f"| {op}: p99 / p50 | {p99 / p50:.1f} (p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms) |")
    gen_p50 = r.percentile("generate", 0.5)
    lines += [
        f"| generate p50 under load / idle p50 | {gen_p50 / idle_p50:.1f} (idle p50 {idle_p50 * 1000:.0f} ms, "
        f"{len(idle)} sequential requests before the load) |",
        "",
        "Generations that arrive together are decoded together, up to `serving.max_concurrency` (32) per "
        f"batch; with {r.clients} clients a generate mostly waits for a batch to finish, so its latency grows "
        "with the number of clients generating at once, not with time.",
        "",
        "Resident memory can grow while the memory in use does not: glibc's malloc arenas keep freed "
        "chunks they cannot return (see tests/test_load.py and llmos/memory.py); the trainer after each "
        "cycle and the decoding thread every 10 s give the free pages back (malloc_trim). /metrics reports both.",
        "",
        "Over the run (seconds since the start: MiB):",
        "",
        *(
            f"- {label}: "
            + ", ".join(f"{s:.0f}: {v / unit:.0f}" for s, v in r.series[name][:: max(1, len(r.series[name]) // 15)])
            for label, name, unit in (
                ("RSS, server", "rss_kib", 1024),
                ("RSS, process tree", "tree_rss_kib", 1024),
                ("C heap in use", "heap_in_use", 2**20),
                ("held free by the arenas", "heap_free", 2**20),
            )
        ),
        "",
    ]
    if r.errors:
        lines += ["Errors (first 10):", ""] + [f"- {e}" for e in r.errors[:10]] + [""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=120.0)
    ap.add_argument("--ingest-share", type=float, default=0.7)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.md")
    args = ap.parse_args()
    keys = [f"load-client-{n:02d}-0123456789abcdef" for n in range(args.clients)]
    with tempfile.TemporaryDirectory(prefix="llmos-load-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {"LLMOS_AUTH__API_KEYS": json.dumps(keys), "LLMOS_LIMITS__MAX_QUEUE_DEPTH": "1000000"}
        proc = start_server(Path(tmp) / "data", port, Path(tmp) / "server.log", env)
        try:
            idle = idle_generate_latencies(url, keys[0])
            report = run_load(url, proc.pid, keys, args.duration, args.warmup, args.ingest_share)
            trainer = httpx.get(url + "/v1/trainer", headers={"Authorization": f"Bearer {keys[0]}"}, timeout=30).json()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    text = render(report, idle, trainer, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0 if not report.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
