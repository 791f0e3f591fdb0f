"""All mutable training state in one object: what a checkpoint saves and a resume restores.

Only the optimize stage mutates it; the loop replaces it whole when it goes back to a version,
or restores a mark of it (the early stop's best pass, when a batch is not learned in full).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from llmos.registry.registry import Registry, TrainerSnapshot


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["adamw", "sgd", "momentum"] = "adamw"
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    warmup_steps: int = 10
    schedule: Literal["constant", "inverse_sqrt"] = "constant"
    grad_clip: float = 1.0


@dataclass(frozen=True)
class Mark:
    """A copy of what the optimize stage changes, to go back to: trainable weights, optimizer
    state, step count and last loss (a frozen base, as under LoRA, is not copied)."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    step: int
    last_loss: float | None


class Optimizer(Protocol):
    """What the training state holds as its optimizer: a torch optimizer, or under FSDP rank 0's
    handle on the optimizer state the ranks hold in shards (llmos/trainer/sharded.py)."""

    @property
    def param_groups(self) -> list[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...

    def step(self) -> Any: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...


@dataclass
class TrainingState:
    model: torch.nn.Module
    optimizer: Optimizer
    base_version: int  # the version these weights descend from: the parent of the next checkpoint
    step: int = 0
    samples_seen: int = 0
    last_loss: float | None = None
    prequential_loss: float | None = None  # running average of losses measured before training on the data
    revision: int = 0  # counts changes to the weights (steps, restores): data-parallel ranks sync on it

    def mark(self) -> Mark:
        weights = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return Mark(weights, copy.deepcopy(self.optimizer.state_dict()), self.step, self.last_loss)

    @torch.no_grad()
    def restore(self, mark: Mark) -> None:
        """Go back to ``mark``. A mark is used once: the optimizer may keep its tensors."""
        self.revision += 1
        for name, param in self.model.named_parameters():
            if name in mark.weights:
                param.copy_(mark.weights[name])
        load_optimizer(self.optimizer, mark.optimizer)
        self.step, self.last_loss = mark.step, mark.last_loss

    def snapshot(self) -> TrainerSnapshot:
        return TrainerSnapshot(
            step=self.step,
            samples_seen=self.samples_seen,
            optimizer=self.optimizer.state_dict(),
            rng=torch.get_rng_state(),
            prequential_loss=self.prequential_loss,
            last_loss=self.last_loss,
        )


def make_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW runs fused (one kernel over all tensors) on CPU and CUDA: on the built-in model's 28
    tensors a CPU step took 0.6-0.7 ms against 3.4-3.9 ms one tensor at a time (PyTorch's CPU
    default) and 2.6 ms with foreach; the update is the same."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "adamw":
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused or None
        )
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "momentum":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    raise ValueError(f"unknown optimizer '{cfg.name}'")


def load_optimizer(optimizer: Optimizer, saved: dict[str, Any]) -> None:
    """Load saved optimizer state but keep how this optimizer runs: load_state_dict also takes the
    saved groups' flags, and a checkpoint from before AdamW ran fused would turn fusing off."""
    keys = ("fused", "foreach", "capturable", "differentiable")
    flags = [{k: g[k] for k in keys if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, own in zip(optimizer.param_groups, flags, strict=True):
        group.update(own)


def load_state(
    version: int, registry: Registry, model: torch.nn.Module, cfg: OptimizerConfig, optimizer: Optimizer | None = None
) -> TrainingState:
    """Training state as it was saved with ``version`` (fresh optimizer for version 0), with
    ``optimizer`` (a fresh one; by default one made here for ``model``)."""
    snap = registry.trainer_snapshot(version)
    model.train()
    optimizer = make_optimizer(model, cfg) if optimizer is None else optimizer
    if snap.optimizer is not None:
        saved_kind = {"momentum" in g for g in snap.optimizer["param_groups"]}
        live_kind = {"momentum" in g for g in optimizer.param_groups}
        if saved_kind == live_kind:
            load_optimizer(optimizer, snap.optimizer)
        # else: the optimizer was changed in the config since this version was saved; start it fresh.
    if snap.rng is not None:
        torch.set_rng_state(snap.rng)
    return TrainingState(
        model=model,
        optimizer=optimizer,
        base_version=version,
        step=snap.step,
        samples_seen=snap.samples_seen,
        prequential_loss=snap.prequential_loss,
        last_loss=snap.last_loss,
    )
