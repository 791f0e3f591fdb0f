"""Bounds and backpressure: per-key and per-source rate limits and a maximum queue depth answer
429 with Retry-After, and so do generations past serving.max_requests, which wait without holding
a worker of the server's pool; max_new_tokens is capped from config. Token buckets on a fake clock, then
the real server over HTTP."""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ADMIN, LiveServer, make_settings, wait_for

from llmos.api.limits import RateLimiter, SharedRateLimiter, retry_after
from llmos.daemon import Daemon

# ---- token buckets ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    lim = RateLimiter(rate_per_s=2, burst=3, clock=clock)
    assert [lim.take({"k": 1}) for _ in range(3)] == [0, 0, 0]
    wait = lim.take({"k": 1})
    assert wait == pytest.approx(0.5)  # one token at 2 per second
    clock.t += 0.5
    assert lim.take({"k": 1}) == 0
    clock.t += 100  # refills to the burst, not beyond
    assert [lim.take({"k": 1}) for _ in range(4)][-1] > 0


def test_keys_are_independent_and_multi_key_takes_are_all_or_nothing() -> None:
    lim = RateLimiter(rate_per_s=1, burst=5, clock=Clock())
    assert lim.take({"a": 5}) == 0
    assert lim.take({"a": 1}) > 0
    assert lim.take({"b": 5}) == 0
    assert lim.take({"c": 2, "a": 1}) > 0  # a is empty: nothing is taken from c either
    assert lim.take({"c": 5}) == 0


def test_a_cost_beyond_the_burst_can_never_pass() -> None:
    lim = RateLimiter(rate_per_s=1, burst=5, clock=Clock())
    assert lim.take({"a": 6}) == math.inf


def test_zero_rate_means_no_limit() -> None:
    lim = RateLimiter(rate_per_s=0, burst=1, clock=Clock())
    assert all(lim.take({"a": 1000}) == 0 for _ in range(100))
    assert len(lim) == 0


def test_many_keys_do_not_grow_memory_without_bound() -> None:
    lim = RateLimiter(rate_per_s=1, burst=2, max_tracked=100, clock=Clock())
    for i in range(10_000):
        lim.take({f"source-{i}": 1})
    assert len(lim) == 100


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert retry_after(0.01) == "1"
    assert retry_after(1.2) == "2"
    assert retry_after(7) == "7"


# ---- shared by replicas: the same limits in Redis ----------------------------------------------

REDIS = "redis://127.0.0.1:6379/0"  # the Redis every machine of this project runs


def test_replicas_share_one_budget_in_redis() -> None:
    # Two limiters on one Redis, as two API replicas hold them: each key has one budget.
    ns = f"test-{uuid.uuid4().hex}"
    a, b = (SharedRateLimiter(rate_per_s=0.5, burst=6, storage_url=REDIS, namespace=ns) for _ in range(2))
    assert a.reachable()
    assert [a.take({"k": 1}) for _ in range(3)] + [b.take({"k": 1}) for _ in range(3)] == [0] * 6
    assert a.take({"k": 1}) > 0 and b.take({"k": 1}) > 0  # spent, whichever replica asks
    assert 0 < b.take({"k": 1}) <= 12  # a wait no longer than the window (6 at 0.5 per second)
    assert b.take({"other": 6}) == 0  # another key has its own budget
    assert a.take({"c": 2, "k": 1}) > 0 and b.take({"c": 6}) == 0  # all or nothing: c was not taken
    assert a.take({"c": 7}) == math.inf  # past the burst: never


def test_shared_limits_pass_while_their_storage_is_down(caplog: pytest.LogCaptureFixture) -> None:
    # Nothing listens on port 1: the limiter fails open and says so (an outage of the limiter's
    # storage is not an outage of the API).
    lim = SharedRateLimiter(rate_per_s=0.1, burst=1, storage_url="redis://127.0.0.1:1/0", namespace="down")
    with caplog.at_level(logging.WARNING, logger="llmos.api.limits"):
        assert not lim.reachable()
        assert [lim.take({"k": 1}) for _ in range(5)] == [0] * 5
    assert sum("rate limits not enforced" in r.getMessage() for r in caplog.records) == 1  # once a minute


