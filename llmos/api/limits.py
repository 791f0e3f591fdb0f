"""Rate limits: token buckets in memory, one per key (an API key, a client address, a source label).

A bucket holds up to ``burst`` tokens and refills at ``rate_per_s``; a request takes its cost in
tokens or is told how long to wait (the Retry-After of a 429). Only the ``max_tracked`` most
recently seen keys are kept, so a client inventing keys cannot grow memory without bound; a
forgotten key starts again with a full bucket. With ``limits.storage_url`` set, the same limits
are kept in shared storage instead (SharedRateLimiter), so that API replicas share them.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class Limiter(Protocol):
    rate_per_s: float
    burst: int

    def take(self, costs: Mapping[str, float]) -> float: ...


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        max_tracked: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate_per_s = rate_per_s  # 0 = no limit
        self.burst = burst
        self.max_tracked = max_tracked
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def take(self, costs: Mapping[str, float]) -> float:
        """Take ``costs[key]`` tokens from each key's bucket, all or none. Returns 0 when taken,
        otherwise the seconds until all would be available (math.inf if a cost exceeds the burst)."""
        if not self.enabled:
            return 0.0
        if any(c > self.burst for c in costs.values()):
            return math.inf
        with self._lock:
            now = self._clock()
            buckets = {k: self._refilled(k, now) for k in costs}
            wait = max((max(0.0, c - buckets[k].tokens) / self.rate_per_s for k, c in costs.items()), default=0.0)
            if wait > 0:
                return wait
            for k, c in costs.items():
                buckets[k].tokens -= c
            return 0.0

    def _refilled(self, key: str, now: float) -> _Bucket:
        b = self._buckets.get(key)
        if b is None:
            b = _Bucket(float(self.burst), now)
            self._buckets[key] = b
            while len(self._buckets) > self.max_tracked:
                self._buckets.popitem(last=False)  # the least recently seen
        else:
            self._buckets.move_to_end(key)
            b.tokens = min(float(self.burst), b.tokens + (now - b.updated) * self.rate_per_s)
            b.updated = now
        return b

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(wait_s: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))


class SharedRateLimiter:
    """The same limits kept in shared storage (``limits.storage_url``, e.g. ``redis://host:6379/0``),
    so that every API replica counts against one budget per key and per source.

    Built on the ``limits`` library's sliding-window counter, whose state lives in the storage
    (two counters per key, expiring by themselves: nothing grows in this process). A bucket of
    ``burst`` refilled at ``rate_per_s`` becomes ``burst`` per window of ``burst / rate_per_s``
    seconds: the same sustained rate and the same largest burst. A multi-key take tests every key
    and then takes from each; two replicas racing between the two may both pass, so the bound is
    close, not exact. When the storage cannot be reached, requests pass (the limit fails open, as a
    rate limiter in front of a service usually does) and a warning is logged once a minute: an
    outage of the limiter's storage is not an outage of llmos.
    """

    def __init__(self, rate_per_s: float, burst: int, storage_url: str, namespace: str) -> None:
        from limits import RateLimitItemPerSecond
        from limits.storage import storage_from_string
        from limits.strategies import SlidingWindowCounterRateLimiter

        self.rate_per_s = rate_per_s
        self.burst = burst
        options: dict[str, float | str | bool] = {}
        if storage_url.startswith(("redis", "valkey")):
            options = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}  # never hang a request on it
        self._storage = storage_from_string(storage_url, **options)
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)
        window = max(1, round(burst / rate_per_s)) if rate_per_s > 0 else 1
        self._item = RateLimitItemPerSecond(burst, window, namespace=namespace)
        self._errors = self._storage.base_exceptions
        self._warned = -math.inf

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def reachable(self) -> bool:
        try:
            return bool(self._storage.check())
        except self._errors:
            return False

    def take(self, costs: Mapping[str, float]) -> float:
        """As RateLimiter.take: 0 when taken, else the seconds to wait (math.inf past the burst)."""
        if not self.enabled:
            return 0.0
        if any(c > self.burst for c in costs.values()):
            return math.inf
        whole = {k: max(1, math.ceil(c)) for k, c in costs.items()}
        try:
            for k, c in whole.items():
                if not self._limiter.test(self._item, k, cost=c):
                    return self._wait(k, c)
            for k, c in whole.items():
                if not self._limiter.hit(self._item, k, cost=c):
                    return self._wait(k, c)  # another replica took it between the test and the hit
        except self._errors as exc:
            now = time.monotonic()
            if now - self._warned >= 60:
                self._warned = now
                log.warning("rate limits not enforced: their storage is unreachable (%s)", exc)
            return 0.0
        return 0.0

    def _wait(self, key: str, cost: int) -> float:
        stats = self._limiter.get_window_stats(self._item, key)
        until_reset = stats.reset_time - time.time()
        return max(until_reset, (cost - stats.remaining) / self.rate_per_s, 0.001)


def make_limiter(rate_per_s: float, burst: int, max_tracked: int, storage_url: str | None, kind: str) -> Limiter:
    """In memory, per process; or in shared storage when ``storage_url`` is set (replicas)."""
    if storage_url is None:
        return RateLimiter(rate_per_s, burst, max_tracked)
    shared = SharedRateLimiter(rate_per_s, burst, storage_url, namespace=f"llmos-{kind}")
    if shared.enabled and not shared.reachable():
        where = storage_url.split("@")[-1]  # without a password
        log.warning("limits.storage_url (%s) cannot be reached: rate limits pass until it can", where)
    return shared
