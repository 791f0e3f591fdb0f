"""Rate limits: token buckets in memory, one per key (an API key, a client address, a source label).

A bucket holds up to ``burst`` tokens and refills at ``rate_per_s``; a request takes its cost in
tokens or is told how long to wait (the Retry-After of a 429). Only the ``max_tracked`` most
recently seen keys are kept, so a client inventing keys cannot grow memory without bound; a
forgotten key starts again with a full bucket.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass


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