def test_two_servers_on_one_redis_share_each_keys_and_each_sources_limit(tmp_path: Path) -> None:
    key, source = f"replica-key-{uuid.uuid4().hex}", f"replica-source-{uuid.uuid4().hex}"  # fresh in Redis
    shared = {
        "auth.api_keys": [key],
        "limits.storage_url": REDIS,
        "limits.key_rate_per_s": 0.1,
        "limits.key_burst": 5,
        "limits.source_rate_per_s": 0.1,
        "limits.source_burst": 4,
    }
    one, two = (make_settings(tmp_path / name, **shared) for name in ("one", "two"))
    with LiveServer(one) as s1, LiveServer(two) as s2, s1.client() as c1, s2.client() as c2:
        c1.headers.update(bearer(key))
        c2.headers.update(bearer(key))
        texts = {"items": [{"text": f"shared budget {i}", "source": source} for i in range(2)]}
        assert c1.post("/v1/texts", json=texts).status_code == 202
        assert c2.post("/v1/texts", json=texts).status_code == 202
        r = c1.post("/v1/texts", json={"text": "one more", "source": source})
        assert r.status_code == 429 and "limits.source_rate_per_s" in r.json()["detail"], r.text
        codes = [c.get("/v1/trainer").status_code for c in (c1, c2)]  # the key's 4th and 5th requests
        assert codes == [200, 200]
        for c in (c1, c2):
            r = c.get("/v1/trainer")
            assert r.status_code == 429 and "limits.key_rate_per_s" in r.json()["detail"], r.text
            assert int(r.headers["retry-after"]) >= 1


# ---- over HTTP --------------------------------------------------------------------------------

KEYS = [f"limits-key-{i}-0123456789" for i in range(5)]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("limits") / "data",
        **{
            "auth.api_keys": KEYS,
            "limits.key_rate_per_s": 0.2,  # one request per 5 s after the burst
            "limits.key_burst": 6,
            "limits.source_rate_per_s": 0.5,
            "limits.source_burst": 4,
            "limits.max_queue_depth": 5,
            "limits.queue_full_retry_after_s": 7,
            "serving.max_new_tokens_cap": 8,
        },
    )
    with LiveServer(settings) as s:
        yield s


def test_a_key_past_its_rate_gets_429_with_retry_after(srv: LiveServer) -> None:
    with srv.client(headers=bearer(KEYS[0])) as c:
        codes = [c.get("/v1/trainer").status_code for _ in range(6)]
        assert codes == [200] * 6
        r = c.get("/v1/trainer")
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert "limits.key_rate_per_s" in r.json()["detail"]
    with srv.client(headers=bearer(KEYS[1])) as other:
        assert other.get("/v1/trainer").status_code == 200  # another key has its own bucket


def test_a_source_past_its_rate_gets_429_and_other_sources_pass(srv: LiveServer) -> None:
    with srv.client(headers=bearer(KEYS[2])) as c:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        assert c.post("/v1/admin/trainer/pause", headers=admin).status_code == 200
        try:
            r = c.post("/v1/texts", json={"items": [{"text": f"flood {i}", "source": "flood"} for i in range(4)]})
            assert r.status_code == 202, r.text
            r = c.post("/v1/texts", json={"text": "one more", "source": "flood"})
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert "limits.source_rate_per_s" in r.json()["detail"]
            r = c.post("/v1/texts", json={"items": [{"text": f"big {i}", "source": "big"} for i in range(5)]})
            assert r.status_code == 422 and "limits.source_burst" in r.json()["detail"]
            # The queue is not full yet (4 of 5): a text with its own source still gets in.
            assert c.post("/v1/texts", json={"text": "calm", "source": "calm"}).status_code == 202
            # Now it is: anything more waits, whatever its source, until the trainer drains it.
            r = c.post("/v1/texts", json={"text": "late", "source": "late"})
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "7"
            assert "limits.max_queue_depth" in r.json()["detail"]
            assert c.get("/v1/trainer", headers=admin).json()["queue_depth"] == 5  # the refused were not stored
        finally:
            c.post("/v1/admin/trainer/resume", headers=admin)
        wait_for(lambda: c.get("/v1/trainer", headers=admin).json()["queue_depth"] == 0, timeout=60, interval=1)
    with srv.client(headers=bearer(KEYS[4])) as c:
        assert c.post("/v1/texts", json={"text": "after the drain", "source": "late"}).status_code == 202


