"""GET /metrics in Prometheus text format, and request latency by route.

Nearly everything is read when Prometheus scrapes (a custom collector over the daemon's state:
the trainer's status, the queue, the registry, the store), so no other part of llmos counts for
it. Only request latency is observed as it happens, by an ASGI middleware that labels each
request by its route template (``/v1/texts/{sample_id}``, never the raw path). Each app has its
own CollectorRegistry, so several apps in one process (tests) do not clash.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmos import __version__
from llmos.api.deps import ApiKey
from llmos.api.schemas import error_responses
from llmos.daemon import Daemon
from llmos.memory import heap
from llmos.store.counts import REASON_LABELS
from llmos.store.tables import SampleStatus

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TRAINER_STATES = ("idle", "training", "paused", "error", "standby", "remote")


class _Rate:
    """Tokens per second between two scrapes at least ``min_interval_s`` apart."""

    def __init__(self, min_interval_s: float = 1.0) -> None:
        self._lock = threading.Lock()
        self._last: tuple[float, int] | None = None
        self._min = min_interval_s
        self.value = 0.0

    def update(self, total: int) -> float:
        now = time.monotonic()
        with self._lock:
            if self._last is None or total < self._last[1]:
                self._last = (now, total)  # first scrape, or the counter restarted
            elif now - self._last[0] >= self._min:
                self.value = (total - self._last[1]) / (now - self._last[0])
                self._last = (now, total)
            return self.value


def process_memory() -> Iterable[Metric]:
    """The C heap in use against what the allocator holds free, and Python's live blocks: with
    process_resident_memory_bytes, enough to tell a leak (in use grows) from fragmentation
    (free grows). See llmos/memory.py."""
    stats = heap()
    if stats is not None:
        h = GaugeMetricFamily("llmos_heap_bytes", "The C heap (glibc malloc) by kind.", labels=["kind"])
        h.add_metric(["in_use"], stats.in_use)
        h.add_metric(["free"], stats.free)
        h.add_metric(["mmapped"], stats.mmapped)
        yield h
    yield GaugeMetricFamily(
        "llmos_python_allocated_blocks",
        "Memory blocks Python's allocator holds (objects, mostly).",
        value=sys.getallocatedblocks(),
    )


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._tokens_rate = _Rate()

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to read before the daemon starts

    def collect(self) -> Iterable[Metric]:
        d = self.daemon
        info = InfoMetricFamily("llmos", "The llmos build and what it serves.")
        info.add_metric([], {"version": __version__, "model_name": d.settings.serving.model_name})
        yield info

        # ---- the trainer (in memory; counters since this process started)
        st = d.trainer.status()
        state = GaugeMetricFamily("llmos_trainer_state", "1 for the trainer's current state.", labels=["state"])
        for name in TRAINER_STATES:
            state.add_metric([name], 1.0 if st.state.value == name else 0.0)
        yield state
        yield GaugeMetricFamily(
            "llmos_trainer_step", "Optimizer steps of the training state (goes back on rollback).", value=st.step
        )
        yield CounterMetricFamily(
            "llmos_trained_tokens", "Tokens trained on since this process started.", value=st.tokens_trained
        )
        yield GaugeMetricFamily(
            "llmos_train_tokens_per_second",
            "Training throughput between the last two scrapes (rate(llmos_trained_tokens_total) is the same).",
            value=self._tokens_rate.update(st.tokens_trained),
        )
        loss = GaugeMetricFamily("llmos_train_loss", "Loss of the last training step.")
        if st.last_loss is not None:
            loss.add_metric([], st.last_loss)
        yield loss
        preq = GaugeMetricFamily(
            "llmos_prequential_loss", "Loss on new texts before training on them (the trainer's running value)."
        )
        if st.prequential_loss is not None:
            preq.add_metric([], st.prequential_loss)
        yield preq
        yield CounterMetricFamily(
            "llmos_promotions", "Checkpoints promoted by the gate since this process started.", value=st.promotions
        )
        yield CounterMetricFamily(
            "llmos_rejections", "Checkpoints rejected by the gate since this process started.", value=st.rejections
        )
        yield CounterMetricFamily(
            "llmos_rollbacks", "Rollbacks by an admin since this process started.", value=d.counters.rollbacks
        )

        # ---- serving
        try:
            active = d.engine.current().version
        except RuntimeError:  # not started yet
            active = None
        yield GaugeMetricFamily("llmos_serving_ready", "1 once a model version is loaded.", value=float(d.engine.ready))
        if active is not None:
            yield GaugeMetricFamily("llmos_active_version", "The model version being served.", value=active)
        swap = GaugeMetricFamily("llmos_swap_seconds", "How long the last hot-swap took to load the new version.")
        if d.engine.last_swap_s is not None:
            swap.add_metric([], d.engine.last_swap_s)
        yield swap
        cohorts, rows, steps = d.engine.batches
        yield CounterMetricFamily("llmos_decode_batches", "Batches of generations decoded together.", value=cohorts)
        yield CounterMetricFamily(
            "llmos_decode_batch_rows", "Generations in those groups (rows / batches: the mean batch size).", value=rows
        )
        yield CounterMetricFamily("llmos_decode_steps", "Forward passes of decoding.", value=steps)
        yield CounterMetricFamily(
            "llmos_decode_prompt_chunks_riding",
            "Chunks of long prompts read inside a decoding step's forward pass (0 where the model cannot).",
            value=d.engine.rides,
        )
        yield CounterMetricFamily(
            "llmos_decode_attended_positions",
            "Cache positions those passes attended to, summed over rows (per generated token: decoding's cost).",
            value=d.engine.attended,
        )
        yield GaugeMetricFamily(
            "llmos_kv_cache_tokens_held",
            "KV cache positions taken by generations in progress (prompt and max_new_tokens each).",
            value=d.engine.kv_held,
        )
        yield GaugeMetricFamily(
            "llmos_kv_cache_tokens_budget",
            "The most they may take (serving.kv_cache_tokens).",
            value=d.engine.kv_budget,
        )
        yield GaugeMetricFamily(
            "llmos_generations_in_flight",
            "Generations started and not finished, those waiting for a place in a batch included.",
            value=d.engine.in_flight,
        )
        c = d.counters
        yield CounterMetricFamily(
            "llmos_generations", "Generations served since this process started.", value=c.generations
        )
        yield CounterMetricFamily(
            "llmos_generated_tokens", "Tokens generated since this process started.", value=c.generated_tokens
        )
        yield CounterMetricFamily(
            "llmos_prompt_tokens",
            "Prompt tokens read by generations since this process started.",
            value=c.prompt_tokens,
        )
        yield from process_memory()
        mem = d.device_memory()
        if mem:
            dev = GaugeMetricFamily(
                "llmos_device_memory_bytes", "Accelerator memory of the model's device.", labels=["device", "kind"]
            )
            for kind, value in mem.items():
                dev.add_metric([str(d.factory.device), kind], value)
            yield dev

        # ---- the store: the queue, every text's fate, the active version's checkpoint metrics
        try:
            counts = d.queue.counts()  # kept by the store as it writes: no count over the samples table
            record = d.registry.get(active) if active is not None else None
        except Exception as exc:  # the store is down: say so rather than fail the whole scrape
            log.warning("metrics: the store did not answer: %s", type(exc).__name__)
            yield GaugeMetricFamily("llmos_store_up", "1 when the store answered this scrape.", value=0)
            return
        yield GaugeMetricFamily("llmos_store_up", "1 when the store answered this scrape.", value=1)
        yield GaugeMetricFamily(
            "llmos_queue_depth",
            "Texts queued, waiting to be trained.",
            value=counts.by_status.get(SampleStatus.queued.value, 0),
        )
        texts = GaugeMetricFamily("llmos_texts", "Texts in the store by status.", labels=["status"])
        for s in SampleStatus:
            texts.add_metric([s.value], counts.by_status.get(s.value, 0))
        yield texts
        yield CounterMetricFamily(
            "llmos_texts_ingested",
            "Texts accepted (posted, or made from feedback), all time.",
            value=sum(counts.by_status.values()),
        )
        rejected = CounterMetricFamily(
            "llmos_texts_rejected", "Texts the trainer refused, by reason, all time.", labels=["reason"]
        )
        for label in REASON_LABELS:
            rejected.add_metric([label], counts.rejected_by_reason.get(label, 0))
        yield rejected
        if record is not None:
            ck = GaugeMetricFamily(
                "llmos_checkpoint_loss",
                "Losses recorded with the active version's checkpoint (heldout, anchor, prequential, train).",
                labels=["kind"],
            )
            for key, value in sorted(record.metrics.items()):
                if key.endswith("_loss") and not key.startswith("active_") and isinstance(value, int | float):
                    ck.add_metric([key.removesuffix("_loss")], float(value))
            yield ck


class RequestMetrics:
    """Times every HTTP request, labelled by method and route template (``unmatched`` when no
    route matched, so scanners cannot grow the label set)."""

    def __init__(self, app: ASGIApp, latency: Histogram, requests: Counter) -> None:
        self.app = app
        self.latency = latency
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, record_status)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            self.latency.labels(method, route).observe(time.perf_counter() - t0)
            self.requests.labels(method, route, str(status)).inc()


def instrument(app: FastAPI, daemon: Daemon) -> CollectorRegistry:
    """Add GET /metrics and the request timing middleware to ``app``."""
    registry = CollectorRegistry()
    registry.register(DaemonCollector(daemon))
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, CPU seconds, open files
    latency = Histogram(
        "llmos_http_request_duration_seconds",
        "Time from request to the end of the response (a whole stream for SSE), by route.",
        ["method", "route"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    requests = Counter(
        "llmos_http_requests", "HTTP requests by route and status.", ["method", "route", "status"], registry=registry
    )

    def metrics() -> Response:
        """Prometheus text format: training, queue, serving, request latency. With API keys set, a
        scrape sends one (Prometheus: `authorization: {credentials: <key>}`); open otherwise."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    auth = [ApiKey]  # what it tells (texts, keys' traffic, versions) is not for anyone on the network
    app.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        tags=["health"],
        response_class=Response,
        dependencies=auth,
        responses=error_responses(401, 429),
    )
    app.add_api_route(
        "/metrics", metrics, methods=["HEAD"], include_in_schema=False, response_class=Response, dependencies=auth
    )
    app.add_middleware(RequestMetrics, latency=latency, requests=requests)
    app.state.metrics_registry = registry
    return registry
