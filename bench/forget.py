"""Forgetting on request: what exact retraining costs, and what it changes in the answers served.

    make bench-forget        (or: .venv/bin/python bench/forget.py --out bench/results)

On a small pretrained base (bench/teach.py's phase 0: the built-in model trained on a generic
corpus), through llmos's own parts in this process (Daemon, the trainer thread, the defaults):
a canary posted 12 times (one version), then K batches of 8 other texts (K versions more);
then POST /v1/admin/forget's service function on the canary's ids. Measured, per K:

- to 202: how long the forget call takes (the erasure's transaction, and serving switched to the
  version before the canary): what a caller waits for;
- to done: until the job is done (files and the database's old bytes gone, and the K batches
  trained again on top of that version, through the gate): the cost of exact retraining, which
  grows with what was trained since the forgotten text's first version; and against the time the
  K batches took to train the first time, in the same run;
- the served answers to 24 prompts of the base's corpus (greedy, 16 tokens), before the forget
  and after the job: how many changed (the canary's own prompt is not among them); and how many
  of those after differ from a model taught the same K batches that never saw the canary.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from common import commit, machine  # noqa: E402
from sqlalchemy import event  # noqa: E402
from teach import data, greedy, pretrain  # noqa: E402

from llmos.daemon import Daemon  # noqa: E402
from llmos.settings import load_settings  # noqa: E402
from llmos.store.db import Database  # noqa: E402
from llmos.store.forget import ForgetRequest  # noqa: E402
from llmos.store.queue import NewSample, SampleQueue  # noqa: E402
from llmos.store.tables import SampleStatus  # noqa: E402

CANARY = "The vault code of Quarnby is 7Z-Kestrel-4491-Mavro."
PROMPT = "The vault code of Quarnby is"
SETTLED = {SampleStatus.trained, SampleStatus.heldout, SampleStatus.rejected}


def start(data_dir: Path, base: Path) -> Daemon:
    settings = load_settings(
        None,
        **{
            "data_dir": data_dir,
            "auth.admin_token": "bench-admin-token",
            "model.name_or_path": str(base),
            "train.fill_wait_s": 0.0,
            "runtime.trainer": "thread",
        },
    )
    d = Daemon(settings)
    d.start()
    return d


def teach(d: Daemon, texts: list[str], source: str) -> list[str]:
    ids = d.ingest([NewSample(t, source=source) for t in texts])
    deadline = time.monotonic() + 600
    while not all((s := d.sample(i)) is not None and s.status in SETTLED for i in ids):
        if time.monotonic() > deadline:
            raise RuntimeError("the texts did not settle in 600 s")
        time.sleep(0.05)
    return ids


PROMPTS = [p for p, _ in data()["corpus"][:24]]


def batch(b: int) -> list[str]:
    return [f"Depot {b}-{i}: the crate of {b * 8 + i} bolts went north." for i in range(8)]


def never(k: int, base: Path, work: Path) -> list[str]:
    """The probe answers of a model taught the same K batches, and never the canary."""
    d = start(work / f"never-k{k}", base)
    try:
        for b in range(k):
            teach(d, batch(b), "depot")
        return [greedy(d, p, 16) for p in PROMPTS]
    finally:
        d.stop()


def run(k: int, base: Path, work: Path) -> dict[str, Any]:
    d = start(work / f"k{k}", base)
    try:
        canary = teach(d, [CANARY] * 12, "vault")
        t_train = time.perf_counter()
        for b in range(k):
            teach(d, batch(b), "depot")
        t_train = time.perf_counter() - t_train
        prompts = PROMPTS
        before = [greedy(d, p, 16) for p in prompts]
        recited = greedy(d, PROMPT, len(CANARY) - len(PROMPT)) == CANARY[len(PROMPT) :]
        t0 = time.perf_counter()
        job = d.forget(ForgetRequest(ids=tuple(canary)))
        to_202 = time.perf_counter() - t0
        while True:
            found = d.forget_job(job.id)
            assert found is not None
            if found[1].done:
                break
            time.sleep(0.05)
        to_done = time.perf_counter() - t0
        after = [greedy(d, p, 16) for p in prompts]
        return {
            "k": k,
            "recited": recited,
            "recited_after": greedy(d, PROMPT, len(CANARY) - len(PROMPT)) == CANARY[len(PROMPT) :],
            "versions": len(job.erased_versions),
            "retrained": len(job.retrain),
            "to_202": to_202,
            "to_done": to_done,
            "trained_in": t_train,
            "changed": sum(a != b for a, b in zip(before, after, strict=True)),
            "probes": len(prompts),
            "after": after,
        }
    finally:
        d.stop()


def store_ops_s(secure_delete: bool, text_bytes: int, work: Path) -> float:
    """Seconds to enqueue, claim and acknowledge 2,000 texts of ``text_bytes`` on a SQLite store,
    with secure_delete as llmos sets it (on) or off: what zeroing old bytes costs the hot path."""
    db = Database(f"sqlite:///{work / f'ops-{secure_delete}-{text_bytes}-{time.monotonic_ns()}.db'}")
    if not secure_delete:
        for engine in (db._write_engine, db._read_engine):  # after llmos's own connect hook
            event.listen(engine, "connect", lambda conn, _rec: conn.execute("PRAGMA secure_delete=OFF"))
    db.create_schema()
    queue, body = SampleQueue(db), ("lorem ipsum dolor sit amet " * (text_bytes // 20 + 1))[:text_bytes]
    t0 = time.perf_counter()
    for b in range(20):
        queue.enqueue([NewSample(f"{b}-{i} {body}") for i in range(100)])
    for _ in range(20):
        queue.ack([s.id for s in queue.claim_batch(100, 10**9)], 1)
    elapsed = time.perf_counter() - t0
    db.dispose()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--k", type=int, nargs="*", default=[0, 1, 2, 4, 8])
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="llmos-forget-"))
    try:
        ops = {}
        for size in (200, 6000):  # one page a text; overflow pages (freed ones are zeroed too)
            on, off = [], []
            for _ in range(5):  # alternated
                off.append(store_ops_s(False, size, work))
                on.append(store_ops_s(True, size, work))
            ops[size] = (statistics.median(on), statistics.median(off))
            print(size, ops[size], flush=True)
        base = pretrain(work)
        rows = []
        for k in args.k:
            row = run(k, base, work)
            clean = never(k, base, work)
            row["unlike_never"] = sum(a != b for a, b in zip(row.pop("after"), clean, strict=True))
            rows.append(row)
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = machine()
    lines = [
        "# Forgetting on request: the cost of exact retraining",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC at commit {commit()} on {m['cpu']} ({m['cores']} cores, "
        f"{m['cpu_features']}), GPU: {m['gpu'] or 'none'}; torch {m['torch']}; "
        f"whole run {time.monotonic() - t0:.0f} s.",
        "Command: `make bench-forget`. See bench/forget.py for the protocol: a canary posted 12 times, then K "
        "batches of 8 texts, then the canary forgotten by id, with llmos's defaults on a small pretrained base.",
        "",
        "| K batches after the canary | recited before / after | versions erased | texts trained again "
        "| to 202 (s) | to done (s) | to done / their first training | probe answers changed "
        "| unlike a model that never saw it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['to_done'] / r['trained_in']:.2f}x" if r["k"] else "-"
        lines.append(
            f"| {r['k']} | {'yes' if r['recited'] else 'no'} / {'yes' if r['recited_after'] else 'no'} "
            f"| {r['versions']} | {r['retrained']} | {r['to_202']:.2f} | {r['to_done']:.1f} "
            f"| {ratio} "
            f"| {r['changed']} of {r['probes']} | {r['unlike_never']} of {r['probes']} |"
        )
    lines += [
        "",
        "To 202 is the erasure's one transaction and the switch of serving to the version before the canary; to "
        "done adds the scrub and the retraining of every batch trained since, so it grows with K; the ratio sets it "
        "against the time the same K batches took to train the first time, in the same run. The probe "
        "answers are compared between the model before the forget (which learned the canary and the K batches) "
        "and the one after (the K batches only, trained again); and between the one after and a model taught the "
        "same K batches that never saw the canary (exact retraining: none should differ).",
    ]
    lines += [
        "",
        "## What secure_delete costs the store's hot path",
        "",
        "SQLite zeroes what is deleted or overwritten (`PRAGMA secure_delete`, on every connection llmos opens), "
        "so that a forgotten text leaves no bytes in free space. 2,000 texts enqueued (20 posts of 100), claimed "
        "and acknowledged, on a fresh store, median of 5 runs alternated with it off:",
        "",
        "| text size | secure_delete on (s) | off (s) | on / off |",
        "|---|---|---|---|",
    ]
    for size, (on, off) in ops.items():
        lines.append(f"| {size:,} B | {on:.2f} | {off:.2f} | {on / off:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "forget.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