def test_posts_arriving_together_cannot_pass_the_queue_bound(tmp_path: Path) -> None:
    """Many posts at once, the queue near its bound: the ones admitted fill it exactly, the rest
    get 429, and the queue never holds more than the limit (each post checked the depth before
    any of them had committed: 130 posts of 1,000 texts put 132,119 in a queue of 100,000)."""
    settings = make_settings(tmp_path / "data", **{"limits.max_queue_depth": 100})
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with LiveServer(settings) as s, s.client(headers=admin) as c:
        assert c.post("/v1/admin/trainer/pause").status_code == 200
        wait_for(lambda: c.get("/v1/trainer").json()["state"] == "paused", timeout=60, interval=0.05)

        def post(i: int) -> int:
            items = [{"text": f"post {i} text {j}"} for j in range(10)]
            with s.client(headers=admin) as one:
                return one.post("/v1/texts", json={"items": items}).status_code

        with ThreadPoolExecutor(30) as pool:
            codes = list(pool.map(post, range(30)))
        assert sorted(set(codes)) == [202, 429], codes
        assert codes.count(202) == 10, codes
        assert c.get("/v1/trainer").json()["queue_depth"] == 100


def test_max_new_tokens_is_capped_from_config(srv: LiveServer) -> None:
    with srv.client(headers=bearer(KEYS[3])) as c:
        r = c.get("/generate", params={"prompt": "hi", "max_new_tokens": 9})
        assert r.status_code == 422, r.text
        assert r.json()["detail"] == "max_new_tokens is 9; the limit is 8 (serving.max_new_tokens_cap)"
        r = c.post("/generate", json={"prompt": "hi", "max_new_tokens": 9})
        assert r.status_code == 422 and "serving.max_new_tokens_cap" in r.json()["detail"]
        r = c.get("/generate", params={"prompt": "hi", "max_new_tokens": 8})
        assert r.status_code == 200 and r.json()["completion_tokens"] <= 8


