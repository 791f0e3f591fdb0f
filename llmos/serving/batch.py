"""Batched decoding: concurrent generation requests on the same model version share one forward
pass per token.

On the built-in model on a CPU core, a decoding step for 8 sequences costs 1.5x one for a single
sequence (18.6 against 12.6 ms for 32 tokens), so 8 requests decoded together make 5.4x the
tokens per second. One worker thread decodes the requests on one model (same version) at a time,
up to ``max_batch`` rows. Prompts are padded on the left, with attention mask and position ids, so
each row computes what it would alone. Between two steps, rows that stopped (EOS, their budget, or
a client that went away) leave, and requests waiting for the same model join: their prompts are
run on their own, and their KV cache is joined to the batch's, the shorter history padded on the
left; a batch drops the history no row still decoding reaches back to. Where a model's cache is
not plain per-layer tensors, rows stay to the end and later requests wait for the next batch.

What bounds a row's cost, however long traffic lasts:
- its batch's width: rows decode in one batch per class of prompt length (``_width_class``),
  one forward pass per class and step, so a row is never padded to a long prompt that arrived
  beside it (only to the longest history of its class);
- ``kv_tokens``: a request joins only while the caches stay within it at their widest (rows times
  the longest prompt and budget of their class), else it waits, first in line;
- ``chunk``: a prompt longer than this runs a chunk at a time, on its own cache, one chunk with
  each decoding step: in the step's own forward pass where the model allows it (it rides,
  llmos/serving/riding.py), else in a pass of its own between two steps. A long prompt arriving
  delays the other rows' tokens by what a chunk adds to a step, not by the whole prompt's pass.
  While rows decode, a chunk is sized to add no more than their decoding step, or little
  more than the cheapest chunk where that is more (``_Pace``, measured as it runs), on any
  device and model; ``chunk`` tokens at most.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from llmos.memory import trim
from llmos.serving.riding import can_ride, ride
from llmos.serving.types import SamplingParams

log = logging.getLogger(__name__)

Finish = Literal["stop", "length"]
TRIM_EVERY_S = 10.0  # how often the decoding thread gives the heap's free pages back (llmos/memory.py)
PickToken = Callable[[torch.Tensor, SamplingParams, torch.Generator | None], int]


@dataclass(eq=False)
class _Row:
    seq: list[int]  # EOS, then the prompt's token ids
    params: SamplingParams
    budget: int
    gen: torch.Generator | None
    each_token: bool = True  # hand each token over as it is made (else all of them at the end)
    events: queue.SimpleQueue[int | str | BaseException] = field(default_factory=queue.SimpleQueue)
    tokens: list[int] = field(default_factory=list)  # made so far, when not handed over one by one
    produced: int = 0
    done: bool = False
    cancelled: bool = False  # set by the consumer; read by the worker between steps

    @property
    def need(self) -> int:
        """Cache positions it can take: its prompt and the tokens it may generate."""
        return len(self.seq) + self.budget

    def gone(self) -> bool:
        """Done, or its consumer went away (then done from now on)."""
        if self.cancelled:
            self.done = True
        return self.done


@dataclass(eq=False)
class _Filling:
    """A long prompt being run a chunk at a time: how much of it has run, and the last pass's output."""

    row: _Row
    ran: int = 0
    out: Any = None

    @property
    def complete(self) -> bool:
        return self.ran == len(self.row.seq)


