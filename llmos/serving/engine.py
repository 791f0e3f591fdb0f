"""The serving engine: holds the active model version and swaps it by one reference.

A swap loads the new version into a standby model first, then replaces the reference; requests
in flight keep the (version, model) pair they started with and finish on it. The engine never
touches the trainer's model: it loads versions from the registry, as another replica would.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from llmos.model.loader import ModelFactory
from llmos.registry.registry import Registry
from llmos.serving.types import Completion, PromptTooLong, SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    version: int
    model: PreTrainedModel


def pick_token(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """logits (V,) -> next token id: greedy at temperature 0, else nucleus sampling."""
    if p.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class ServingEngine:
    def __init__(self, factory: ModelFactory, registry: Registry, max_concurrency: int = 1) -> None:
        self._factory = factory
        self._registry = registry
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._swap_lock = threading.Lock()
        self._current: Loaded | None = None
        self.tokenizer = factory.tokenizer
        self.device = factory.device
        self.last_swap_s: float | None = None
        # transformers 5 names the KV cache argument ``cache``; older models ``past_key_values``.
        self._cache_arg = "cache"

    @property
    def ready(self) -> bool:
        return self._current is not None

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
            model = self._factory.instance(self._registry.weights_path(target))  # standby
            params = inspect.signature(model.forward).parameters
            self._cache_arg = "cache" if "cache" in params else "past_key_values"
            self._current = Loaded(target, model)  # the swap: one reference
            self.last_swap_s = time.perf_counter() - t0
            log.info("serving version %d (loaded in %.3fs)", target, self.last_swap_s)
            return target

    def encode_prompt(self, prompt: str, max_new_tokens: int) -> list[int]:
        ids = list(self.tokenizer.encode(prompt, add_special_tokens=False))
        ctx = self._factory.context_length
        if len(ids) + 1 >= ctx:
            raise PromptTooLong(f"prompt is {len(ids)} tokens; the model's context holds {ctx - 2} at most")
        return ids

    def generate(self, prompt: str, params: SamplingParams) -> Completion:
        return _collect(self.stream(prompt, params))

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[tuple[int, Completion | None]]:
        """Yield (token id, None) per new token, then (-1, Completion) at the end."""
        ids = self.encode_prompt(prompt, params.max_new_tokens)
        with self._slots:
            loaded = self.current()  # this request finishes on this version, whatever swaps meanwhile
            model = loaded.model
            eos = self.tokenizer.eos_token_id
            ctx = self._factory.context_length
            budget = min(params.max_new_tokens, ctx - len(ids) - 1)
            gen = None
            if params.seed is not None and params.temperature > 0:
                gen = torch.Generator(device="cpu").manual_seed(params.seed)
            new: list[int] = []
            finish: Literal["stop", "length"] = "length"
            with torch.inference_mode():
                # The stream starts with EOS, as every training sample does.
                x = torch.tensor([[eos, *ids]], device=self.device)  # (1, T)
                out = model(input_ids=x, use_cache=True, logits_to_keep=1)
                for _ in range(budget):
                    logits = out.logits[0, -1].to("cpu", torch.float32)  # (V,)
                    tok = pick_token(logits, params, gen)
                    if tok == eos:
                        finish = "stop"
                        break
                    new.append(tok)
                    yield tok, None
                    if len(new) == budget:
                        break
                    x = torch.tensor([[tok]], device=self.device)
                    out = model(input_ids=x, use_cache=True, **{self._cache_arg: out[self._cache_arg]})
            text = str(self.tokenizer.decode(new))
            yield -1, Completion(text, loaded.version, len(ids), len(new), finish)


def _collect(events: Iterator[tuple[int, Completion | None]]) -> Completion:
    for _tok, done in events:
        if done is not None:
            return done
    raise RuntimeError("generation ended without a result")
