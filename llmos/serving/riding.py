"""A chunk of a long prompt riding on a decoding step: one forward pass for both.

Run apart, a chunk and a step each pay a forward pass's fixed cost (reading every weight,
launching every kernel), which on a CPU or a GPU is most of what a small pass costs: on a 6 x 512
model on a CPU, a step of 8 rows cost 14 ms, a chunk of 8 tokens 16 ms more, so each chunk
doubled the gap between the streams' tokens whatever its size. Packed into one sequence, the
rows' next tokens and the chunk go through every linear layer together; only attention is split,
each part on its own cache (the batch's rows on theirs, the prompt on its reserved one), through
an attention function registered with transformers (``AttentionInterface``) that the model calls
in place of its own for that one pass, and that runs the model's own (SDPA, or its eager one) on
each part. The pair cost 0.64-0.75x the two passes apart (built-in and
6 x 512 models, chunks of 8 to 64 tokens; a scratch measurement of session 18).

It needs a model whose attention goes through transformers' attention interface with the cache's
``update`` (every decoder in transformers 5 that supports SDPA), on SDPA or eager attention (the
built-in model on a CPU is served on eager: llmos/wiring.py); ``can_ride`` checks a model once,
comparing a riding pass with the two passes apart on a few tokens, and the batcher runs chunks
apart for a model that fails it.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "llmos_riding"  # the attention implementation's name while a pass rides
RIDES_ON = ("sdpa", "eager")  # the attention implementations a riding pass computes with


@dataclass(frozen=True)
class _Plan:
    rows: int  # the batch's rows: the first ``rows`` tokens of the packed sequence, one each
    batch: DynamicCache  # their cache, layers (B, H, L, D)
    batch_mask: torch.Tensor  # (B, 1, 1, L + 1), 0 where a row attends, the dtype's least elsewhere
    prompt: DynamicCache  # the prompt's cache (reserved layers, llmos/serving/batch.py)
    prompt_mask: torch.Tensor  # (1, 1, C, start + C), the same, causal from the chunk's start
    inner: str  # the model's own attention implementation, which computes each part


def _inner(module: torch.nn.Module, name: str) -> Callable[..., Any]:
    """The model's own attention function: SDPA's, or the eager one its modeling file defines."""
    if name == "sdpa":
        return sdpa_attention_forward
    eager: Callable[..., Any] = sys.modules[type(module).__module__].eager_attention_forward  # type: ignore[attr-defined]
    return eager


_local = threading.local()  # the plan of the pass this thread is running, if it rides


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kw: Any,
) -> tuple[torch.Tensor, None]:
    plan: _Plan | None = getattr(_local, "plan", None)
    if plan is None:  # a pass that does not ride (another thread's, on this model): plain SDPA
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
        return out, None
    i, b, attend = int(module.layer_idx), plan.rows, _inner(module, plan.inner)  # type: ignore[arg-type]
    mine: Any = plan.batch.layers[i]
    theirs: Any = plan.prompt.layers[i]
    # query, key, value: (1, H, B + C, D). The rows' tokens as a batch of B: (B, H, 1, D).
    q, k, v = (t[:, :, :b].transpose(0, 2) for t in (query, key, value))
    k, v = mine.update(k, v)
    rows, _ = attend(module, q, k, v, plan.batch_mask, **kw)  # (B, 1, H, D)
    k, v = theirs.update(key[:, :, b:], value[:, :, b:])
    chunk, _ = attend(module, query[:, :, b:], k, v, plan.prompt_mask, **kw)  # (1, C, H, D)
    return torch.cat([rows.transpose(0, 1), chunk], dim=1), None  # (1, B + C, H, D)


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


class _Aside:
    """The cache the model is handed for a riding pass: it hands each layer's new keys and values
    to the attention function, which writes them to the caches of the plan."""

    def update(
        self, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return key, value

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return 0


@contextmanager
def _riding(model: torch.nn.Module, plan: _Plan) -> Iterator[None]:
    config: Any = model.config
    configs = list({id(c): c for c in (config, config.get_text_config())}.values())
    before = [c._attn_implementation for c in configs]
    _local.plan = plan
    for c in configs:
        c._attn_implementation = NAME
    try:
        yield
    finally:
        for c, name in zip(configs, before, strict=True):
            c._attn_implementation = name
        _local.plan = None


def ride(
    model: torch.nn.Module,
    batch: DynamicCache,
    mask: torch.Tensor,
    pos: torch.Tensor,
    nxt: list[int],
    prompt: DynamicCache,
    chunk: list[int],
    start: int,
    cache_arg: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: the batch's next tokens ``nxt`` at positions ``pos`` (B, 1) with ``mask`` (B, L + 1)
    (the new column included), and the prompt's tokens ``chunk`` from position ``start``. Both
    caches gain their new keys and values. Returns the rows' logits (B, 1, V) and those of the
    chunk's last token (1, 1, V)."""
    device, b, c = mask.device, len(nxt), len(chunk)
    end = start + c
    seen = torch.arange(end, device=device)[None, :] <= torch.arange(start, end, device=device)[:, None]
    config: Any = model.config
    dtype = next(model.parameters()).dtype
    plan = _Plan(
        b,
        batch,
        _additive(mask.bool()[:, None, None, :], dtype),
        prompt,
        _additive(seen[None, None], dtype),
        config._attn_implementation,
    )
    ids = torch.tensor([nxt + chunk], device=device)  # (1, B + C)
    positions = torch.cat([pos[:, 0], torch.arange(start, end, device=device)])[None]  # (1, B + C)
    packed = torch.ones(1, 1, b + c, b + c, dtype=torch.bool, device=device)  # 4D: the model builds none
    keep = torch.tensor([*range(b), b + c - 1], device=device)
    with _riding(model, plan):
        out = model(
            input_ids=ids,
            attention_mask=packed,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=keep,
            **{cache_arg: _Aside()},
        )
    logits = out.logits[0]  # (B + 1, V)
    return logits[:b, None], logits[b:][None]


