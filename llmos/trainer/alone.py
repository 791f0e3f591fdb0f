"""The trainer alone (llmos train): the five stages on the configured store and data directory,
no HTTP API. It trains while it holds the store's trainer lease (a standby otherwise), publishes
each promotion in the store, and API replicas (serve --role api) follow it from there; it follows
their rollbacks the same way. SIGTERM or SIGINT stops it after its step: it gives back what it
claimed and the lease.

With train.metrics_port, /metrics (Prometheus) and /healthz answer on that port."""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import torch
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.exc import DBAPIError

from llmos.memory import freeze_startup_objects
from llmos.model.loader import ModelFactory
from llmos.registry.registry import Registry
from llmos.serving.engine import Loaded
from llmos.serving.follow import Follower
from llmos.settings import Settings
from llmos.store import notify
from llmos.store.db import Database, is_unavailable
from llmos.store.queue import SampleQueue
from llmos.trainer import distributed
from llmos.trainer.active import ActiveModel
from llmos.trainer.loop import Trainer, TrainerPhase
from llmos.trainer.sharded import Shards
from llmos.wiring import build_trainer, model_factory, open_registry, thread_budget, trainer_config

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 60.0  # the step in hand finishes, then claims and the lease go back
STORE_WARN_S = 10.0  # while the store cannot be reached at start, say so this often


class StoreServing:
    """The trainer alone's view of serving (the Serving protocol of llmos/trainer/loop.py): nobody
    serves in this process; a promotion is in the store once committed, and replicas follow it."""

    in_flight = 0

    def __init__(self, registry: Registry, factory: ModelFactory) -> None:
        self._registry = registry
        self._active = ActiveModel(registry, factory)

    def wait_idle(self, timeout_s: float) -> bool:
        return True

    def quiet(self, quiet_s: float) -> bool:
        return True  # no generation runs here: the idle thread budget applies (runtime.torch_threads_idle)

    def current(self) -> Loaded:
        return self._active.current()

    def sync(self) -> int:
        return self._registry.active_version()


class RollbackWatch:
    """Tells the trainer when the store's active version moved off its line: a rollback (or a
    forget job) through an API replica (in one process the rollback tells it itself). Off its line:
    the version the trainer's weights descend from is not the active version nor an ancestor of it
    (a promotion moves the active version along the line: nothing to do). Compared with the
    trainer's own version, not the last one seen, so that a rollback that lands before a poll saw
    the promotion it undoes is not missed. Read by a Follower, as a replica reads the active
    version (a poll, and PostgreSQL's notices)."""

    def __init__(self, registry: Registry, trainer: Trainer) -> None:
        self._registry, self._trainer = registry, trainer
        self._asked: int | None = None  # the active version a reset was asked for

    def sync(self) -> int:
        version = self._registry.active_version()
        base = self._trainer.base_version
        if base is None or version == base or base in self._registry.lineage(version):
            self._asked = None
        elif self._asked != version:
            log.info("the active version moved from %d to %d (a rollback): going back to it", base, version)
            self._trainer.request_reset()
            self._asked = version
        return version


class TrainerCollector:
    """What /metrics reports for the trainer alone: its state, counters since it started, the queue."""

    def __init__(self, trainer: Trainer, queue: SampleQueue, registry: Registry) -> None:
        self._trainer, self._queue, self._registry = trainer, queue, registry

    def collect(self) -> Iterable[Metric]:
        st = self._trainer.status()
        state = GaugeMetricFamily("llmos_trainer_state", "1 for the trainer's current state.", labels=["state"])
        for phase in TrainerPhase:
            state.add_metric([phase.value], 1.0 if st.state is phase else 0.0)
        yield state
        yield GaugeMetricFamily("llmos_trainer_step", "Optimizer steps of the training state.", value=st.step)
        yield CounterMetricFamily("llmos_trained_tokens", "Tokens trained on since start.", value=st.tokens_trained)
        yield CounterMetricFamily("llmos_promotions", "Versions promoted since start.", value=st.promotions)
        yield CounterMetricFamily("llmos_rejections", "Versions the gate rejected since start.", value=st.rejections)
        yield GaugeMetricFamily("llmos_queue_depth", "Texts waiting to be trained.", value=self._queue.depth())
        yield GaugeMetricFamily(
            "llmos_active_version", "The store's active version.", value=self._registry.active_version()
        )


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # a scrape every few seconds is not news