def test_the_open_api_has_no_per_caller_limit(tmp_path: Path) -> None:
    # Without API keys every local client shares one address: there is no caller to tell apart.
    settings = make_settings(tmp_path / "data", **{"limits.key_rate_per_s": 0.1, "limits.key_burst": 1})
    with LiveServer(settings) as srv, srv.client() as c:
        assert [c.get("/v1/trainer").status_code for _ in range(10)] == [200] * 10
        limited = c.get("/v1/trainer", headers={"Authorization": f"Bearer {ADMIN}"})  # a credential is limited
        assert limited.status_code == 200
        assert c.get("/v1/trainer", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 429


# ---- generations held at once ------------------------------------------------------------------


class HeldGenerations:
    """The daemon's generations wait at a gate before they decode (a stand-in for slow ones), and
    each counts itself in; the real generation follows once the gate opens."""

    def __init__(self, daemon: Daemon) -> None:
        self.gate, self.lock, self.waiting = threading.Event(), threading.Lock(), 0
        real, real_stream = daemon.generate, daemon.generate_stream

        def generate(*a: Any, **kw: Any) -> Any:
            self._wait()
            return real(*a, **kw)

        def generate_stream(*a: Any, **kw: Any) -> Iterator[Any]:
            self._wait()
            yield from real_stream(*a, **kw)

        daemon.generate, daemon.generate_stream = generate, generate_stream  # type: ignore[method-assign]

    def _wait(self) -> None:
        with self.lock:
            self.waiting += 1
        assert self.gate.wait(60)


def test_health_and_ingest_answer_while_many_generations_wait(tmp_path: Path) -> None:
    """A generation waits on its own thread, not on a worker of the server's pool: 48 slow ones
    (the pool has 40) leave health checks, status and ingest answering at once."""
    with LiveServer(make_settings(tmp_path / "data")) as srv:
        held = HeldGenerations(srv.daemon)
        paths = ["/generate?prompt=a&max_new_tokens=4", "/generate?prompt=b&max_new_tokens=4&stream=true"]
        with ThreadPoolExecutor(48) as pool, srv.client() as c:
            try:
                calls = [pool.submit(c.get, paths[i % 2]) for i in range(24)]
                calls += [
                    pool.submit(c.post, "/v1/completions", json={"model": "llmos", "prompt": "c", "max_tokens": 4})
                    for _ in range(24)
                ]
                wait_for(lambda: held.waiting == 48, timeout=30)
                with httpx.Client(base_url=srv.url, timeout=10) as quick:
                    assert quick.get("/healthz").status_code == 200
                    assert quick.get("/v1/trainer").status_code == 200
                    assert quick.post("/v1/texts", json={"text": "while they wait"}).status_code == 202
                assert not any(f.done() for f in calls)  # all 48 still held
            finally:
                held.gate.set()
            codes = [f.result().status_code for f in calls]
        assert codes == [200] * 48
        assert wait_for(lambda: srv.app.state.generation_slots.used == 0, timeout=10) is not None


def test_generations_past_serving_max_requests_get_429_with_retry_after(tmp_path: Path) -> None:
    with LiveServer(make_settings(tmp_path / "data", **{"serving.max_requests": 3})) as srv:
        held = HeldGenerations(srv.daemon)
        with ThreadPoolExecutor(3) as pool, srv.client() as c:
            calls = [pool.submit(c.get, "/generate", params={"prompt": "x", "max_new_tokens": 4}) for _ in range(3)]
            try:
                wait_for(lambda: held.waiting == 3, timeout=30)
                refused = [
                    c.get("/generate", params={"prompt": "y", "max_new_tokens": 4}),
                    c.get("/generate", params={"prompt": "y", "stream": "true"}),
                ]
                chat = [
                    c.post(
                        "/v1/chat/completions",
                        json={"model": "llmos", "messages": [{"role": "user", "content": "y"}], "stream": s},
                    )
                    for s in (False, True)
                ]
            finally:
                held.gate.set()
            for r in refused + chat:
                assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
                assert "serving.max_requests" in r.json()["detail"]
            assert all(r.json()["error"]["type"] == "rate_limit_error" for r in chat)
            assert [f.result().status_code for f in calls] == [200] * 3
            # The places are given back: the next request is served.
            wait_for(lambda: srv.app.state.generation_slots.used == 0, timeout=10)
            assert c.get("/generate", params={"prompt": "z", "max_new_tokens": 4}).status_code == 200


def test_feedback_has_the_limits_of_ingest_and_a_bound_per_generation(tmp_path: Path) -> None:
    """A correction is a text to train: it is capped in length, counts against its caller's rate
    and the queue's depth as ingest does, and one generation takes feedback.max_per_generation
    entries (before, any number of corrections of up to the body cap, each a queued text)."""
    settings = make_settings(
        tmp_path / "data",
        **{
            "auth.api_keys": KEYS[:2],
            "limits.source_rate_per_s": 0.01,
            "limits.source_burst": 3,
            "limits.max_queue_depth": 3,
            "limits.queue_full_retry_after_s": 7,
            "server.max_text_chars": 100,
            "feedback.max_per_generation": 3,
        },
    )
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with LiveServer(settings) as srv, srv.client(headers=bearer(KEYS[0])) as c:
        assert c.post("/v1/admin/trainer/pause", headers=admin).status_code == 200

        def generation() -> str:
            return str(c.get("/generate", params={"prompt": "The tide", "max_new_tokens": 2}).json()["generation_id"])

        g = generation()
        r = c.post("/v1/feedback", json={"generation_id": g, "correction": "x" * 101})
        assert r.status_code == 422 and "server.max_text_chars" in r.text, r.text
        for _ in range(3):  # thumbs down teach nothing by themselves: no rate, no queue
            assert c.post("/v1/feedback", json={"generation_id": g, "rating": -1}).status_code == 202
        r = c.post("/v1/feedback", json={"generation_id": g, "rating": -1})
        assert r.status_code == 409 and "feedback.max_per_generation" in r.text, r.text
        for i in range(3):
            r = c.post("/v1/feedback", json={"generation_id": generation(), "correction": f" fix {i}"})
            assert r.status_code == 202, r.text
        r = c.post("/v1/feedback", json={"generation_id": generation(), "correction": " one more"})
        assert r.status_code == 429 and "limits.source_rate_per_s" in r.text, r.text
        assert int(r.headers["retry-after"]) >= 1
        time.sleep(0.3)  # past the age of the queue depth's cached estimate
        with srv.client(headers=bearer(KEYS[1])) as other:  # its own rate, but the queue is full
            r = other.post("/v1/feedback", json={"generation_id": generation(), "correction": " late"})
            assert r.status_code == 429 and "limits.max_queue_depth" in r.text, r.text
            assert r.headers["retry-after"] == "7"
        assert c.get("/v1/trainer").json()["queue_depth"] == 3  # nothing refused was stored
