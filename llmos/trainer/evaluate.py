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
from dataclasses import dataclass

import torch

from llmos.trainer.optimize import token_losses
from llmos.trainer.preprocess import Batch


@dataclass(frozen=True)
class EvalConfig:
    tolerance: float
    micro_batch: int
    forgetting_budget: float = 0.05


@dataclass(frozen=True)
class EvalReport:
    candidate_loss: float | None  # recent held-out; None when there is no held-out data yet
    active_loss: float | None
    eval_tokens: int
    promote: bool
    reason: str
    anchor_loss: float | None = None
    active_anchor_loss: float | None = None

    def metrics(self) -> dict[str, float | int | None]:
        return {
            "heldout_loss": self.candidate_loss,
            "active_heldout_loss": self.active_loss,
            "anchor_loss": self.anchor_loss,
            "active_anchor_loss": self.active_anchor_loss,
            "eval_tokens": self.eval_tokens,
        }


@torch.inference_mode()
def heldout_loss(model: torch.nn.Module, batch: Batch, device: torch.device, micro_batch: int) -> float:
    """Mean token loss over every target token of the batch."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for ids, _w in batch.micro_batches(micro_batch):
            losses = token_losses(model, ids.to(device))  # (B, T)
            total += losses.double().sum()
            count += losses.numel()
    finally:
        model.train(was_training)
    return float(total) / max(count, 1)


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
    anchor_set: Batch | None = None,
    active_anchor_loss: float | None = None,
) -> EvalReport:
    """Compute the measures and decide. Known active-version losses for the same sets may be
    passed in (they do not change until the active version does)."""
    mb = cfg.micro_batch
    cand = act = None
    if len(eval_set):
        cand = heldout_loss(candidate, eval_set, device, mb)
        act = active_loss if active_loss is not None else heldout_loss(active, eval_set, device, mb)
    a_cand = a_act = None
    if anchor_set is not None and len(anchor_set):
        a_cand = heldout_loss(candidate, anchor_set, device, mb)
        a_act = active_anchor_loss if active_anchor_loss is not None else heldout_loss(active, anchor_set, device, mb)

    def report(promote: bool, reason: str) -> EvalReport:
        return EvalReport(cand, act, eval_set.n_tokens, promote, reason, a_cand, a_act)

    if cand is None or act is None:
        if train_loss is None or not math.isfinite(train_loss):
            return report(False, f"training loss is {train_loss}")
    else:
        why = _check("held-out", cand, act, cfg.tolerance, "eval.tolerance")
        if why:
            return report(False, why)
    if a_cand is not None and a_act is not None:
        why = _check("anchor", a_cand, a_act, cfg.forgetting_budget, "eval.forgetting_budget")
        if why:
            return report(False, why)
    parts = []
    if cand is not None:
        parts.append(f"held-out {cand:.4f} (active {act:.4f})")
    if a_cand is not None:
        parts.append(f"anchor {a_cand:.4f} (active {a_act:.4f})")
    return report(True, ", ".join(parts) if parts else "no held-out data yet; training loss finite")
