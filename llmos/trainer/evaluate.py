"""Stage 3 — evaluate: the candidate against the active version on the same data, and the gate.

Two measures, each compared with the active version's on the same texts:
- plasticity: loss on recent held-out data (is the model learning what arrives?);
- retention: loss on the anchor set, a reservoir of all held-out data ever seen plus an optional
  user eval file (does it still know what it knew?).
Promote when both are finite, held-out loss is not worse by more than ``tolerance`` and anchor
loss does not rise by more than ``forgetting_budget`` (both relative).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from llmos.trainer.optimize import token_losses
from llmos.trainer.preprocess import Batch


@dataclass(frozen=True)
class EvalConfig:
    tolerance: float
    micro_batch: int
    forgetting_budget: float = 1.0


@dataclass(frozen=True)
class EvalReport:
    candidate_loss: float | None  # recent held-out; None when there is no held-out data yet
    active_loss: float | None
    eval_tokens: int
    promote: bool
    reason: str
    anchor_loss: float | None = None  # over the whole anchor set (token-weighted across sources)
    active_anchor_loss: float | None = None
    active_anchor_by_source: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float | int | None]:
        return {
            "heldout_loss": self.candidate_loss,
            "active_heldout_loss": self.active_loss,
            "anchor_loss": self.anchor_loss,
            "active_anchor_loss": self.active_anchor_loss,
            "eval_tokens": self.eval_tokens,
        }


@torch.inference_mode()
def heldout_loss(
    model: torch.nn.Module,
    batch: Batch,
    device: torch.device,
    micro_batch: int,
    between: Callable[[], None] | None = None,
) -> float:
    """Mean token loss over every target token of the batch; ``between`` runs before each
    micro-batch (the trainer passes its wait for generations in flight). Measured in fp32: the
    gate compares these, and bf16's rounding is of the size of the differences it judges."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for mb in batch.micro_batches(micro_batch):
            if between is not None:
                between()
            targets = mb.weights[:, 1:] > 0  # weight 0 is padding
            losses = token_losses(model, mb.ids.to(device), mb.positions)  # (B, T)
            total += (losses.double() * targets.to(device)).sum()
            count += int(targets.sum())
    finally:
        model.train(was_training)
    return float(total) / max(count, 1)


class EarlyStop:
    """When to stop passing over a batch, and which pass to keep. The trainer stops once
    ``patience`` passes in a row have not lowered the recent held-out loss below the best seen
    (the loss before the first pass counts). If some pass lowered it, the trainer goes back to the
    best pass: the passes after it only overfit (on the built-in model, a lone post's held-out loss
    bottoms out near pass 4 and is back above where it started by pass 30). If none did (a new
    topic, or poison), it keeps the last pass, and the gate judges that."""

    def __init__(self, start: float, patience: int) -> None:
        self.start = self.best = start
        self.patience = patience
        self.since_best = 0

    @property
    def improved(self) -> bool:
        return self.best < self.start

    def after_pass(self, loss: float) -> Literal["best", "stop", "continue"]:
        """Record the held-out loss after a pass: a new best (keep a mark of it), time to stop
        (go back to the mark), or neither."""
        if loss < self.best:  # False for nan: a non-finite loss counts as no improvement
            self.best, self.since_best = loss, 0
            return "best"
        self.since_best += 1
        return "stop" if self.since_best >= self.patience else "continue"


def _check(name: str, cand: float, act: float, budget: float, knob: str) -> str | None:
    """None when within budget, else the reason."""
    if not math.isfinite(cand):
        return f"{name} loss is {cand}"
    if cand > act * (1 + budget):
        return f"{name} loss {cand:.4f} > active {act:.4f} * (1 + {knob} {budget})"
    return None


def evaluate(
    candidate: torch.nn.Module,
    active: torch.nn.Module,
    eval_set: Batch,
    cfg: EvalConfig,
    device: torch.device,
    train_loss: float | None,
    active_loss: float | None = None,
    anchor_sets: Mapping[str, Batch] | None = None,
    active_anchor_losses: Mapping[str, float] | None = None,
    between: Callable[[], None] | None = None,
) -> EvalReport:
    """Compute the measures and decide. Known active-version losses for the same sets may be
    passed in (they do not change until the active version does). ``between`` runs before each
    micro-batch of every measure.

    The anchor set comes in groups, one per source: each group must stay within the forgetting
    budget on its own, so a flood from one sender cannot hide what it erases of a small source
    inside an average dominated by its own held-out data."""

    def loss(model: torch.nn.Module, batch: Batch) -> float:
        return heldout_loss(model, batch, device, cfg.micro_batch, between)

    cand = act = None
    if len(eval_set):
        cand = loss(candidate, eval_set)
        act = active_loss if active_loss is not None else loss(active, eval_set)
    known = active_anchor_losses or {}
    groups = {name: b for name, b in (anchor_sets or {}).items() if len(b)}
    per_group: dict[str, tuple[float, float]] = {}
    for name, batch in groups.items():
        a_act = known[name] if name in known else loss(active, batch)
        per_group[name] = (loss(candidate, batch), a_act)
    a_cand = a_act_all = None
    if per_group:
        weights = {name: groups[name].n_tokens for name in per_group}
        total = sum(weights.values()) or 1
        a_cand = sum(per_group[n][0] * w for n, w in weights.items()) / total
        a_act_all = sum(per_group[n][1] * w for n, w in weights.items()) / total

    def report(promote: bool, reason: str) -> EvalReport:
        return EvalReport(
            cand, act, eval_set.n_tokens, promote, reason, a_cand, a_act_all, {n: v[1] for n, v in per_group.items()}
        )

    if cand is None or act is None:
        if train_loss is None or not math.isfinite(train_loss):
            return report(False, f"training loss is {train_loss}")
    else:
        why = _check("held-out", cand, act, cfg.tolerance, "eval.tolerance")
        if why:
            return report(False, why)
    for name, (g_cand, g_act) in per_group.items():
        label = "anchor" if len(per_group) == 1 else f"anchor ({name})"
        why = _check(label, g_cand, g_act, cfg.forgetting_budget, "eval.forgetting_budget")
        if why:
            return report(False, why)
    parts = []
    if cand is not None:
        parts.append(f"held-out {cand:.4f} (active {act:.4f})")
    if a_cand is not None:
        parts.append(f"anchor {a_cand:.4f} (active {a_act_all:.4f}) over {len(per_group)} source(s)")
    return report(True, ", ".join(parts) if parts else "no held-out data yet; training loss finite")
