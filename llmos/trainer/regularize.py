"""Penalties that hold the weights near anchor weights, against catastrophic forgetting.

- L2-SP (Li et al., 2018): strength/2 * sum (theta - theta_anchor)^2.
- EWC (Kirkpatrick et al., 2017): strength/2 * sum F * (theta - theta_anchor)^2, with F the
  diagonal empirical Fisher information estimated on the anchor set at the anchor weights, so
  weights that matter for what the model knew move least.

The anchor weights are those of the version the trainer (re)loaded from: the model as deployed.
Only trainable parameters count (in LoRA mode, the adapter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from llmos.trainer.optimize import Penalty, token_losses
from llmos.trainer.preprocess import Batch


@dataclass(frozen=True)
class RegularizationConfig:
    method: Literal["none", "l2sp", "ewc"] = "none"
    strength: float = 1.0
    fisher_batches: int = 8


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class L2SP:
    def __init__(self, model: torch.nn.Module, strength: float) -> None:
        self.strength = strength
        self.anchor = {n: p.detach().clone() for n, p in _trainable(model).items()}

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        total = sum(((p - self.anchor[n]) ** 2).sum() for n, p in _trainable(model).items())
        return 0.5 * self.strength * torch.as_tensor(total)


class EWC:
    def __init__(self, model: torch.nn.Module, strength: float, fisher: dict[str, torch.Tensor]) -> None:
        self.strength = strength
        self.anchor = {n: p.detach().clone() for n, p in _trainable(model).items()}
        self.fisher = fisher

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        total = sum((self.fisher[n] * (p - self.anchor[n]) ** 2).sum() for n, p in _trainable(model).items())
        return 0.5 * self.strength * torch.as_tensor(total)


def estimate_fisher(
    model: torch.nn.Module, data: Batch, device: torch.device, n_blocks: int
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: mean over blocks of the squared gradient of the block's mean loss,
    normalised so its mean is 1 (the strength then means the same across models)."""
    params = _trainable(model)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout while measuring
    seen = 0
    for mb in data.micro_batches(1):
        if seen >= n_blocks:
            break
        model.zero_grad(set_to_none=True)
        targets = (mb.weights[:, 1:] > 0).to(device)  # weight 0 is padding
        (token_losses(model, mb.ids.to(device), mb.positions) * targets).sum().div(targets.sum()).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
        seen += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if seen:
        for f in fisher.values():
            f /= seen
        total = sum(float(f.sum()) for f in fisher.values())
        mean = total / max(1, sum(f.numel() for f in fisher.values()))
        if mean > 0:
            for f in fisher.values():
                f /= mean
    return fisher


def make_penalty(
    cfg: RegularizationConfig, model: torch.nn.Module, anchor_data: Batch, device: torch.device
) -> Penalty | None:
    """The penalty toward ``model``'s current weights, or None. EWC without anchor data falls back
    to L2-SP (a Fisher of nothing would hold nothing)."""
    if cfg.method == "none" or cfg.strength == 0:
        return None
    if cfg.method == "ewc" and len(anchor_data) > 0:
        return EWC(model, cfg.strength, estimate_fisher(model, anchor_data, device, cfg.fisher_batches))
    return L2SP(model, cfg.strength)