class Batcher:
    def __init__(
        self,
        device: torch.device,
        eos: int,
        max_batch: int,
        pick: PickToken,
        threads: int = 0,
        kv_tokens: int = 0,
        chunk: int = 0,
    ) -> None:
        self.device = device
        self.threads = threads  # torch threads of the decoding thread (0: the process's)
        self.eos = eos
        self.max_batch = max_batch
        self.kv_tokens = kv_tokens  # a batch's cache at its widest, in positions (0: no bound)
        self.chunk = chunk  # prompts longer than this run a chunk at a time (0: whole)
        self._pick_token = pick
        self._pending: deque[tuple[torch.nn.Module, _Row]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.cohorts = 0  # decoded so far, and the rows they held (rows / cohorts: the mean batch)
        self.rows = 0
        self.steps = 0  # forward passes
        self.widths = 0  # the cache positions those passes attended to, summed over rows
        self._trimmed = time.monotonic()
        self._members: list[_Row] = []  # the worker's: the rows of the batch it is decoding
        self._pace = _Pace(chunk)  # the worker's
        self.rides = 0  # chunks that ran in a decoding step's pass (llmos/serving/riding.py)

    def decode(
        self,
        model: torch.nn.Module,
        seq: list[int],
        params: SamplingParams,
        budget: int,
        gen: torch.Generator | None,
        each_token: bool = True,
    ) -> Generator[int | Finish]:
        """Token ids as the worker makes them, then the finish reason. Closing the iterator early
        (a client that went away) takes the row out of its cohort. With ``each_token`` False the
        tokens come all at once at the end: one hand-over (a thread woken) per request instead of
        one per token, for a caller that needs only the whole answer."""
        row = _Row(seq, params, budget, gen, each_token)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="llmos-decode", daemon=True)
                self._thread.start()
            self._pending.append((model, row))
            self._cond.notify()
        try:
            while True:
                event = row.events.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, str):
                    yield from row.tokens
                    yield "stop" if event == "stop" else "length"
                    return
                yield event
        finally:
            row.cancelled = True

    def _work(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # this thread's own (see llmos/threads.py)
        while True:
            self._next_cohort()  # its model and rows are not kept past it (a swapped-out version can go)

    def _next_cohort(self) -> None:
        self._members = []  # every row taken into this batch, those that joined later too
        try:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending))
                model = self._pending[0][0]
            cohort = self._take(model, [])
            self.cohorts += 1
            self._decode(model, cohort)
        except Exception as exc:  # each request gets its own error; the worker goes on
            log.exception("batched decoding failed")
            for row in self._members:
                if not row.done:
                    row.done = True
                    row.events.put(RuntimeError(f"decoding failed: {type(exc).__name__}: {exc}"))

    def _take(self, model: torch.nn.Module, held: list[_Row]) -> list[_Row]:
        """Waiting requests on ``model`` that join the rows ``held``, in order, while there is room
        (``max_batch`` rows, and caches of ``kv_tokens`` positions in all at their widest); none
        from behind a request on another model (which then goes next: a pinned version is not
        starved by the active one), nor from behind one that does not fit (it goes first once
        there is room)."""
        taken: list[_Row] = []
        widest: dict[int, tuple[int, int]] = {}  # width class -> (rows, their longest need)
        for row in held:
            n, w = widest.get(_width_class(row), (0, 0))
            widest[_width_class(row)] = n + 1, max(w, row.need)
        count = len(held)
        with self._cond:
            while self._pending and count < self.max_batch and self._pending[0][0] is model:
                row = self._pending[0][1]
                n, w = widest.get(_width_class(row), (0, 0))
                after = {**widest, _width_class(row): (n + 1, max(w, row.need))}
                if count and self.kv_tokens and sum(n * w for n, w in after.values()) > self.kv_tokens:
                    break
                self._pending.popleft()
                taken.append(row)
                count, widest = count + 1, after
        self.rows += len(taken)
        self._members += taken
        return taken

    @torch.inference_mode()
    def _decode(self, model: torch.nn.Module, fresh: list[_Row]) -> None:
        """Decode until every row is done. Rows decode in one batch per width class (see
        _width_class), each batch one forward pass per step; rows join between two steps."""
        batches: dict[int, tuple[_Running, list[int]]] = {}  # width class -> batch, each row's next token
        if self.chunk:
            can_ride(model, _reserve)  # checked once per model, before its first tokens rather than mid-stream
        filling: list[_Filling] = []  # long prompts, a chunk per step, first come first
        while True:
            for row in fresh:
                if self._chunked(row):
                    filling.append(_Filling(row))
            for cls, rows in _by_class(row for row in fresh if not self._chunked(row)).items():
                self._join(batches, cls, self._prefill(model, rows))  # run together, in one pass
            filling = [f for f in filling if not f.row.gone()]
            rider: int | None = None  # the class of the batch whose step carried a chunk
            rode = 0.0  # what that pass cost
            done: _Filling | None = None  # a prompt whose last chunk rode: it joins after the step
            if filling:  # a chunk per step
                first = filling[0]
                cls = _width_class(first.row)
                # (a batch whose cache cannot take rows finishes before they join it)
                if cls not in batches or batches[cls][0].editable:
                    decoding = bool(batches)
                    rider = self._rider(model, batches)
                    t0 = time.perf_counter()
                    if rider is not None:
                        self._ride(model, first, self._pace.tokens(decoding), batches[rider])
                        rode = time.perf_counter() - t0
                    else:
                        self._fill(model, first, self._pace.tokens(decoding))
                        self._pace.filled(time.perf_counter() - t0, decoding)
                    if first.complete:
                        filling.pop(0)
                        if rider is None:
                            self._join(batches, cls, self._filled(first))
                        else:
                            done = first
            if not batches and not filling:
                return
            t0 = time.perf_counter()
            for cls, (batch, nxt) in list(batches.items()):
                if cls != rider:  # (the rider stepped in the chunk's pass)
                    batch.step(model, nxt)
                self._count(batch.mask)
                nxt = self._pick(batch)
                if batch.finished:
                    del batches[cls]
                else:
                    batches[cls] = batch.without_done(nxt) if batch.editable else (batch, nxt)
            if rider is not None:  # the pass and the rest of a step: what a step would have cost, and the chunk
                self._pace.rode(rode + time.perf_counter() - t0)
            elif batches:
                self._pace.stepped(time.perf_counter() - t0)
            if done is not None:
                self._join(batches, _width_class(done.row), self._filled(done))
            if time.monotonic() - self._trimmed > TRIM_EVERY_S:  # caches come and go: a batch may never end
                trim()
                self._trimmed = time.monotonic()
            fresh = []
            if self._pending and all(batch.editable for batch, _nxt in batches.values()):
                held = [row for batch, _nxt in batches.values() for row in batch.rows if not row.done]
                fresh = self._take(model, held + [f.row for f in filling])

    def _chunked(self, row: _Row) -> bool:
        return 0 < self.chunk < len(row.seq)

    def _join(self, batches: dict[int, tuple[_Running, list[int]]], cls: int, new: _Running) -> None:
        """Rows whose prompt has just run, with their first token, joined to their class's batch."""
        new_nxt = self._pick(new)
        if new.editable:  # (a cache that cannot drop rows keeps them to the end)
            new, new_nxt = new.without_done(new_nxt)
        if new.finished:
            return
        if cls not in batches:
            batches[cls] = new, new_nxt
        else:
            batch, nxt = batches[cls]
            batches[cls] = batch.merged(new), nxt + new_nxt

    def _count(self, mask: torch.Tensor) -> None:
        self.steps += 1
        self.widths += mask.shape[0] * mask.shape[1]

    def _prefill(self, model: torch.nn.Module, rows: list[_Row]) -> _Running:
        width = max(len(r.seq) for r in rows)
        ids = torch.tensor([[self.eos] * (width - len(r.seq)) + r.seq for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.seq)) + [1] * len(r.seq) for r in rows], device=self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each row's positions start at 0
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        self._count(mask)
        return self._started(rows, mask, pos[:, -1:], out)

    def _fill(self, model: torch.nn.Module, f: _Filling, tokens: int) -> None:
        """The next ``tokens`` of a long prompt, on the cache of the chunks before it."""
        start, end = f.ran, min(f.ran + tokens, len(f.row.seq))
        ids = torch.tensor([f.row.seq[start:end]], device=self.device)
        mask = torch.ones(1, end, dtype=torch.long, device=self.device)
        pos = torch.arange(start, end, device=self.device)[None]
        past = {} if f.out is None else {_cache_arg(f.out): f.out[_cache_arg(f.out)]}
        f.out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **past)
        if start == 0:
            _reserve(f.out[_cache_arg(f.out)], len(f.row.seq))
        f.ran = end
        self._count(mask)

    def _rider(self, model: torch.nn.Module, batches: dict[int, tuple[_Running, list[int]]]) -> int | None:
        """The class of a batch whose next step can carry the chunk (llmos/serving/riding.py), if any."""
        for cls, (batch, _nxt) in batches.items():
            if batch.editable and not batch.finished and can_ride(model, _reserve):
                return cls
        return None

    def _ride(self, model: torch.nn.Module, f: _Filling, tokens: int, ridden: tuple[_Running, list[int]]) -> None:
        """The next ``tokens`` of a long prompt in one pass with the next step of a batch."""
        batch, nxt = ridden
        start, end = f.ran, min(f.ran + tokens, len(f.row.seq))
        if f.out is None:  # the first chunk: a cache with room for the whole prompt
            cache = DynamicCache()
            cache.layers = [_ReservedLayer(len(f.row.seq)) for _ in batch.cache.layers]
        else:
            cache = f.out[_cache_arg(f.out)]
        batch.advance()
        rows, last = ride(
            model, batch.cache, batch.mask, batch.pos, nxt, cache, f.row.seq[start:end], start, batch.cache_arg
        )
        batch.out.logits = rows  # (B, 1, V); the cache was written in place
        f.out = type(batch.out)(logits=last, **{batch.cache_arg: cache})
        f.ran = end
        self.rides += 1
        self._count(torch.ones(1, end, dtype=torch.long))

    def _filled(self, f: _Filling) -> _Running:
        n = len(f.row.seq)
        _release(f.out[_cache_arg(f.out)])
        mask = torch.ones(1, n, dtype=torch.long, device=self.device)
        return self._started([f.row], mask, torch.tensor([[n - 1]], device=self.device), f.out)

    def _started(self, rows: list[_Row], mask: torch.Tensor, pos: torch.Tensor, out: Any) -> _Running:
        for row in rows:
            if row.budget <= 0:
                self._finish(row, "length")
        return _Running(rows, mask, pos, out, self.eos)

    def _pick(self, batch: _Running) -> list[int]:
        """Each row's next token from the last forward pass; a row that stops gets EOS (fed to the
        model and ignored while the row is still in the batch)."""
        last = batch.out.logits[:, -1]  # (B, V)
        greedy = last.argmax(-1).tolist()  # one operation for every greedy row
        sampled = any(row.params.temperature > 0 for row in batch.rows)
        logits = last.to("cpu", torch.float32) if sampled else None
        nxt = []
        for i, row in enumerate(batch.rows):
            if row.gone():
                nxt.append(self.eos)
                continue
            tok = self._pick_token(logits[i], row.params, row.gen) if logits is not None else greedy[i]
            if tok == self.eos:
                self._finish(row, "stop")
            else:
                if row.each_token:
                    row.events.put(tok)
                else:
                    row.tokens.append(tok)
                row.produced += 1
                if row.produced == row.budget:
                    self._finish(row, "length")
            nxt.append(tok)
        return nxt

    @staticmethod
    def _finish(row: _Row, reason: Finish) -> None:
        row.done = True
        row.events.put(reason)


