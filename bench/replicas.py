"""Promotion to served across API replicas: two `llmos serve --role api` processes and one
`llmos train` on one store, 20 promotions (a new fact posted to one replica each time, trained
and promoted by the trainer); for each, the time from the store's active version changing to each
replica serving it. On PostgreSQL (LISTEN/NOTIFY, and the poll as the fallback) and on SQLite
(the poll alone, serving.follow_interval_s 0.5). Writes bench/results/replicas.md.

    .venv/bin/python bench/replicas.py                  # both stores, 20 promotions each
    .venv/bin/python bench/replicas.py --store postgresql --promotions 5 --out /tmp/replicas.md

The active version and each replica's served version (GET /v1/checkpoints) are read every 5 ms
by one thread each, so each latency is known to about 5 ms; it includes a replica loading the
version's weights (the built-in model: a few MB).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from common import Server, commit, machine, median, percentile  # noqa: E402

from llmos.store.checkpoints import CheckpointIndex  # noqa: E402
from llmos.store.db import Database  # noqa: E402

PG_SERVER = os.environ.get("LLMOS_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
POLL_S = 0.005


class Watch:
    """Reads a version every POLL_S in a thread; keeps when each new value was first seen."""

    def __init__(self, read: Any) -> None:
        self.read, self.first_seen, self.stop = read, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                v = self.read()
            except Exception:  # a replica busy loading, a store write in progress: read again
                v = None
            if v is not None and v not in self.first_seen:
                self.first_seen[v] = time.monotonic()
            time.sleep(POLL_S)


def fresh_pg_database() -> tuple[str, Any]:
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"llmos_bench_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(PG_SERVER, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()

    return make_url(PG_SERVER).set(database=name).render_as_string(hide_password=False), drop


def run(store: str, promotions: int, work: Path) -> dict[str, Any]:
    data = work / store / "data"
    data.mkdir(parents=True)
    drop = None
    env = {"LLMOS_TRAIN__FILL_WAIT_S": "0", "LLMOS_TRAIN__PASSES_PER_BATCH": "4", "LLMOS_TRAIN__POLL_INTERVAL_S": "0.1"}
    if store == "postgresql":
        url, drop = fresh_pg_database()
        env["LLMOS_STORE__URL"] = url
    else:
        url = f"sqlite:///{data / 'llmos.db'}"
    trainer: subprocess.Popen[bytes] | None = None
    try:
        with (
            Server(data, env, log=work / store / "api-a.log", args=["--role", "api"]) as a,
            Server(data, env, log=work / store / "api-b.log", args=["--role", "api"]) as b,
        ):
            trainer = subprocess.Popen(
                [sys.executable, "-m", "llmos", "train", "--data-dir", str(data), "--log-level", "warning"],
                env=a.env,
                stdout=(work / store / "train.log").open("ab"),
                stderr=subprocess.STDOUT,
            )
            db = Database(url)
            index = CheckpointIndex(db)
            clients = [httpx.Client(base_url=s.url, timeout=30) for s in (a, b)]
            watches = [Watch(index.active_version)] + [
                Watch(lambda c=c: c.get("/v1/checkpoints").json()["served_version"]) for c in clients
            ]
            latencies: list[list[float]] = [[], []]
            refused = 0
            try:
                for i in range(promotions):
                    before = index.active_version() or 0
                    fact = f"The capital of Zorb{i:02d}ia is Quel{i:02d}ton."
                    r = clients[i % 2].post("/v1/texts", json={"items": [{"text": fact}] * 4})
                    r.raise_for_status()
                    deadline = time.monotonic() + 120
                    while (index.active_version() or 0) <= before and time.monotonic() < deadline:
                        time.sleep(0.05)
                    version = index.active_version() or 0
                    if version <= before:
                        refused += 1  # not promoted in time (refused by the gate, or slow): no latency
                        continue
                    served_deadline = time.monotonic() + 30
                    while time.monotonic() < served_deadline and not all(
                        any(v >= version for v in w.first_seen) for w in watches[1:]
                    ):
                        time.sleep(0.01)
                    promoted = min(t for v, t in watches[0].first_seen.items() if v >= version)
                    for k, w in enumerate(watches[1:]):
                        seen = [t for v, t in w.first_seen.items() if v >= version]
                        latencies[k].append((min(seen) - promoted) if seen else float("inf"))
            finally:
                for w in watches:
                    w.stop.set()
                for c in clients:
                    c.close()
                db.dispose()
    finally:
        if trainer is not None:
            trainer.terminate()
            trainer.wait(60)
        if drop is not None:
            drop()
    both = [max(x, y) for x, y in zip(latencies[0], latencies[1], strict=True)]
    return {"store": store, "promotions": promotions, "not_promoted": refused, "latencies": latencies, "both": both}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", choices=["postgresql", "sqlite"], nargs="*", default=["postgresql", "sqlite"])
    ap.add_argument("--promotions", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "replicas.md")
    args = ap.parse_args()
    t0, m = time.monotonic(), machine()
    with tempfile.TemporaryDirectory(prefix="llmos-replicas-") as tmp:
        results = [run(s, args.promotions, Path(tmp)) for s in args.store]
    lines = [
        "# Promotion to served across API replicas",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC at commit {commit()} on {m['cpu']} ({m['cores']} cores), "
        f"torch {m['torch']}; whole run {time.monotonic() - t0:.0f} s.",
        f"Command: `.venv/bin/python bench/replicas.py --promotions {args.promotions}`. Two `llmos serve --role api` "
        "and one `llmos train` on one store and data directory (built-in model, train.passes_per_batch 4, "
        "train.fill_wait_s 0); each promotion: a new fact posted 4 times to one replica, in turn. Latency: from "
        f"the store's active version changing to a replica serving it, each read every {POLL_S * 1000:.0f} ms.",
        "",
        "| store | how replicas learn of it | promotions | replica A p50 / p99 | replica B p50 / p99 "
        "| both p50 / p99 |",
        "|---|---|---|---|---|---|",
    ]
    how = {"postgresql": "LISTEN/NOTIFY (poll every 0.5 s as fallback)", "sqlite": "poll every 0.5 s"}
    for r in results:
        a, b, both = r["latencies"][0], r["latencies"][1], r["both"]

        def ms(xs: list[float]) -> str:
            return f"{median(xs) * 1000:.0f} / {percentile(xs, 99) * 1000:.0f} ms" if xs else "–"

        n = f"{len(both)} of {r['promotions']}" + (f" ({r['not_promoted']} not promoted)" if r["not_promoted"] else "")
        lines.append(f"| {r['store']} | {how[r['store']]} | {n} | {ms(a)} | {ms(b)} | {ms(both)} |")
    lines += ["", "Goal (issue 20): every replica serves a promotion or rollback within 1 s."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
