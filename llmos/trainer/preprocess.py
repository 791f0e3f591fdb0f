"""Stage 1 — preprocess: normalise, hold out, tokenize and pack claimed samples.

Packing: every block starts with EOS and every kept sample is followed by EOS, so each sample is
read as the start of a document (as generation sees a prompt), at the positions a prompt has:
they restart at every EOS (``sample_positions``). A block holds whole samples, at most
``block_size + 1`` tokens (inputs ``[:-1]``, targets ``[1:]``); only a sample longer than a block
is cut, into blocks of its own. Every target carries its sample's weight, which is > 0.

Micro-batches stack blocks of one length; a short block is padded (weight 0) up to a multiple of
``PAD_MULTIPLE`` targets, so the model sees a few dozen shapes instead of one per block length.
On a CPU every new shape costs oneDNN kernels and cache entries that stay: with every length
possible, the bf16 trainer's resident memory grew from 758 to 1,544 MiB over 120 cycles on a
queue of 32 sources' texts (tests/test_load.py now asserts it flat). A block that whole samples
do not fill is padded up to the next multiple (short texts: 3 of ~33 tokens fill 100 of 128).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from llmos.store.preferences import Preference
from llmos.store.queue import Sample
from llmos.text import normalise, text_hash
from llmos.trainer.preference import PreferenceSet, is_heldout_preference, preference_set

__all__ = ["normalise"]  # re-exported: the trainer's first step

# Samples made from feedback are never held out: a user who corrects the model expects it to learn.
FEEDBACK_SOURCE_PREFIX = "feedback:"
PAD_MULTIPLE = 32  # micro-batch lengths (targets) are multiples of this, up to the block size


@dataclass(frozen=True)
class PreprocessConfig:
    block_size: int
    max_sample_tokens: int
    heldout_fraction: float


class MicroBatch(NamedTuple):
    """Blocks of one padded length, stacked: token ids and per-token loss weights, each (B, T+1)
    (weight 0 marks padding); which rows hold new samples (B,), not replay (None: all); each
    token's position (B, T+1), counted from the EOS that starts its sample (None: from the block's
    start, the model's default); and which rows hold texts sampled from the base (B,), trained
    toward the base's distribution instead of their tokens (None: none)."""

    ids: torch.Tensor
    weights: torch.Tensor
    new: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    rehearse: torch.Tensor | None = None


