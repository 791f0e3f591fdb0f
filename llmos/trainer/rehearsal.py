"""Base rehearsal: what the base model knew, kept in every batch.

Replay keeps what llmos was taught; it cannot keep what the base model knew before llmos saw any
text, since none of that is in the store. So, for a pretrained base, the trainer asks the base
model itself: once, it samples ``pool`` texts from the base (each begun at EOS, as a document
starts, at temperature 1, so they follow the base's own distribution) and keeps them in a file
beside the checkpoints; every pass over a batch then carries ``per_pass`` of them, drawn afresh
(so the passes cover the pool at a fraction of its cost), after the replayed texts. Those rows are
trained toward the base's whole next-token distribution at each position, the KL divergence from
it (``replay.base_loss: kl``, distillation as in Learning without Forgetting), instead of toward
the one token sampled there (``lm``): where the batch's own texts do not pull the model away, it
stays the base.

Measured with ``make bench-teach`` (bench/results/teach.md; docs/learning.md): on a small
pretrained base, the first batch of 8 facts took every answer the base had to its own corpus
prompts (24 of 24 right before, 0 after) under replay alone. Distillation of 128 texts a pass
kept them; 64 a pass, or the sampled tokens instead of the distributions, kept fewer (scratch runs
of bench/teach.py). A pool of 256 kept them on one machine but not on another (an Intel Xeon, whose
arithmetic trains a different base: the first facts garbled 3 of its answers); 1024, at the same
cost per pass, kept them there too. It costs training time, each pass carrying ``per_pass`` more rows and a
forward pass of the base over them; and on a base with random weights (the built-in model
``make run`` starts from) it would rehearse noise: ``replay.base_rehearsal: auto`` turns it off for
random weights llmos made itself (the built-in model, or any directory ``create_tiny`` wrote, which
holds ``llmos-random-weights.json``) and on for every other model.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from llmos.store.queue import Sample
from llmos.store.tables import SampleStatus
from llmos.text import normalise
from llmos.trainer.preprocess import encode, pack

SOURCE = "base-rehearsal"  # the source of the samples drawn (they are never in the store)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class RehearsalConfig:
    path: Path  # where the sampled texts are kept (written once, read on every start)
    base: str  # the base model they were sampled from: another base samples anew
    per_pass: int  # texts packed into each pass over a batch, drawn afresh each pass
    pool: int  # texts sampled from the base
    max_tokens: int  # longest text sampled
    sample_batch: int = 32  # texts sampled at once
    distill: bool = True  # train them toward the base's distribution (KL), not their sampled tokens


def sample_texts(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    n: int,
    max_tokens: int,
    seed: int,
    device: torch.device,
    batch: int = 32,
) -> list[str]:
    """``n`` texts the model writes from EOS, sampled at temperature 1 (no top-k, no top-p):
    its own distribution. Seeded, without touching the caller's random state."""
    eos = tokenizer.eos_token_id
    assert eos is not None
    texts: list[str] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        while len(texts) < n:
            rows = min(batch, n - len(texts))
            start = torch.full((rows, 1), eos, dtype=torch.long, device=device)
            out = model.generate(  # type: ignore[operator]
                input_ids=start,
                attention_mask=torch.ones_like(start),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_tokens,
                pad_token_id=eos,
                eos_token_id=eos,
            )  # (rows, 1 + up to max_tokens)
            for row in out[:, 1:].tolist():
                cut = row.index(eos) if eos in row else len(row)
                texts.append(str(tokenizer.decode(row[:cut], skip_special_tokens=True)))
    return texts


class BasePool:
    """The texts sampled from the base, drawn into batches. Written once to ``cfg.path`` (through
    a temporary file and a rename), so a restarted trainer rehearses the same texts and resumes
    exactly; sampled lazily, at the first batch, so a start does not wait for it."""

    def __init__(self, cfg: RehearsalConfig) -> None:
        self.cfg = cfg
        self._samples: list[Sample] | None = None
        self._tokens: dict[str, list[int]] = {}  # token ids by sample id, encoded once

    def draw(
        self, rng: random.Random, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device
    ) -> list[Sample]:
        """``per_pass`` samples (with repeats only when the pool is smaller)."""
        pool = self._load(model, tokenizer, device)
        if not pool:
            return []
        if self.cfg.per_pass >= len(pool):
            return [pool[i % len(pool)] for i in range(self.cfg.per_pass)]
        return rng.sample(pool, self.cfg.per_pass)

    def blocks(
        self,
        rng: random.Random,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        block_size: int,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A draw, packed as replayed texts are: blocks of token ids and loss weights."""
        drawn = self.draw(rng, model, tokenizer, device)
        if not drawn:
            return [], []
        for s in drawn:
            if s.id not in self._tokens:
                self._tokens[s.id] = encode(tokenizer, normalise(s.text))[:block_size]
        eos = tokenizer.eos_token_id
        assert eos is not None
        kept = [self._tokens[s.id] for s in drawn if self._tokens[s.id]]
        return pack(kept, [1.0] * len(kept), eos, block_size)

    def _load(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> list[Sample]:
        if self._samples is None:
            path, kept = self.cfg.path, self._read()
            if kept is not None:
                texts = kept
            else:
                texts = sample_texts(model, tokenizer, self.cfg.pool, self.cfg.max_tokens, 0, device)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                with tmp.open("w", encoding="utf-8") as f:
                    json.dump({"base": self.cfg.base, "texts": texts}, f, ensure_ascii=False)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            self._samples = [_sample(i, t) for i, t in enumerate(texts) if t.strip()]
        return self._samples

    def _read(self) -> list[str] | None:
        """The texts kept, if they were sampled from this base (a pool of another size is kept as it is)."""
        try:
            kept = json.loads(self.cfg.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return list(kept["texts"]) if kept.get("base") == self.cfg.base else None


def _sample(i: int, text: str) -> Sample:
    return Sample(
        id=f"{SOURCE}:{i}",
        seq=0,
        text=text,
        source=SOURCE,
        weight=1.0,
        status=SampleStatus.trained,
        reason=None,
        trained_in_version=None,
        created_at=_EPOCH,
    )
