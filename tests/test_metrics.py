"""GET /metrics: what Prometheus scrapes after texts were ingested (one rejected), a version
promoted, generations served and rollbacks done; request latency labelled by route template."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from conftest import LiveServer, admin_headers, make_settings, reads_samples, sql_of, wait_for
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmos.api.app import create_app

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(http: httpx.Client) -> tuple[Samples, str]:
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out, r.text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@dataclass
class Run:
    srv: LiveServer
    http: httpx.Client
    ids: list[str]
    generated: int
    active: int


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    settings = make_settings(
        tmp_path_factory.mktemp("metrics") / "data",
        **{"train.passes_per_batch": 8, "train.max_sample_tokens": 64, "serving.model_name": "zorbia"},
    )
    with LiveServer(settings) as srv, srv.client() as http:
        items = [{"text": f"The capital of Zorbia is Quellton, number {i}."} for i in range(20)]
        items.append({"text": "far too long for train.max_sample_tokens " * 4})
        r = http.post("/v1/texts", json={"items": items})
        assert r.status_code == 202
        ids = r.json()["ids"]
        done = ("trained", "heldout", "rejected")
        wait_for(lambda: all(http.get(f"/v1/texts/{i}").json()["status"] in done for i in ids), timeout=60)
        active = http.get("/v1/trainer").json()["active_version"]  # the version the engine serves
        assert active >= 1
        g = http.post("/generate", json={"prompt": "The capital", "max_new_tokens": 5}).json()
        c = http.post("/v1/completions", json={"model": "zorbia", "prompt": "The capital", "max_tokens": 7}).json()
        assert g["model_version"] == active and c["model"] == f"zorbia@{active}"
        generated = g["completion_tokens"] + c["usage"]["completion_tokens"]
        for version in (0, active):
            r = http.post("/v1/admin/rollback", json={"version": version}, headers=admin_headers())
            assert r.status_code == 200, r.text
        # The trainer continues from the active version again (it reloads after each rollback:
        # its step is the active version's before it has seen them, so wait for both); then pause
        # it, so nothing moves while the tests look.
        step = next(c["step"] for c in http.get("/v1/checkpoints").json()["checkpoints"] if c["version"] == active)

        def reloaded() -> bool:
            t = http.get("/v1/trainer").json()
            return not t["reloading"] and t["step"] == step

        wait_for(reloaded, timeout=30)
        assert http.post("/v1/admin/trainer/pause", headers=admin_headers()).status_code == 200
        yield Run(srv, http, ids, generated, active)


def test_training_queue_and_serving_state(run: Run) -> None:
    m, _ = scrape(run.http)
    trainer = run.http.get("/v1/trainer").json()
    assert value(m, "llmos_texts_ingested_total") == 21
    assert value(m, "llmos_texts_rejected_total", reason="too_long") == 1
    assert value(m, "llmos_texts_rejected_total", reason="gate") == 0
    statuses = ("queued", "training", "trained", "heldout", "rejected")
    assert sum(value(m, "llmos_texts", status=s) for s in statuses) == 21
    assert value(m, "llmos_texts", status="trained") >= 1
    assert value(m, "llmos_queue_depth") == trainer["queue_depth"] == 0
    assert value(m, "llmos_active_version") == trainer["active_version"] == run.active
    assert value(m, "llmos_trainer_state", state="paused") == 1 and value(m, "llmos_trainer_state", state="idle") == 0
    assert value(m, "llmos_trainer_step") == trainer["step"] > 0
    assert value(m, "llmos_trained_tokens_total") > 0
    assert math.isclose(value(m, "llmos_train_loss"), trainer["last_loss"])
    assert value(m, "llmos_promotions_total") >= 1
    assert value(m, "llmos_rollbacks_total") == 2
    assert value(m, "llmos_swap_seconds") > 0
    assert value(m, "llmos_generations_total") == 2
    assert value(m, "llmos_generated_tokens_total") == run.generated
    # The active version's checkpoint losses, as /v1/checkpoints reports them.
    cps = run.http.get("/v1/checkpoints").json()
    metrics = next(c["metrics"] for c in cps["checkpoints"] if c["version"] == run.active)
    assert math.isclose(value(m, "llmos_checkpoint_loss", kind="heldout"), metrics["heldout_loss"])
    assert value(m, "llmos_store_up") == 1
    assert value(m, "llmos_info", version="0.1.0", model_name="zorbia") == 1
    assert not any(name.startswith("llmos_device_memory") for name, _ in m)  # CPU: no device memory


def test_a_scrape_does_not_read_the_samples_table(run: Run) -> None:
    """A scrape reads the counts the store keeps; before, it counted the whole samples table by
    status and reason each time, a cost that grew with every text ever posted."""
    text, statements = sql_of(lambda: generate_latest(run.srv.app.state.metrics_registry).decode())  # GET /metrics
    assert any("sample_counts" in s for s in statements), statements
    assert not [s for s in statements if reads_samples(s)]
    assert "llmos_store_up 1.0" in text and "llmos_texts_ingested_total 21.0" in text


def test_memory_tells_the_heap_in_use_from_what_the_allocator_keeps_free(run: Run) -> None:
    m, _ = scrape(run.http)
    rss = value(m, "process_resident_memory_bytes")
    in_use, free = value(m, "llmos_heap_bytes", kind="in_use"), value(m, "llmos_heap_bytes", kind="free")
    assert 50 << 20 < rss < 8 << 30  # this test process: torch, a model, the server
    assert 0 < free and 0 <= value(m, "llmos_heap_bytes", kind="mmapped") <= in_use
    assert in_use > 10 << 20
    assert value(m, "llmos_python_allocated_blocks") > 10_000
    # A block that stays allocated shows in use (the server runs in this test's process).
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(64 << 20)
    try:
        m2, _ = scrape(run.http)
        assert value(m2, "llmos_heap_bytes", kind="in_use") - in_use > 60 << 20
    finally:
        libc.free(block)


def test_latency_is_labelled_by_route_template(run: Run) -> None:
    for sid in run.ids[:3]:
        assert run.http.get(f"/v1/texts/{sid}").status_code == 200
    assert run.http.get("/no/such/path/123").status_code == 404
    m, text = scrape(run.http)
    count = "llmos_http_request_duration_seconds_count"
    assert value(m, count, method="GET", route="/v1/texts/{sample_id}") >= 3
    assert value(m, count, method="POST", route="/v1/completions") == 1
    assert value(m, count, method="GET", route="unmatched") >= 1
    assert value(m, "llmos_http_requests_total", method="POST", route="/v1/admin/rollback", status="200") == 2
    assert run.ids[0] not in text and "/no/such/path" not in text  # no raw paths as labels
    buckets = [
        v
        for (name, labels), v in m.items()
        if name == "llmos_http_request_duration_seconds_bucket" and ("route", "/v1/completions") in labels
    ]
    assert len(buckets) > 5 and max(buckets) == 1


def test_the_configured_model_name(run: Run) -> None:
    models = run.http.get("/v1/models").json()["data"]
    assert models[0]["id"] == "zorbia" and f"zorbia@{run.active}" in [m["id"] for m in models]
    r = run.http.post("/v1/completions", json={"model": "llmos", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404 and "'zorbia'" in r.json()["detail"]


def test_each_app_has_its_own_registry(run: Run) -> None:
    # Two more apps over the same daemon in this process: no "Duplicated timeseries" clash, and
    # each counts only its own requests.
    apps = [create_app(run.srv.daemon, manage_lifecycle=False) for _ in range(2)]
    first, second = (TestClient(a) for a in apps)
    assert first.get("/healthz").status_code == 200
    a = {
        s.name: s.value
        for f in text_string_to_metric_families(first.get("/metrics").text)
        for s in f.samples
        if s.labels.get("route") == "/healthz" and s.name.endswith("_count")
    }
    b = second.get("/metrics").text
    assert a == {"llmos_http_request_duration_seconds_count": 1}
    assert 'route="/healthz"' not in b
