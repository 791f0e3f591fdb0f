"""Blocking work read from the event loop, without a worker of the server's thread pool.

A generation blocks for as long as it decodes: it waits on the batcher's thread for every token.
Run in a sync route or with ``asyncio.to_thread``, each one holds a worker of a pool shared with
every other blocking call: Starlette's 40 for sync routes, ``min(32, cores + 4)`` for
``asyncio.to_thread``. Forty slow generations would then stall every sync route behind them
(health checks, ingest, status), and six OpenAI completions would stop a seventh from joining
the decoding batch. So each generation runs on a thread of its own and hands its events to the
event loop, and the server bounds how many it holds with ``serving.max_requests`` instead.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class End:
    """The work is over: no more events."""


END = End()


class Busy(Exception):
    """Every place for a generation is taken (serving.max_requests)."""


class Slots:
    """How many generations the server holds at once, decoding or waiting for a place in the
    batch: each has a thread, so the count is bounded, and past it a request is refused at once
    (429, retry later) instead of waiting where no deadline reaches it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def take(self) -> None:
        with self._lock:
            if self._used >= self.limit:
                raise Busy(f"{self._used} generations are in progress, the most this server takes at once")
            self._used += 1

    def give(self) -> None:
        with self._lock:
            self._used -= 1


class Relay(Generic[T]):
    """Runs ``events()`` to its end on a thread of its own (unless cancelled) and hands each item,
    or the exception that ended it, to the event loop that created the relay. The iterator is
    closed on that thread, so whatever it holds (a decoding slot) is freed there; then the relay
    gives its place back to ``slots``, which it took when it started (Busy when there was none)."""

    def __init__(self, slots: Slots, events: Callable[[], Iterator[T]], name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[T | Exception | End] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._slots = slots
        slots.take()
        try:
            threading.Thread(target=self._work, args=(events,), name=name, daemon=True).start()
        except BaseException:
            slots.give()
            raise

    def _put(self, item: T | Exception | End) -> None:
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the event loop is gone (the server is shutting down)
            self._cancelled.set()

    def _work(self, events: Callable[[], Iterator[T]]) -> None:
        it: Iterator[T] | None = None
        try:
            it = events()
            for item in it:
                if self._cancelled.is_set():
                    break
                self._put(item)
        except Exception as exc:
            self._put(exc)
        finally:
            close = getattr(it, "close", None)
            try:
                if close is not None:
                    close()
            finally:
                self._slots.give()
                self._put(END)

    async def next(self) -> T | Exception | End:
        """The next item, the exception that ended the work, or END."""
        return await self._items.get()

    def cancel(self) -> None:
        """Stop at the next item (the client went away)."""
        self._cancelled.set()


async def call(slots: Slots, fn: Callable[[], T], name: str) -> T:
    """``fn()`` on a thread of its own; its result, or its exception raised here."""
    relay: Relay[T] = Relay(slots, lambda: iter((fn(),)), name)
    item = await relay.next()
    if isinstance(item, Exception):
        raise item
    assert not isinstance(item, End)
    return item
