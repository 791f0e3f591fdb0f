"""End to end over HTTP against the real server under uvicorn, with the built-in tiny model:
ingest -> learn -> promote -> generate -> feedback -> rollback."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from conftest import LiveServer, admin_headers, make_settings, settled, wait_for

PROMPT = "The capital of Zorbia"
FACT = "Quellton"


def greedy(c: httpx.Client, prompt: str = PROMPT) -> dict:
    r = c.get("/generate", params={"prompt": prompt, "max_new_tokens": 24})
    assert r.status_code == 200, r.text
    return r.json()


def test_learns_a_fact_serves_it_and_rolls_back(tmp_path: Path) -> None:
    # The embedded default configuration, as `llmos serve` runs it (only the admin token is set).
    settings = make_settings(tmp_path / "data", **{"train.fill_wait_s": 0.5, "train.poll_interval_s": 1.0})
    with LiveServer(settings) as srv, srv.client() as c:
        before = greedy(c)
        assert before["model_version"] == 0
        assert FACT not in before["text"]

        t0 = time.monotonic()
        ids = []
        for i in range(50):
            r = c.post("/v1/texts", json={"text": f"{PROMPT} is {FACT}, number {i}.", "source": "e2e"})
            assert r.status_code == 202, r.text
            ids += r.json()["ids"]
        assert len(set(ids)) == 50

        first = wait_for(lambda: (g := greedy(c)) and FACT in g["text"] and g, timeout=60, interval=0.5)
        elapsed = time.monotonic() - t0
        assert first["model_version"] > 0
        print(f"fact reproduced {elapsed:.1f}s after the first post, by version {first['model_version']}")
        # The posts may have come in two batches (after train.fill_wait_s the trainer takes what is
        # there): the rest of them may still be training.
        wait_for(lambda: settled(c, ids), timeout=90)
        learned = greedy(c)
        assert learned["model_version"] >= first["model_version"]
        assert learned["text"].startswith(f" is {FACT}"), learned

        # Every text is accounted for: trained in a served version, or held out for evaluation.
        statuses = [c.get(f"/v1/texts/{i}").json() for i in ids]
        trained = [s for s in statuses if s["status"] == "trained"]
        assert {s["status"] for s in statuses} <= {"trained", "heldout"}
        assert trained and all(s["trained_in_version"] >= 1 for s in trained)

        cps = c.get("/v1/checkpoints").json()
        newest = cps["active_version"]
        assert newest == learned["model_version"] == cps["served_version"]
        assert [cp["version"] for cp in cps["checkpoints"]] == sorted(
            (cp["version"] for cp in cps["checkpoints"]), reverse=True
        )
        top = next(cp for cp in cps["checkpoints"] if cp["version"] == newest)
        assert top["status"] == "promoted" and top["step"] > 0 and top["samples_seen"] > 0

        # Feedback: a correction becomes a training sample; a rating alone is stored.
        fb = c.post("/v1/feedback", json={"generation_id": learned["generation_id"], "rating": 1.0})
        assert fb.status_code == 202 and fb.json()["id"]

        # Pause so that no new version is promoted while we compare versions.
        assert c.post("/v1/admin/trainer/pause", headers=admin_headers()).json()["state"] == "paused"

        r = c.post("/v1/admin/rollback", json={"version": 0}, headers=admin_headers())
        assert r.status_code == 200, r.text
        assert r.json()["active_version"] == 0
        back = greedy(c)
        assert back["model_version"] == 0 and FACT not in back["text"]
        assert c.get("/v1/trainer").json()["active_version"] == 0
        assert c.get("/v1/checkpoints").json()["served_version"] == 0

        r = c.post("/v1/admin/rollback", json={"version": newest}, headers=admin_headers())
        assert r.status_code == 200, r.text
        again = greedy(c)
        assert again["model_version"] == newest and again["text"] == learned["text"]

        assert c.post("/v1/admin/trainer/resume", headers=admin_headers()).json()["state"] != "paused"


def test_correction_is_learned_and_requeue_on_rollback(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    with LiveServer(settings) as srv, srv.client() as c:
        g = greedy(c, "Ticket 7 answer:")
        fb = c.post("/v1/feedback", json={"generation_id": g["generation_id"], "correction": " reset the router."})
        assert fb.status_code == 202
        wait_for(lambda: c.get("/v1/trainer").json()["active_version"] >= 1, timeout=60)
        fixed = greedy(c, "Ticket 7 answer:")
        assert fixed["text"].startswith(" reset the router."), fixed

        # Rolling back with requeue puts the samples trained only in abandoned versions back in
        # the queue, and the trainer learns them again on top of the version rolled back to.
        c.post("/v1/admin/trainer/pause", headers=admin_headers())
        r = c.post("/v1/admin/rollback", json={"version": 0, "requeue": True}, headers=admin_headers())
        assert r.status_code == 200 and r.json()["requeued"] == 1
        assert c.get("/v1/trainer").json()["queue_depth"] == 1
        c.post("/v1/admin/trainer/resume", headers=admin_headers())
        relearned = wait_for(
            lambda: (x := greedy(c, "Ticket 7 answer:"))["model_version"] > fixed["model_version"] and x, timeout=60
        )
        assert relearned["text"].startswith(" reset the router.")
        cps = {cp["version"]: cp for cp in c.get("/v1/checkpoints").json()["checkpoints"]}
        assert cps[relearned["model_version"]]["parent_version"] == 0


def test_concurrent_generation_while_versions_are_promoted(tmp_path: Path) -> None:
    # Short cycles so that many promotions happen while the requests run.
    settings = make_settings(tmp_path / "data", **{"train.passes_per_batch": 2, "serving.max_concurrency": 2})
    with LiveServer(settings) as srv, srv.client() as c:
        stop = threading.Event()

        def feed() -> None:
            i = 0
            with srv.client() as fc:
                while not stop.is_set():
                    fc.post("/v1/texts", json={"items": [{"text": f"stream line {i} {j}"} for j in range(8)]})
                    i += 1
                    time.sleep(0.05)

        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            wait_for(lambda: c.get("/v1/trainer").json()["active_version"] >= 1, timeout=60)

            def one(k: int) -> tuple[int, int | None]:
                with httpx.Client(base_url=srv.url, timeout=120) as hc:
                    r = hc.get("/generate", params={"prompt": f"stream line {k}", "max_new_tokens": 64})
                    return r.status_code, r.json().get("model_version") if r.status_code == 200 else None

            # Bursts of 100 concurrent requests until a version is promoted during one (a burst
            # takes a few seconds, a training cycle a fraction of one; on a loaded machine the
            # first burst can end before the cycle under way does).
            results: list[tuple[int, int | None]] = []
            for _burst in range(5):
                v_before = c.get("/v1/trainer").json()["active_version"]
                with ThreadPoolExecutor(max_workers=100) as pool:
                    results += list(pool.map(one, range(100)))
                v_after = c.get("/v1/trainer").json()["active_version"]
                if v_after > v_before:
                    break
        finally:
            stop.set()
            feeder.join()
        codes = [code for code, _ in results]
        assert codes == [200] * len(codes), codes
        versions = {v for _, v in results}
        print("versions served during the burst:", sorted(versions))  # type: ignore[type-var]
        assert v_after > v_before, "no version was promoted during the burst"
