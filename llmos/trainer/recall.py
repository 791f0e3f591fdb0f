"""What was taught, measured: each text's loss, and whether greedy decoding recalls it.

A text is split into a prompt and its answer: a (prompt + answer) sample such as a correction
splits where its prompt ends; a plain text before its last third of words ("The capital of
Zorbia" | " is Quellton."), or of characters when it has fewer than three words (Chinese, say).
The text is *recalled* when greedy decoding from ``EOS + prompt``, as serving runs it, gives the
answer. That needs no decoding: greedy decoding follows the answer exactly as long as every
answer token is the model's most likely next token given the tokens before it, so one forward
pass over ``EOS + prompt + answer`` tells, for every text of a batch at once.

Each text is its own row (right-padded), positions from 0 as in serving: packed blocks would let
a text attend to the one before it, which a user's prompt never has.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from llmos.text import normalise

RECALL_CHARS = 512  # a longer plain text is measured on its opening: its first 512 characters
# The early stop wants every answer token this many nats more likely than the next best: one that
# just makes it flips back under the next batch (a fact recalled at promotion, " is Zoto.", was
# " is Zozo." one batch of corrections later, its "t" then 1.4 nats behind).
MARGIN = 1.0
_WORD = re.compile(r"\S+")


def split_answer(text: str) -> tuple[str, str]:
    """(prompt, answer) of a plain text: the answer is its last third of words (at least one), with
    the space before it, or the last third of its characters when it has fewer than three words."""
    words = list(_WORD.finditer(text))
    if len(words) >= 3:
        keep = len(words) - max(1, math.ceil(len(words) / 3))
        cut = words[keep - 1].end()
    else:
        cut = len(text) - max(1, math.ceil(len(text) / 3))
    return text[:cut], text[cut:]


@dataclass(frozen=True)
class TextSet:
    """Texts one per row: ``ids`` (N, L) is EOS + prompt + answer, right-padded with EOS;
    ``targets`` (N, L-1) marks the next-token predictions that are the text's own, ``answer``
    (N, L-1) those of its answer."""

    ids: torch.Tensor
    targets: torch.Tensor
    answer: torch.Tensor

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def text_set(
    texts: Sequence[str],
    prompt_chars: Sequence[int | None],
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int,
) -> TextSet:
    """The texts as recall rows; ``prompt_chars[i]``: where text i's prompt ends (None: a plain
    text, split by split_answer). Rows longer than ``max_tokens`` lose the start of their prompt."""
    eos = tokenizer.eos_token_id
    assert eos is not None
    rows: list[tuple[list[int], int]] = []  # (ids, where the answer starts)
    for text, cut in zip(texts, prompt_chars, strict=True):
        if cut is None:
            prompt_text, answer_text = split_answer(normalise(text)[:RECALL_CHARS])
        else:  # as the user sent the prompt, and as it is served
            prompt_text, answer_text = text[:cut], text[cut:]
        p = list(tokenizer.encode(prompt_text, add_special_tokens=False))
        a = list(tokenizer.encode(answer_text, add_special_tokens=False))[: max_tokens - 2]
        p = p[max(0, len(p) + len(a) + 1 - max_tokens) :]
        rows.append(([eos, *p, *a], 1 + len(p)))
    n, width = len(rows), max((len(r) for r, _ in rows), default=1)
    ids = torch.full((n, width), eos, dtype=torch.long)
    targets = torch.zeros((n, width - 1), dtype=torch.bool)
    answer = torch.zeros((n, width - 1), dtype=torch.bool)
    for i, (row, start) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        targets[i, : len(row) - 1] = True
        answer[i, start - 1 : len(row) - 1] = True  # the prediction at t is of token t + 1
    return TextSet(ids, targets, answer)


@dataclass(frozen=True)
class TextScores:
    """Per text: its token loss summed, its number of tokens, whether it is recalled, and whether
    it is recalled with a margin (every answer token at least ``margin`` nats more likely than
    any other token: a recall that the next batch's small changes will not flip)."""

    loss_sum: list[float]
    tokens: list[int]
    recalled: list[bool]
    firmly: list[bool]

    @property
    def loss(self) -> float:
        """Mean token loss over all texts."""
        return sum(self.loss_sum) / max(1, sum(self.tokens))

    @property
    def recall(self) -> float:
        """Fraction of texts recalled."""
        return sum(self.recalled) / max(1, len(self.recalled))


def input_mask(targets: torch.Tensor) -> torch.Tensor:
    """The attention mask (B, T) of the inputs ``ids[:, :-1]`` of rows whose targets are ``targets``
    (B, T): the leading EOS and every token that is some row's own (padding follows them all)."""
    return torch.cat([torch.ones_like(targets[:, :1]), targets[:, :-1]], dim=1).long()


@torch.inference_mode()
def text_scores(
    model: torch.nn.Module,
    ts: TextSet,
    device: torch.device,
    micro_batch: int,
    between: Callable[[], None] | None = None,
    margin: float = MARGIN,
) -> TextScores:
    """Loss and recall of every text, in fp32 as served; ``between`` runs before each micro-batch."""
    was_training = model.training
    model.eval()
    loss_sum: list[float] = []
    tokens: list[int] = []
    recalled: list[bool] = []
    firmly: list[bool] = []
    try:
        for start in range(0, len(ts), micro_batch):
            if between is not None:
                between()
            rows = slice(start, start + micro_batch)
            targets, answer = ts.targets[rows], ts.answer[rows]
            width = int(targets.sum(dim=1).max()) + 1  # the longest row of this micro-batch
            ids = ts.ids[rows, :width].to(device)
            targets, answer = targets[:, : width - 1].to(device), answer[:, : width - 1].to(device)
            logits = model(input_ids=ids[:, :-1], attention_mask=input_mask(targets), use_cache=False).logits.float()
            y = ids[:, 1:]  # logits: (B, T, V)
            losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)  # (B, T)
            right = logits.gather(-1, y[..., None]).squeeze(-1)  # (B, T)
            other = logits.scatter(-1, y[..., None], -torch.inf).amax(dim=-1)  # the best wrong token
            gap = torch.where(answer, right - other, torch.inf)  # (B, T): logits' gap = log-probs' gap
            worst = gap.amin(dim=1)  # (B,)
            stats = torch.stack([(losses * targets).sum(1), targets.sum(1).float(), worst], 1)
            for loss, n, w in stats.tolist():
                loss_sum.append(loss)
                tokens.append(int(n))
                recalled.append(w > 0)
                firmly.append(w >= margin)
    finally:
        model.train(was_training)
    return TextScores(loss_sum, tokens, recalled, firmly)
