"""The serving engine: holds the active model version and swaps it by one reference.

A swap loads the new version into a standby model first, then replaces the reference; requests
in flight keep the (version, model) pair they started with and finish on it. The engine never
touches the trainer's model: it loads versions from the registry, as another replica would.
Decoding runs on one thread, in batches (serving/batch.py).
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray
from typing import Literal

import torch

from llmos.model.loader import ModelFactory
from llmos.registry.registry import Registry
from llmos.serving.batch import Batcher
from llmos.serving.types import CacheFull, Completion, PromptTooLong, SamplingParams
from llmos.store.tables import CheckpointStatus

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Loaded:
    """A version's weights in a model. ``users`` and ``recycled`` change under the engine's lock."""

    version: int
    model: torch.nn.Module
    users: int = 0  # generations that decode on it, or wait to
    recycled: bool = False  # its model now holds another version's weights: take another


KV_POSITIONS_PER_REQUEST = 256  # what the default KV budget allows each of serving.max_requests


class NotPinnable(ValueError):
    """A request pinned a version that was never promoted (a candidate, or rejected by the gate)."""

    def __init__(self, version: int, status: str) -> None:
        super().__init__(f"version {version} is {status}, not promoted; only promoted versions can be served")
        self.version = version
        self.status = status


Activity = ctypes.Array[ctypes.c_double]  # see ServingEngine.activity


def quiet(activity: Activity, quiet_s: float) -> bool:
    """No generation in flight, and none ended in the last ``quiet_s`` seconds."""
    in_flight, last_end = activity[:]
    return in_flight == 0 and time.monotonic() - last_end >= quiet_s


def pick_token(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """logits (V,) -> next token id: greedy at temperature 0, else nucleus sampling."""
    if p.temperature == 0:
        return int(logits.argmax())
    # float64: a temperature near 0 would overflow float32 logits / t.
    probs = torch.softmax(logits.double() / p.temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        return int(logits.argmax())  # the limit of sampling as the temperature goes to 0
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < p.top_p
        keep[0] = True  # always keep the most likely token, however small top_p is
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class ServingEngine:
    def __init__(
        self,
        factory: ModelFactory,
        registry: Registry,
        max_concurrency: int = 1,
        pinned_versions: int = 2,
        decode_threads: int = 0,
        kv_cache_tokens: int = 0,
        prefill_chunk_tokens: int = 0,
        max_requests: int = 256,
    ) -> None:
        self._factory = factory
        self._registry = registry
        # The cache positions that generations in progress may take, each its prompt and its
        # max_new_tokens, decoding or waiting. 0: max_requests requests of 256 positions, so that
        # by default ordinary requests meet the count (max_requests) first, and a request's 429
        # comes from its length only when many long ones are held (tests/test_e2e.py: 100 at once
        # on max_concurrency 2 must queue, not fail).
        self.kv_budget = kv_cache_tokens or KV_POSITIONS_PER_REQUEST * max_requests
        self._kv_held = 0  # under _idle
        # Generations run on the batcher's thread, up to max_concurrency at once, one forward pass
        # per token for all of them.
        self._batcher = Batcher(
            factory.device,
            factory.tokenizer.eos_token_id,
            max_concurrency,
            pick_token,
            decode_threads,
            self.kv_budget,
            prefill_chunk_tokens,
        )
        self._swap_lock = threading.Lock()
        self._current: Loaded | None = None
        # The version served before the current one: once no generation holds it, the next swap
        # loads the new weights into its model in place, instead of building a model (1.3 ms
        # against 7.3 ms for the built-in model, time a request in flight could stall on the GIL).
        self._spare: Loaded | None = None
        self._use_lock = threading.Lock()
        self.tokenizer = factory.tokenizer
        self.device = factory.device
        self.last_swap_s: float | None = None
        # Versions that requests pinned (model "llmos@<version>"), least recently used first.
        self._pinned: OrderedDict[int, Loaded] = OrderedDict()
        self._pinned_lock = threading.Lock()
        self._pinned_max = pinned_versions
        # Generation requests started and not finished (waiting for a slot included): the trainer
        # yields the CPU to them between its steps (see wait_idle), and takes more threads (opt-in)
        # only once none has run for a while (see quiet and llmos/threads.py).
        self._idle = threading.Condition()
        # [generations in flight, time.monotonic() when the last one ended], written under _idle;
        # in shared memory, so that a trainer process reads them too (see activity).
        self._activity: Activity = RawArray(ctypes.c_double, (0.0, -math.inf))

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def batches(self) -> tuple[int, int, int]:
        """(batches, rows, forward passes) decoded so far."""
        b = self._batcher
        return b.cohorts, b.rows, b.steps

    @property
    def rides(self) -> int:
        """Chunks of long prompts read inside a decoding step's forward pass (llmos/serving/riding.py)."""
        return self._batcher.rides

    @property
    def attended(self) -> int:
        """Cache positions the forward passes of decoding attended to so far, summed over rows:
        per generated token, the cost of decoding."""
        return self._batcher.widths

    @property
    def kv_held(self) -> int:
        """Cache positions taken by the generations in progress (see kv_budget)."""
        return self._kv_held

    @property
    def in_flight(self) -> int:
        return int(self._activity[0])

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no generation is in flight, or ``timeout_s`` passed; True when idle."""
        with self._idle:
            return self._idle.wait_for(lambda: self._activity[0] == 0, timeout_s)

    def quiet(self, quiet_s: float) -> bool:
        with self._idle:
            return quiet(self._activity, quiet_s)

    @property
    def activity(self) -> Activity:
        """What quiet() reads, in shared memory: a trainer process is handed it at its start."""
        return self._activity

    def current(self) -> Loaded:
        cur = self._current
        if cur is None:
            raise RuntimeError("no model loaded yet")
        return cur

    def sync(self) -> int:
        """Serve the registry's active version; load and swap if it changed. Returns the version."""
        with self._swap_lock:
            target = self._registry.active_version()
            if self._current is not None and self._current.version == target:
                return target
            t0 = time.perf_counter()
            path = self._registry.weights_path(target)  # verified
            spare = self._spare
            with self._use_lock:
                if path is None or spare is None or spare.users > 0:
                    spare = None  # version 0 (the base) or nothing free: a new model
                else:
                    spare.recycled = True  # a request that took it a moment ago takes the new one
            if spare is None:
                model = self._factory.instance(path)  # standby
            else:
                assert path is not None
                model = spare.model
                self._factory.load_weights(model, path)  # in place: no generation holds it
            self._spare, self._current = self._current, Loaded(target, model)  # the swap: one reference
            self.last_swap_s = time.perf_counter() - t0
            log.info("serving version %d (loaded in %.3fs)", target, self.last_swap_s)
            return target

    def pinned(self, version: int) -> Loaded:
        """A stored promoted version, loaded from the registry as sync() does; the active one is
        shared, others are kept in a small LRU. Raises UnknownVersion (never stored, or pruned),
        NotPinnable (not promoted) or CorruptCheckpoint."""
        status = self._registry.get(version).status  # asked every time: a pruned version must 404
        if status is not CheckpointStatus.promoted:
            raise NotPinnable(version, status.value)
        cur = self._current
        if cur is not None and cur.version == version:
            return cur
        with self._pinned_lock:
            hit = self._pinned.get(version)
            if hit is not None:
                self._pinned.move_to_end(version)
                return hit
            t0 = time.perf_counter()
            loaded = Loaded(version, self._factory.instance(self._registry.weights_path(version)))
            self._pinned[version] = loaded
            while len(self._pinned) > self._pinned_max:
                self._pinned.popitem(last=False)
            log.info("loaded pinned version %d in %.3fs", version, time.perf_counter() - t0)
            return loaded

    def encode_prompt(self, prompt: str, max_new_tokens: int) -> list[int]:
        ids = list(self.tokenizer.encode(prompt, add_special_tokens=False))
        ctx = self._factory.context_length
        if len(ids) + 1 >= ctx:
            raise PromptTooLong(f"prompt is {len(ids)} tokens; the model's context holds {ctx - 2} at most")
        return ids

    def _budget(self, ids: list[int], params: SamplingParams) -> int:
        """The tokens a generation may make: max_new_tokens, or what the context has left."""
        return min(params.max_new_tokens, self._factory.context_length - len(ids) - 1)

    def generate(self, prompt: str, params: SamplingParams, version: int | None = None) -> Completion:
        return _collect(self.stream(prompt, params, version, each_token=False))

    def stream(
        self, prompt: str, params: SamplingParams, version: int | None = None, each_token: bool = True
    ) -> Generator[tuple[int, Completion | None]]:
        """Yield (token id, None) per new token, then (-1, Completion) at the end. ``version``
        pins the request to a stored promoted version (see pinned()); None means the active one.
        The generator holds no thread state between tokens: it may be resumed from any thread
        (one at a time), as a streaming response's worker threads do. Raises PromptTooLong, and
        CacheFull when the generations in progress hold the KV-cache budget (retry later)."""
        ids = self.encode_prompt(prompt, params.max_new_tokens)
        need = len(ids) + 1 + self._budget(ids, params)  # EOS, the prompt, what it may generate
        if need > self.kv_budget:
            raise PromptTooLong(
                f"prompt and max_new_tokens need {need} tokens of KV cache; the server holds "
                f"{self.kv_budget} (serving.kv_cache_tokens): ask for fewer tokens"
            )
        with self._idle:
            if self._kv_held + need > self.kv_budget:
                raise CacheFull(
                    f"generations in progress hold {self._kv_held} of {self.kv_budget} tokens of KV cache "
                    f"and this one needs {need}"
                )
            self._kv_held += need
            self._activity[0] += 1
        try:
            yield from self._decode(ids, params, version, each_token)
        finally:
            with self._idle:
                self._kv_held -= need
                self._activity[0] -= 1
                if self._activity[0] == 0:
                    self._activity[1] = time.monotonic()
                    self._idle.notify_all()

    def _decode(
        self, ids: list[int], params: SamplingParams, version: int | None, each_token: bool
    ) -> Generator[tuple[int, Completion | None]]:
        loaded = self._hold(version)
        try:
            yield from self._decode_on(loaded, ids, params, each_token)
        finally:
            with self._use_lock:
                loaded.users -= 1

    def _hold(self, version: int | None) -> Loaded:
        """The version this request finishes on, whatever swaps meanwhile, counted as in use so
        that no swap loads other weights into its model."""
        while True:
            loaded = self.pinned(version) if version is not None else self.current()
            with self._use_lock:
                if not loaded.recycled:
                    loaded.users += 1
                    return loaded

    def _decode_on(
        self, loaded: Loaded, ids: list[int], params: SamplingParams, each_token: bool
    ) -> Generator[tuple[int, Completion | None]]:
        gen = None
        if params.seed is not None and params.temperature > 0:
            gen = torch.Generator(device="cpu").manual_seed(params.seed)
        budget = self._budget(ids, params)
        eos = self.tokenizer.eos_token_id
        new: list[int] = []
        finish: Literal["stop", "length"] = "length"
        # The stream starts with EOS, as every training sample does. closing(): a client that goes
        # away takes its row out of the batch at once.
        with closing(self._batcher.decode(loaded.model, [eos, *ids], params, budget, gen, each_token)) as events:
            for event in events:
                if isinstance(event, str):
                    finish = event
                    break
                new.append(event)
                yield event, None
        yield -1, Completion(str(self.tokenizer.decode(new)), loaded.version, len(ids), len(new), finish)


def _collect(events: Iterator[tuple[int, Completion | None]]) -> Completion:
    for _tok, done in events:
        if done is not None:
            return done
    raise RuntimeError("generation ended without a result")
