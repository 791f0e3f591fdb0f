"""An API replica follows the store: promotions and rollbacks that other processes commit (the
trainer alone, another replica's admin) reach this one's engine by a poll of the store's active
version. The engine's sync() swaps one reference, so no request fails during a swap.

Polling only, for now: on PostgreSQL a LISTEN on a channel that promotion and rollback NOTIFY in
their transaction would bring the swap closer to the commit; the poll would stay as the fallback."""

from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger(__name__)


class Syncs(Protocol):
    def sync(self) -> int: ...  # serve the registry's active version (llmos/serving/engine.py)


class Follower:
    def __init__(self, engine: Syncs, interval_s: float) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="llmos-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        failing = False  # say once that the store cannot be read, and once that it can again
        while not self._stop.wait(self._interval_s):
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
