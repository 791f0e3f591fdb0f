"""Stage 3 — evaluate: the candidate's held-out loss against the active version's on the same data."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmos.trainer.optimize import token_losses
from llmos.trainer.preprocess import Batch


@dataclass(frozen=True)
class EvalReport:
    candidate_loss: float | None  # None when there is no held-out data yet
    active_loss: float | None
    eval_tokens: int
    promote: bool
    reason: str

    def metrics(self) -> dict[str, float | int | None]:
        return {
            "heldout_loss": self.candidate_loss,
            "active_heldout_loss": self.active_loss,
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


@dataclass(frozen=True)
class EvalConfig:
    tolerance: float
    micro_batch: int


def evaluate(
    candidate: torch.nn.Module,
    active: torch.nn.Module,
    eval_set: Batch,
    cfg: EvalConfig,
    device: torch.device,
    train_loss: float | None,
    active_loss: float | None = None,
) -> EvalReport:
    """Promote when the candidate's held-out loss is finite and not worse than the active
    version's by more than the tolerance. ``active_loss`` may be passed when already known for
    this eval set. Without held-out data the gate can only ask that training stayed finite."""
    if len(eval_set) == 0:
        ok = train_loss is not None and math.isfinite(train_loss)
        why = "no held-out data yet; training loss finite" if ok else f"training loss is {train_loss}"
        return EvalReport(None, None, 0, ok, why)
    cand = heldout_loss(candidate, eval_set, device, cfg.micro_batch)
    act = active_loss if active_loss is not None else heldout_loss(active, eval_set, device, cfg.micro_batch)
    if not math.isfinite(cand):
        return EvalReport(cand, act, eval_set.n_tokens, False, f"held-out loss is {cand}")
    limit = act * (1 + cfg.tolerance)
    if cand > limit:
        why = f"held-out loss {cand:.4f} > active {act:.4f} * (1 + eval.tolerance {cfg.tolerance})"
        return EvalReport(cand, act, eval_set.n_tokens, False, why)
    return EvalReport(cand, act, eval_set.n_tokens, True, f"held-out loss {cand:.4f} <= {limit:.4f}")
