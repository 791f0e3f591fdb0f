"""Stage 2 — optimize: one forward, backward and optimizer step on a micro-batch.

Per-token weights (from each sample's weight) scale the loss. A non-finite loss or gradient
norm skips the step and leaves the weights untouched; the caller rejects the batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmos.trainer.state import OptimizerConfig, TrainingState


@dataclass(frozen=True)
class StepReport:
    loss: float  # mean token loss before the update (unweighted)
    grad_norm: float
    tokens: int
    skipped: str | None = None  # why the step was skipped, if it was


def lr_at(step: int, cfg: OptimizerConfig) -> float:
    if cfg.warmup_steps <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[object]:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def token_losses(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next token: ids (B, T+1) -> losses (B, T)."""
    x, y = ids[:, :-1], ids[:, 1:]
    logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)


def optimize(
    state: TrainingState,
    ids: torch.Tensor,
    weights: torch.Tensor,
    cfg: OptimizerConfig,
    device: torch.device,
    bf16: bool = False,
) -> StepReport:
    ids = ids.to(device, non_blocking=True)  # (B, T+1)
    w = weights.to(device, non_blocking=True)[:, 1:]  # (B, T): weight of each target token
    model = state.model
    with autocast(device, bf16):
        losses = token_losses(model, ids)  # (B, T)
    loss = (losses * w).sum() / w.numel()
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    # One host sync per step: the loss for the log and the finiteness check.
    mean_loss, grad_norm = (float(v) for v in torch.stack([losses.detach().mean(), norm.detach()]).tolist())
    tokens = int(ids.shape[0] * (ids.shape[1] - 1))
    if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
        state.optimizer.zero_grad(set_to_none=True)
        return StepReport(
            mean_loss, grad_norm, tokens, skipped=f"non-finite loss ({mean_loss}) or gradient norm ({grad_norm})"
        )
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(state.step, cfg)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.last_loss = mean_loss
    return StepReport(mean_loss, grad_norm, tokens)
