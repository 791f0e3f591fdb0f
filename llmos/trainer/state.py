"""All mutable training state in one object: what a checkpoint saves and a resume restores.

Only the optimize stage mutates it; the loop replaces it whole when it goes back to a version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from llmos.registry.registry import Registry, TrainerSnapshot


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_steps: int
    grad_clip: float


@dataclass
class TrainingState:
    model: PreTrainedModel
    optimizer: torch.optim.Optimizer
    base_version: int  # the version these weights descend from: the parent of the next checkpoint
    step: int = 0
    samples_seen: int = 0
    last_loss: float | None = None

    def snapshot(self) -> TrainerSnapshot:
        return TrainerSnapshot(
            step=self.step,
            samples_seen=self.samples_seen,
            optimizer=self.optimizer.state_dict(),
            rng=torch.get_rng_state(),
        )


def make_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
    )


def load_state(version: int, registry: Registry, model: PreTrainedModel, cfg: OptimizerConfig) -> TrainingState:
    """Training state as it was saved with ``version`` (fresh optimizer for version 0)."""
    snap = registry.trainer_snapshot(version)
    model.train()
    optimizer = make_optimizer(model, cfg)
    if snap.optimizer is not None:
        optimizer.load_state_dict(snap.optimizer)
    if snap.rng is not None:
        torch.set_rng_state(snap.rng)
    return TrainingState(
        model=model, optimizer=optimizer, base_version=version, step=snap.step, samples_seen=snap.samples_seen
    )