class _Pace:
    """How many tokens of a long prompt run with each decoding step. Alone, ``most``; while rows
    decode, the largest power-of-two share of ``most`` (``FEWEST`` at least) whose chunk adds no
    more than their decoding step to the gap between their tokens, or, where even the
    cheapest chunk adds more (a pass of its own pays a forward pass's fixed cost: reading the
    weights, launching kernels), no more than ``SLACK`` times the cheapest. What a chunk adds is
    its own pass's cost, or, where it rides on the step (llmos/serving/riding.py), what the
    riding pass costs over a step.
    Measured, not modelled: what a chunk costs against a step depends on the device, the model
    and the batch (on the built-in model on a CPU a forward pass costs about the same for 1 token
    and for 16, on a GPU the same for 1 and for hundreds), so each size's cost is kept as a moving
    average as chunks of it run. The first chunk is the smallest (a first chunk of 64 tokens on a
    6 x 512 model on a CPU added two steps to the gap). A chunk over its budget halves the next;
    one over a step tries half its size once, to learn whether smaller is cheaper (unless halving
    last time did not make it so); one within budget doubles the next unless the double is known
    to be over it. Where the cost hardly depends on the size, a smaller chunk would only delay the long
    prompt, so the chunks stay large: halving at every chunk that cost more than a step took them
    to the floor there (a 6 x 512 model on a CPU read a 2,000-token prompt 8 tokens a step: its
    first token after 13.7 s, against 1.1 s whole). The decoding step is a moving average too, so
    one slow step does not unsettle it. A whole step, not half of one: riding on a 6 x 512 model
    on a CPU, a budget of half a step kept chunks at 8 tokens, and a 2,000-token prompt reached its
    first token in 6.7 to 7.7 s, against 3.3 to 5.2 s with a whole step, while the streams' p99 gap
    stayed within the machine's jitter either way (2.2 to 3.1x their median gap with half a step,
    2.1 to 2.6x with a whole one; scratch runs, session 18)."""

    FEWEST = 8
    SLACK = 1.2

    def __init__(self, most: int) -> None:
        self.most = most
        self.size = min(self.FEWEST, most)  # while rows decode: from the smallest, doubling while within budget
        self.step_s: float | None = None  # the decoding step's cost, an exponential moving average
        self.cost: dict[int, float] = {}  # a chunk's cost by its size, moving averages

    def tokens(self, decoding: bool) -> int:
        return self.size if decoding else self.most

    def stepped(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s is None else 0.9 * self.step_s + 0.1 * seconds

    def rode(self, seconds: float) -> None:
        """A chunk rode on a step, which cost ``seconds`` in all: it added what that is over a step."""
        if self.step_s is not None:
            self.filled(max(seconds - self.step_s, 0.0), decoding=True)

    def filled(self, seconds: float, decoding: bool) -> None:
        if not decoding or self.step_s is None:
            return
        size, step = self.size, self.step_s
        self.cost[size] = seconds if size not in self.cost else 0.7 * self.cost[size] + 0.3 * seconds
        budget = max(step, self.SLACK * min(self.cost.values()))
        half, double = max(size // 2, min(self.FEWEST, self.most)), size * 2
        # Over a step, half not tried yet, and the last halving (if any) made chunks cheaper: try it.
        helped = double not in self.cost or self.cost[double] > self.SLACK * self.cost[size]
        explore = half not in self.cost and self.cost[size] > step and helped
        if self.cost[size] > budget or explore:
            self.size = half
        elif double <= self.most and self.cost.get(double, 0.0) <= budget:
            self.size = double


class _ReservedLayer(DynamicLayer):
    """A DynamicLayer with room for a whole prompt, its chunks written in place: the keys and
    values it hands the model are views of what has been written. DynamicLayer copies the whole
    history into a new tensor at every update, so reading a prompt a chunk at a time cost its
    length squared (a 6 x 512 model on a CPU: a chunk of 8 tokens on a history of 2,000 cost 39 ms,
    on one of 60, 21 ms; most of the difference the copy)."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._n = 0

    @classmethod
    def holding(cls, layer: DynamicLayer, capacity: int) -> _ReservedLayer:
        """One with room for ``capacity`` positions, holding what ``layer`` holds."""
        assert layer.keys is not None and layer.values is not None
        reserved = cls(capacity)
        reserved.update(layer.keys, layer.values)
        return reserved

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self._n == 0:  # (B, H, L, D): room for the whole prompt
            k, v = key_states, value_states
            self.lazy_initialization(k, v)
            self._k = k.new_empty(*k.shape[:2], self.capacity, k.shape[3])
            self._v = v.new_empty(*v.shape[:2], self.capacity, v.shape[3])
        end = self._n + key_states.shape[-2]
        self._k[:, :, self._n : end] = key_states
        self._v[:, :, self._n : end] = value_states
        self._n = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values


def _reserve(cache: Any, capacity: int) -> None:
    """Give each plain layer of a prompt's cache room for ``capacity`` positions (its first chunk in it)."""
    if isinstance(cache, DynamicCache):
        cache.layers = [
            _ReservedLayer.holding(layer, capacity) if type(layer) is DynamicLayer and layer.keys is not None else layer
            for layer in cache.layers
        ]


def _release(cache: Any) -> None:
    """The prompt's cache back to plain layers (each holding what was written), to join a batch."""
    if isinstance(cache, DynamicCache):
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, _ReservedLayer):
                plain = DynamicLayer()
                assert layer.keys is not None and layer.values is not None
                plain.lazy_initialization(layer.keys, layer.values)
                plain.keys, plain.values = layer.keys, layer.values
                cache.layers[i] = plain


SHARED_WIDTH = 256


def _width_class(row: _Row) -> int:
    """Rows whose prompts are up to SHARED_WIDTH tokens decode together; longer ones with those
    of up to twice their length or half of it. A row's history is padded to the longest of its
    batch: a short request never pays for a long prompt that arrived beside it (a 2,000-token
    prompt padded 8 short rows to its width: each step cost 10x). By the prompt, not by prompt
    and max_new_tokens: clients often ask for far more tokens than they take (OpenAI SDKs: 4,096
    by default), and a class for each would split one batch into several forward passes for
    answers that end at the same EOS; a long answer widens its batch a token at a time."""
    return max(len(row.seq) - 1, SHARED_WIDTH - 1).bit_length()


def _by_class(rows: Iterable[_Row]) -> dict[int, list[_Row]]:
    out: dict[int, list[_Row]] = {}
    for row in rows:
        out.setdefault(_width_class(row), []).append(row)
    return out


def _cache_arg(out: Any) -> str:
    return "cache" if "cache" in out else "past_key_values"  # transformers 5 / older


class _Running:
    """A batch being decoded: its rows, attention mask (B, L), each row's last position (B, 1),
    and the last forward pass's output (logits and KV cache)."""

    def __init__(self, rows: list[_Row], mask: torch.Tensor, pos: torch.Tensor, out: Any, eos: int) -> None:
        self.rows, self.mask, self.pos, self.out, self.eos = rows, mask, pos, out, eos
        self.cache_arg = _cache_arg(out)
        cache = out[self.cache_arg]
        # Rows can leave and join only where the KV cache is plain per-layer tensors.
        self.editable = isinstance(cache, DynamicCache) and all(
            type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])
        )

    @property
    def cache(self) -> Any:
        return self.out[self.cache_arg]

    @property
    def finished(self) -> bool:
        return all(row.done for row in self.rows)

    def advance(self) -> None:
        """The mask and positions of the next step: a column more, a position on."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.pos = self.pos + 1

    def step(self, model: torch.nn.Module, nxt: list[int]) -> None:
        self.advance()
        x = torch.tensor(nxt, device=self.mask.device)[:, None]  # (B, 1)
        cache = {self.cache_arg: self.cache}
        self.out = model(input_ids=x, attention_mask=self.mask, position_ids=self.pos, use_cache=True, **cache)

    def without_done(self, nxt: list[int]) -> tuple[_Running, list[int]]:
        """The rows still going (a batch whose rows all stopped keeps its last one, to end on),
        and the history only they use: the columns of the cache and mask that held rows that left
        and that no row still going reaches back to are dropped. Without that, a batch that rows
        keep joining never ends, and every step attended to every token since it began (6
        overlapping clients for 20 s: a mask 1,843 wide where each request needed 36)."""
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows) or not keep:
            return self, nxt
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.pos = self.mask[index], self.pos[index]
        unused = int(self.mask.any(dim=0).int().argmax())  # the leading columns no row attends to
        if unused > 0:
            for layer in self.cache.layers:  # (B, H, L, D): positions are per row, so none moves
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]
        return self, [nxt[i] for i in keep]

    def merged(self, other: _Running) -> _Running:
        """``other``'s rows joined to these: the shorter history is padded on the left (masked)."""
        length = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([pad(mine.keys, 2), pad(theirs.keys, 2)])  # (B, H, L, D)
            mine.values = torch.cat([pad(mine.values, 2), pad(theirs.values, 2)])
        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)])
        self.pos = torch.cat([self.pos, other.pos])
        self.rows = self.rows + other.rows
        return self