def sample_positions(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """Positions (B, L) that restart at every EOS (and at the block's start): a sample is trained
    at the positions it is served at, after the EOS that starts a prompt. Counted from the block
    instead, a fact trained only at mid-block positions was not recalled from a prompt: on the
    CPU's fp32 path the end-to-end test's model answered " is n, number 44." where the trained
    text said " is Quellton"; with these positions it learned the fact in 54 steps instead of 90."""
    t = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    last_eos = torch.where(ids == eos, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - last_eos


@dataclass
class Batch:
    """Packed training data: blocks of token ids and per-token loss weights, each (T+1,).
    In micro-batches, weight 0 marks padding: it is never a target."""

    blocks: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)
    n_tokens: int = 0
    n_new_blocks: int = 0  # blocks[:n_new_blocks] hold new samples only; the rest are replay
    replay_ids: list[str] = field(default_factory=list)
    block_size: int = 0  # targets in a full block: padding never goes past it (0: no padding)
    rehearsal_from: int | None = None  # blocks[rehearsal_from:] hold texts sampled from the base
    eos: int | None = None  # where samples start (positions restart there); None: block positions

    def _padded_length(self, n: int) -> int:
        """The micro-batch length (T+1) of a block of ``n`` tokens."""
        targets = n - 1
        bucket = -(-targets // PAD_MULTIPLE) * PAD_MULTIPLE
        return min(bucket, max(self.block_size, targets)) + 1

    def __len__(self) -> int:
        return len(self.blocks)

    def with_blocks(self, blocks: list[torch.Tensor], weights: list[torch.Tensor]) -> Batch:
        """This batch with more old-data blocks after its own (base rehearsal, one pass's draw)."""
        return replace(
            self, blocks=self.blocks + blocks, weights=self.weights + weights, rehearsal_from=len(self.blocks)
        )

    def micro_batches(self, size: int, generator: torch.Generator | None = None) -> Iterator[MicroBatch]:
        """Micro-batches of at most ``size`` blocks of one padded length; shuffled when a
        generator is given. Padding has weight 0 (its token id is arbitrary)."""
        order = list(range(len(self.blocks)))
        if generator is not None:
            order = torch.randperm(len(order), generator=generator).tolist()
        by_len: dict[int, list[int]] = {}
        for i in order:
            by_len.setdefault(self._padded_length(int(self.blocks[i].numel())), []).append(i)
        for length, idxs in by_len.items():
            for start in range(0, len(idxs), size):
                chunk = idxs[start : start + size]
                ids = torch.zeros((len(chunk), length), dtype=torch.long)
                weights = torch.zeros((len(chunk), length), dtype=torch.float32)
                for row, i in enumerate(chunk):
                    n = self.blocks[i].numel()
                    ids[row, :n] = self.blocks[i]
                    weights[row, :n] = self.weights[i]
                new = torch.tensor([i < self.n_new_blocks for i in chunk])
                positions = None if self.eos is None else sample_positions(ids, self.eos)
                first = self.rehearsal_from
                rehearse = None if first is None else torch.tensor([i >= first for i in chunk])
                yield MicroBatch(ids, weights, new, positions, rehearse)


@dataclass
class Preprocessed:
    batch: Batch
    heldout: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    # Hashes of texts trained although their hash says "held out" (repeated, or feedback): any
    # held-out copy of them must leave the held-out set.
    rescued: set[str] = field(default_factory=set)


def heldout_by_hash(digest: str, fraction: float) -> bool:
    """Whether a text whose text_hash is ``digest`` is one of the ``fraction`` held out."""
    return fraction > 0 and int(digest[:16], 16) % 1_000_000 < fraction * 1_000_000


def is_heldout(text: str, fraction: float) -> bool:
    """Deterministic by content: the same text (after normalisation) always lands on the same side."""
    return heldout_by_hash(text_hash(text), fraction)


def pack(
    token_lists: Sequence[list[int]], sample_weights: Sequence[float], eos_id: int, block_size: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Blocks of at most ``block_size + 1`` tokens, each starting with EOS (never a target) and
    holding whole samples, each followed by EOS (its target, with the sample's weight): a sample
    that fits in a block is never cut. A sample is placed in the first block it fits (first-fit, in
    order); one longer than a block gets blocks of its own, cut into windows overlapping by one.

    Cutting the stream at fixed offsets, as llmos did first, trained the part of a text after a
    cut with none of the text before it: a short correction that straddled the cut was never
    learned as an answer to its prompt (one of four in a test kept failing, its loss stuck)."""
    if any(w <= 0 for w in sample_weights):
        raise ValueError("sample weights must be > 0 (weight 0 marks padding)")
    open_blocks: list[tuple[list[int], list[float]]] = []  # blocks with room left
    blocks: list[tuple[list[int], list[float]]] = []
    for ids, w in zip(token_lists, sample_weights, strict=True):
        piece, piece_w = [*ids, eos_id], [w] * (len(ids) + 1)
        if len(piece) > block_size:  # longer than a block: windows of its own
            stream, ws = [eos_id, *piece], [0.0, *piece_w]
            for start in range(0, len(stream) - 1, block_size):
                end = min(start + block_size + 1, len(stream))
                blocks.append((stream[start:end], ws[start:end]))
            continue
        home = next((b for b in open_blocks if len(b[0]) + len(piece) <= block_size + 1), None)
        if home is None:
            home = ([eos_id], [0.0])
            open_blocks.append(home)
            blocks.append(home)
        home[0].extend(piece)
        home[1].extend(piece_w)
        if len(home[0]) == block_size + 1:
            open_blocks.remove(home)
    return (
        [torch.tensor(b, dtype=torch.long) for b, _ in blocks],
        [torch.tensor(w, dtype=torch.float32) for _, w in blocks],
    )


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def preprocess(
    samples: Sequence[Sample],
    tokenizer: PreTrainedTokenizerBase,
    cfg: PreprocessConfig,
    replay: Sequence[Sample] = (),
    repeated: Collection[str] = (),
) -> Preprocessed:
    """Clean, hold out and pack the claimed samples; ``replay`` samples (already trained, drawn
    from the replay pool) are packed after them into their own blocks.

    What is held out: one text in ``heldout_fraction``, chosen by its hash, and only a text the
    user sent once. A correction or a rated completion always trains (the user is teaching), and
    so does a text sent more than once: its hash is in ``repeated`` (the store holds it twice),
    or it appears twice among ``samples``."""
    out = Preprocessed(batch=Batch())
    token_lists: list[list[int]] = []
    weights: list[float] = []
    digests = [s.text_hash or text_hash(s.text) for s in samples]
    copies: dict[str, int] = {}
    for d in digests:
        copies[d] = copies.get(d, 0) + 1
    for s, digest in zip(samples, digests, strict=True):
        text = normalise(s.text)
        if not text:
            out.rejected[s.id] = "empty after normalisation"
            continue
        if heldout_by_hash(digest, cfg.heldout_fraction):
            taught = (s.source or "").startswith(FEEDBACK_SOURCE_PREFIX)
            if not (taught or digest in repeated or copies[digest] > 1):
                out.heldout.append(s.id)
                continue
            out.rescued.add(digest)
        ids = encode(tokenizer, text)
        if len(ids) > cfg.max_sample_tokens:
            out.rejected[s.id] = f"too long: {len(ids)} tokens > train.max_sample_tokens={cfg.max_sample_tokens}"
            continue
        token_lists.append(ids)
        weights.append(s.weight)
        out.batch.sample_ids.append(s.id)
    if not token_lists:
        return out
    eos = tokenizer.eos_token_id
    assert eos is not None
    batch = out.batch
    batch.block_size, batch.eos = cfg.block_size, eos
    batch.blocks, batch.weights = pack(token_lists, weights, eos, cfg.block_size)
    batch.n_new_blocks = len(batch.blocks)
    batch.n_tokens = sum(len(t) + 1 for t in token_lists)
    old_lists = [encode(tokenizer, normalise(r.text))[: cfg.max_sample_tokens] for r in replay]
    kept = [(r, t) for r, t in zip(replay, old_lists, strict=True) if t]
    if kept:
        blocks, block_weights = pack([t for _, t in kept], [r.weight for r, _ in kept], eos, cfg.block_size)
        batch.blocks += blocks
        batch.weights += block_weights
        batch.replay_ids = [r.id for r, _ in kept]
        batch.n_tokens += sum(len(t) + 1 for _, t in kept)
    return out


def eval_batch(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, cfg: PreprocessConfig) -> Batch:
    """Pack held-out texts (already normalised when stored as held out) for evaluation."""
    token_lists = [encode(tokenizer, normalise(t))[: cfg.max_sample_tokens] for t in texts]
    token_lists = [t for t in token_lists if t]
    batch = Batch(block_size=cfg.block_size, eos=tokenizer.eos_token_id)
    if token_lists:
        eos = tokenizer.eos_token_id
        assert eos is not None
        batch.blocks, batch.weights = pack(token_lists, [1.0] * len(token_lists), eos, cfg.block_size)
        batch.n_tokens = sum(len(t) + 1 for t in token_lists)
    return batch


@dataclass
class PreprocessedPreferences:
    prefs: PreferenceSet | None  # None: nothing left to train
    heldout: list[str] = field(default_factory=list)


def preprocess_preferences(
    prefs: Sequence[Preference], tokenizer: PreTrainedTokenizerBase, cfg: PreprocessConfig, max_tokens: int
) -> PreprocessedPreferences:
    """Hold out ``heldout_fraction`` of the claimed preferences (by a hash of their content), for
    the gate's preference accuracy; the rest become completion rows to train on."""
    held = {p.id for p in prefs if is_heldout_preference(p, cfg.heldout_fraction)}
    kept = [p for p in prefs if p.id not in held]
    prefs_set = preference_set(kept, tokenizer, max_tokens) if kept else None
    return PreprocessedPreferences(prefs_set, [p.id for p in prefs if p.id in held])