def serve_metrics(host: str, port: int, collector: TrainerCollector, alive: Callable[[], bool]) -> WSGIServer:
    """/metrics and /healthz (200 while the trainer's loop runs, 503 otherwise) in a thread."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes] | Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok = alive()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"the trainer loop is not running\n"]
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    server = make_server(host, port, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="llmos-metrics", daemon=True).start()
    return server


def open_store(db: Database, stop: threading.Event) -> bool:
    """Check and migrate the store (StoreNotDurable), waiting for it while it cannot be reached (a
    trainer started beside its database, or during a restart of it): retried with back-off until it
    answers (True) or the trainer is told to stop (False)."""
    wait, warned = 0.5, -math.inf
    while True:
        try:
            db.check_durable()
            db.create_schema()
            return True
        except DBAPIError as exc:
            if not is_unavailable(exc):
                raise
            if time.monotonic() - warned > STORE_WARN_S:
                log.warning("the store cannot be reached (%s): waiting for it", str(exc.orig).strip()[:200])
                warned = time.monotonic()
        if stop.wait(wait):
            return False
        wait = min(wait * 2, 5.0)


def run(settings: Settings) -> int:
    """Train until SIGTERM or SIGINT (then return 0), or until the loop ends by itself, which it
    should not (1: a service manager restarts it)."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("trainer: %s; stopping after the step in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(thread_budget(settings).serving)
    distributed.use_local_gpu()
    factory = model_factory(settings)
    ranks = distributed.init_from_env(factory.device)  # under torchrun
    sharded = settings.train.parallel == "fsdp"
    optimizer = trainer_config(settings, factory.device).optimizer
    if ranks is not None and ranks.rank > 0:  # a rank that only takes part in rank 0's steps
        together = False
        try:
            (distributed.follow_sharded if sharded else distributed.follow)(ranks, factory, optimizer)
            together = True  # rank 0 said stop
        finally:
            distributed.leave(together)
        return 0
    db = Database(settings.store_url, settings.store.busy_timeout_s, settings.store.idle_transaction_s)
    if not open_store(db, stop):
        return 0  # told to stop while it waited for the store
    registry = open_registry(settings, db)
    trainer = build_trainer(settings, db, registry, factory, StoreServing(registry, factory))
    if ranks is not None and sharded:
        trainer.sender = distributed.ShardedSender(Shards(ranks, factory.instance(None), optimizer, factory.device))
    elif ranks is not None:
        trainer.sender = distributed.StepSender(ranks)
    server = None
    if settings.train.metrics_port:
        collector = TrainerCollector(trainer, SampleQueue(db), registry)
        server = serve_metrics(
            settings.train.metrics_host, settings.train.metrics_port, collector, lambda: trainer.alive
        )
        log.info("trainer metrics on http://%s:%d/metrics", settings.train.metrics_host, settings.train.metrics_port)
    listen = None if db.is_sqlite else partial(notify.listen, db, notify.ACTIVE_CHANNEL)
    watch = Follower(RollbackWatch(registry, trainer), settings.serving.follow_interval_s, listen)
    trainer.start()
    watch.start()
    freeze_startup_objects()
    log.info("trainer running on %s (data in %s)", factory.device, settings.data_dir)
    code = 0
    try:
        while not stop.wait(1.0):
            if not trainer.alive:
                log.error("the trainer loop ended unexpectedly")
                code = 1
                break
            if trainer.sender is not None and trainer.sender.broken:
                log.error("another rank of the trainer's group failed: stopping (torchrun stops the group)")
                code = 1
                break
    finally:
        watch.stop()
        trainer.stop(STOP_TIMEOUT_S)
        if trainer.sender is not None:  # the other ranks stop with rank 0
            together = not trainer.sender.broken
            if together:
                trainer.sender.stop()
            trainer.sender = None  # (what it holds goes before the group: distributed.leave)
            distributed.leave(together)
        if server is not None:
            server.shutdown()
        db.dispose()
        log.info("trainer stopped")
    return code
