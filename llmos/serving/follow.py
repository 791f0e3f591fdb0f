"""An API replica follows the store: promotions and rollbacks that other processes commit (the
trainer alone, another replica's admin) reach this one's engine (and the trainer alone follows
rollbacks the same way: llmos/trainer/alone.py). It reads the store's active
version every ``interval_s``, and at once when told (``listen``: PostgreSQL's LISTEN on the
channel that promotion and rollback NOTIFY, llmos/store/notify.py); the poll stays, for notices a
dropped connection missed. The engine's sync() swaps one reference: no request fails in a swap."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

# Blocks until the event is set, calling the callback for each notice (llmos/store/notify.py listen).
Listen = Callable[[Callable[[], None], threading.Event], None]


class Syncs(Protocol):
    def sync(self) -> int: ...  # serve the registry's active version (llmos/serving/engine.py)


class Follower:
    def __init__(self, engine: Syncs, interval_s: float, listen: Listen | None = None) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._listen = listen
        self._stop = threading.Event()
        self._due = threading.Event()  # a notice came: read the active version now
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._threads.append(threading.Thread(target=self._run, name="llmos-follower", daemon=True))
        if self._listen is not None:
            args = (self._due.set, self._stop)
            self._threads.append(threading.Thread(target=self._listen, args=args, name="llmos-listener", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._due.set()
        for t in self._threads:
            t.join(10)

    def _run(self) -> None:
        failing = False  # say once that the store cannot be read, and once that it can again
        while True:
            self._due.wait(self._interval_s)
            self._due.clear()
            if self._stop.is_set():
                return
            try:
                self._engine.sync()
            except Exception as exc:  # the store is down, or a version's files are unreadable: keep serving
                if not failing:
                    log.warning("cannot follow the store's active version: %s: %s", type(exc).__name__, exc)
                failing = True
                continue
            if failing:
                log.info("following the store's active version again")
            failing = False