def _additive(attends: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask both SDPA and eager attention add to the scores: 0 where ``attends``, else the least value."""
    return torch.zeros(attends.shape, dtype=dtype, device=attends.device).masked_fill(~attends, torch.finfo(dtype).min)


_checked: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def can_ride(model: torch.nn.Module, reserve: Any) -> bool:
    """Whether ``ride`` computes what the two passes apart compute on ``model``: checked once per
    model on a few tokens (two rows of 3, a prompt of 2 then a chunk of 3). ``reserve(cache, n)``
    makes a prompt's cache as the batcher does."""
    if model in _checked:
        return _checked[model]
    ok = False
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) in RIDES_ON:
        try:
            ok = _agrees(model, reserve)
        except Exception:  # noqa: BLE001 - a model this cannot drive decodes the plain way
            ok = False
    _checked[model] = ok
    return ok


@torch.inference_mode()
def _agrees(model: torch.nn.Module, reserve: Any) -> bool:
    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size  # type: ignore[union-attr, operator]
    ids = (torch.arange(1, 12, device=device) * 7919) % vocab
    rows, prompt = ids[:6].view(2, 3), ids[6:]
    mask = torch.ones(2, 4, dtype=torch.long, device=device)
    pos = torch.full((2, 1), 3, device=device)

    def start() -> tuple[Any, Any, str]:
        a = model(input_ids=rows, attention_mask=mask[:, :3], use_cache=True)
        arg = "cache" if "cache" in a else "past_key_values"
        p = model(input_ids=prompt[None, :2], use_cache=True)
        reserve(p[arg], 5)
        return a[arg], p[arg], arg

    batch, cache, arg = start()
    nxt = [int(t) for t in ids[:2]]
    step = model(
        input_ids=torch.tensor(nxt, device=device)[:, None],
        attention_mask=mask,
        position_ids=pos,
        use_cache=True,
        **{arg: batch},
    ).logits
    chunk = model(
        input_ids=prompt[None, 2:],
        attention_mask=torch.ones(1, 5, dtype=torch.long, device=device),
        position_ids=torch.arange(2, 5, device=device)[None],
        use_cache=True,
        logits_to_keep=1,
        **{arg: cache},
    ).logits
    batch, cache, arg = start()
    got_step, got_chunk = ride(model, batch, mask, pos, nxt, cache, [int(t) for t in prompt[2:]], 2, arg)
    scale = 1.0 + float(step.abs().max())
    return bool(
        torch.allclose(got_step.float(), step.float(), rtol=0, atol=2e-2 * scale)
        and torch.allclose(got_chunk.float(), chunk.float(), rtol=0, atol=2e-2 * scale)
        and bool((got_step.argmax(-1) == step.argmax(-1)).all())
    )
