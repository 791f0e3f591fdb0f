"""Batched decoding: concurrent generation requests on the same model version share one forward
pass per token.

On the built-in model on a CPU core, a decoding step for 8 sequences costs 1.5x one for a single
sequence (18.6 against 12.6 ms for 32 tokens), so 8 requests decoded together make 5.4x the
tokens per second. One worker thread decodes a cohort at a time: every request queued when it
starts that runs on the same model (same version), up to ``max_batch``. Prompts are padded on the
left, with attention mask and position ids, so each row computes what it would alone; requests
that arrive meanwhile wait for the next cohort. A row that stops (EOS, its budget, or a client
that went away) drops out of the output at once; the cohort ends when every row has.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Literal

import torch

from llmos.serving.types import SamplingParams

log = logging.getLogger(__name__)

Finish = Literal["stop", "length"]
PickToken = Callable[[torch.Tensor, SamplingParams, torch.Generator | None], int]


@dataclass(eq=False)
class _Row:
    seq: list[int]  # EOS, then the prompt's token ids
    params: SamplingParams
    budget: int
    gen: torch.Generator | None
    events: queue.SimpleQueue[int | str | BaseException] = field(default_factory=queue.SimpleQueue)
    produced: int = 0
    done: bool = False
    cancelled: bool = False  # set by the consumer; read by the worker between steps


class Batcher:
    def __init__(self, device: torch.device, eos: int, max_batch: int, pick: PickToken) -> None:
        self.device = device
        self.eos = eos
        self.max_batch = max_batch
        self._pick = pick
        self._pending: deque[tuple[torch.nn.Module, _Row]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.cohorts = 0  # decoded so far, and the rows they held (rows / cohorts: the mean batch)
        self.rows = 0
        self.steps = 0  # forward passes

    def decode(
        self, model: torch.nn.Module, seq: list[int], params: SamplingParams, budget: int, gen: torch.Generator | None
    ) -> Generator[int | Finish]:
        """Token ids as the worker makes them, then the finish reason. Closing the iterator early
        (a client that went away) takes the row out of its cohort."""
        row = _Row(seq, params, budget, gen)
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
                    yield "stop" if event == "stop" else "length"
                    return
                yield event
        finally:
            row.cancelled = True

    def _work(self) -> None:
        while True:
            self._next_cohort()  # its model and rows are not kept past it (a swapped-out version can go)

    def _next_cohort(self) -> None:
        cohort: list[_Row] = []
        try:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending))
                model = self._pending[0][0]
                cohort = [row for m, row in self._pending if m is model][: self.max_batch]
                taken = {id(row) for row in cohort}
                self._pending = deque((m, r) for m, r in self._pending if id(r) not in taken)
                self.cohorts += 1
                self.rows += len(cohort)
            self._decode(model, cohort)
        except Exception as exc:  # each request gets its own error; the worker goes on
            log.exception("batched decoding failed")
            for row in cohort:
                if not row.done:
                    row.done = True
                    row.events.put(RuntimeError(f"decoding failed: {type(exc).__name__}: {exc}"))

    @torch.inference_mode()
    def _decode(self, model: torch.nn.Module, rows: list[_Row]) -> None:
        width = max(len(r.seq) for r in rows)
        ids = torch.tensor([[self.eos] * (width - len(r.seq)) + r.seq for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.seq)) + [1] * len(r.seq) for r in rows], device=self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each row's positions start at 0
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        self.steps += 1
        cache_arg = "cache" if "cache" in out else "past_key_values"  # transformers 5 / older
        pos = pos[:, -1:]
        for row in rows:
            if row.budget <= 0:
                self._finish(row, "length")
        while True:
            logits = out.logits[:, -1].to("cpu", torch.float32)  # (B, V)
            nxt = []
            for i, row in enumerate(rows):
                if not row.done and row.cancelled:
                    row.done = True
                if row.done:
                    nxt.append(self.eos)  # computed and ignored until the cohort ends
                    continue
                tok = self._pick(logits[i], row.params, row.gen)
                if tok == self.eos:
                    self._finish(row, "stop")
                else:
                    row.events.put(tok)
                    row.produced += 1
                    if row.produced == row.budget:
                        self._finish(row, "length")
                nxt.append(tok)
            if all(row.done for row in rows):
                return
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            pos = pos + 1
            x = torch.tensor(nxt, device=self.device)[:, None]  # (B, 1)
            cache = {cache_arg: out[cache_arg]}
            out = model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=True, **cache)
            self.steps += 1

    @staticmethod
    def _finish(row: _Row, reason: Finish) -> None:
        row.done = True
        row.events.put(reason)
