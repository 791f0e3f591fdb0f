"""Preference losses against the served version as the reference: DPO for pairs, KTO for one side
alone (a thumbs up or down).

- DPO (Rafailov et al., 2023), the sigmoid loss: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))),
  where pi_c is the policy's summed log-probability of the chosen completion given the prompt.
- KTO (Ethayarajh et al., 2024): a desirable completion's loss is 1 - sigmoid(beta * (pi - ref - z)),
  an undesirable one's 1 - sigmoid(beta * (z - (pi - ref))), with z the batch's KL estimate: the
  policy's log-ratio on mismatched (prompt, completion) pairs, detached and at least 0.

The formulas are TRL's (DPOTrainer and KTOTrainer, loss types "sigmoid" and "kto");
tests/test_preference.py checks these functions against TRL's own numbers. TRL's trainers are
not used directly: they own the training loop, which here is llmos's.

The reference is the version being served when the preferences are claimed: what users rated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from llmos.store.preferences import Preference
from llmos.trainer.recall import TextSet, input_mask, text_set

Loss = Literal["dpo", "kto"]


@dataclass(frozen=True)
class PreferenceSet:
    """Preferences as completion rows (``rows``: EOS + prompt + completion, the completion's
    predictions marked as its answer), and which rows play which part: for each pair, its
    chosen and rejected row; for KTO, each row's label (True: desirable) and a mismatched row
    (this prompt, another preference's completion) for the KL estimate."""

    ids: list[str]
    rows: TextSet
    chosen: list[int]  # pairs: row of the chosen completion ...
    rejected: list[int]  # ... and of the rejected one, in the same order
    labels: list[bool]  # per row: desirable
    mismatched: TextSet | None  # KTO's KL rows (None when fewer than two rows)

    def __len__(self) -> int:
        return len(self.ids)


def is_heldout_preference(p: Preference, fraction: float) -> bool:
    """By a hash of its content, as texts are: the same preference always lands on the same side."""
    if fraction <= 0:
        return False
    key = "\x00".join((p.prompt, p.chosen or "", p.rejected or "")).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 1_000_000 < fraction * 1_000_000


def preference_set(prefs: Sequence[Preference], tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> PreferenceSet:
    texts: list[str] = []
    prompts: list[str] = []
    cuts: list[int | None] = []
    chosen: list[int] = []
    rejected: list[int] = []
    labels: list[bool] = []

    def row(prompt: str, completion: str, desirable: bool) -> int:
        texts.append(prompt + completion)
        prompts.append(prompt)
        cuts.append(len(prompt))
        labels.append(desirable)
        return len(texts) - 1

    for p in prefs:
        c = row(p.prompt, p.chosen, True) if p.chosen is not None else None
        r = row(p.prompt, p.rejected, False) if p.rejected is not None else None
        if c is not None and r is not None:
            chosen.append(c)
            rejected.append(r)
    mismatched = None
    if len(texts) > 1:  # each prompt with the next row's completion (TRL shifts the batch the same way)
        completions = [t[k:] for t, k in zip(texts, cuts, strict=True) if k is not None]
        shifted = [prompts[i] + completions[(i + 1) % len(texts)] for i in range(len(texts))]
        mismatched = text_set(shifted, [len(p) for p in prompts], tokenizer, max_tokens)
    return PreferenceSet(
        [p.id for p in prefs], text_set(texts, cuts, tokenizer, max_tokens), chosen, rejected, labels, mismatched
    )


def sequence_logps(model: torch.nn.Module, ts: TextSet, device: torch.device, micro_batch: int) -> torch.Tensor:
    """Summed log-probability of each row's answer (its completion) given what precedes it: (N,).
    Differentiable when grad is enabled."""
    out = []
    for start in range(0, len(ts), micro_batch):
        rows = slice(start, start + micro_batch)
        width = int(ts.targets[rows].sum(dim=1).max()) + 1
        ids = ts.ids[rows, :width].to(device)
        answer = ts.answer[rows, : width - 1].to(device)
        mask = input_mask(ts.targets[rows, : width - 1].to(device))
        logits = model(input_ids=ids[:, :-1], attention_mask=mask, use_cache=False).logits.float()  # (B, T, V)
        y = ids[:, 1:]
        logp = -F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)  # (B, T)
        out.append((logp * answer).sum(dim=1))
    return torch.cat(out)


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per pair: -log sigmoid(beta * (chosen log-ratio - rejected log-ratio))."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_logps: torch.Tensor | None,
    ref_kl_logps: torch.Tensor | None,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Per row, desirable rows first then undesirable ones, as TRL orders them."""
    if kl_logps is None or ref_kl_logps is None:
        z = torch.zeros((), device=logps.device)
    else:
        z = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    ratios = logps - ref_logps
    good, bad = ratios[labels], ratios[~labels]
    return torch.cat(
        [
            desirable_weight * (1 - torch.sigmoid(beta * (good - z))),
            undesirable_weight * (1 - torch.sigmoid(beta * (z - bad))),
        ]
    )


@dataclass(frozen=True)
class Reference:
    """The reference model's log-probabilities, computed once per claimed set."""

    logps: torch.Tensor  # (N,) per row
    kl_logps: torch.Tensor | None  # per mismatched row


@torch.inference_mode()
def reference(model: torch.nn.Module, ps: PreferenceSet, device: torch.device, micro_batch: int) -> Reference:
    was_training = model.training
    model.eval()
    try:
        kl = None if ps.mismatched is None else sequence_logps(model, ps.mismatched, device, micro_batch)
        return Reference(sequence_logps(model, ps.rows, device, micro_batch), kl)
    finally:
        model.train(was_training)


def preference_loss(
    model: torch.nn.Module,
    ps: PreferenceSet,
    ref: Reference,
    loss: Loss,
    beta: float,
    device: torch.device,
    micro_batch: int,
) -> tuple[torch.Tensor, float]:
    """The mean preference loss over the set (differentiable), and the policy's accuracy on its
    pairs before the update (chosen more likely than rejected; nan without pairs)."""
    logps = sequence_logps(model, ps.rows, device, micro_batch)
    c, r = torch.tensor(ps.chosen, dtype=torch.long), torch.tensor(ps.rejected, dtype=torch.long)
    accuracy = float((logps[c] > logps[r]).float().mean()) if ps.chosen else float("nan")
    if loss == "dpo":
        losses = dpo_loss(logps[c], logps[r], ref.logps[c], ref.logps[r], beta)
    else:
        labels = torch.tensor(ps.labels, dtype=torch.bool, device=logps.device)
        kl = None if ps.mismatched is None else sequence_logps(model, ps.mismatched, device, micro_batch).detach()
        losses = kto_loss(logps, ref.logps, labels, kl, ref.kl_logps, beta)
    return losses.mean(), accuracy


@torch.inference_mode()
def preference_accuracy(
    model: torch.nn.Module,
    ps: PreferenceSet,
    device: torch.device,
    micro_batch: int,
    between: Callable[[], None] | None = None,
) -> float | None:
    """Fraction of the set's pairs whose chosen completion the model finds more likely than the
    rejected one (summed log-probability given the prompt); None without pairs."""
    if not ps.chosen:
        return None
    if between is not None:
        between()
    was_training = model.training
    model.eval()
    try:
        logps = sequence_logps(model, ps.rows, device, micro_batch)
    finally:
        model.train(was_training)
    c, r = torch.tensor(ps.chosen, dtype=torch.long), torch.tensor(ps.rejected, dtype=torch.long)
    return float((logps[c] > logps[r]).float().mean())
