"""Shared fixtures: settings in a temporary data directory, the real store on SQLite (and on
PostgreSQL when LLMOS_TEST_POSTGRES_URL is set), and a real uvicorn server on a loopback port."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from sqlalchemy import Engine, event

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llmos.api.http import protocol  # noqa: E402
from llmos.settings import Settings, load_settings  # noqa: E402
from llmos.store.db import Database  # noqa: E402

T = TypeVar("T")

PG_URL = os.environ.get("LLMOS_TEST_POSTGRES_URL")
ADMIN = "test-admin-token"


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Test settings: the embedded default, with an admin token and no waiting for batches to fill."""
    base = {
        "auth.admin_token": ADMIN,
        "data_dir": data_dir,
        "train.fill_wait_s": 0.05,
        "train.poll_interval_s": 0.1,
        "server.port": 0,
    }
    base.update(overrides)
    return load_settings(None, **base)


def _backends() -> list[str]:
    return ["sqlite", "postgres"] if PG_URL else ["sqlite"]


@pytest.fixture(params=_backends())
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new schema on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    assert PG_URL is not None
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = Database(PG_URL)
    with admin.write() as s:
        s.connection().exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.write() as s:
        s.connection().exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    admin.dispose()


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    database.create_schema()
    yield database
    database.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """The real app under uvicorn in a background thread, on a loopback port."""

    def __init__(self, settings: Settings) -> None:
        from llmos.api.app import create_app
        from llmos.daemon import Daemon

        self.port = free_port()
        self.daemon = Daemon(settings)
        self.app = create_app(self.daemon)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=5,
            http=protocol(settings.server.head_timeout_s, settings.server.body_timeout_s),  # as `llmos serve` runs it
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        # The trainer process (the default) loads the active version before /readyz says ready.
        while not self.daemon.trainer.alive:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the trainer did not start: {self.daemon.trainer.status().last_error}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    with LiveServer(make_settings(tmp_path / "data")) as srv:
        yield srv


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def settled(c: httpx.Client, ids: list[str], every: int = 1) -> bool:
    """Every sample (or every ``every``-th) has its final status, and this server serves a version
    at least as new as the newest one they trained: a text reads "trained" just before its
    version is swapped in, so an answer asked for in between comes from the version before."""
    served = c.get("/v1/checkpoints").json()["served_version"]
    for sid in ids[::every]:
        text = c.get(f"/v1/texts/{sid}").json()
        if text["status"] not in ("trained", "heldout", "rejected") or (text["trained_in_version"] or 0) > served:
            return False
    return True


def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> Any:
    """Poll until predicate() is truthy; return its value, or fail with the last one seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


def sql_of(action: Callable[[], T]) -> tuple[T, list[str]]:
    """What ``action()`` returns, and the SQL statements it sends from this thread, on any engine."""
    me = threading.get_ident()
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if threading.get_ident() == me:
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        out = action()
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    return out, seen


def reads_samples(statement: str) -> bool:
    """Whether a SQL statement names the samples table (whose size grows with every text posted)."""
    return re.search(r"\bsamples\b", statement, re.IGNORECASE) is not None


def pretrained_model(out: Path, texts: list[str], epochs: int) -> Path:
    """The built-in tiny model trained (fully, AdamW) on ``texts`` for ``epochs``, saved with its
    tokenizer as a model directory: a pretrained base, made here instead of downloaded."""
    import torch

    from llmos.model.builtin import byte_tokenizer, create_tiny
    from llmos.model.loader import ModelFactory
    from llmos.trainer.optimize import optimize
    from llmos.trainer.preprocess import PreprocessConfig, eval_batch
    from llmos.trainer.state import OptimizerConfig, TrainingState, make_optimizer

    cpu = torch.device("cpu")
    tok = byte_tokenizer()
    model = ModelFactory(str(create_tiny(out.parent / f"{out.name}-random")), cpu).instance().train()
    cfg = OptimizerConfig(lr=3e-3, warmup_steps=10)
    state = TrainingState(model, make_optimizer(model, cfg), 0)
    batch = eval_batch(texts, tok, PreprocessConfig(128, 8192, 0.0))
    for epoch in range(epochs):
        for mb in batch.micro_batches(8, torch.Generator().manual_seed(epoch)):
            optimize(state, [mb], cfg, cpu)
    model.save_pretrained(out)  # type: ignore[operator]
    tok.save_pretrained(out)
    return out
