"""Stage 4 — checkpoint: hand the candidate to the registry, which writes it durably.

A candidate that failed evaluation is still written (status ``rejected``) so an operator can
inspect what was refused; the registry's pruning removes it in time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from llmos.registry.registry import Registry
from llmos.store.checkpoints import CheckpointRecord
from llmos.store.tables import CheckpointStatus
from llmos.trainer.evaluate import EvalReport
from llmos.trainer.state import TrainingState


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or Infinity: a non-finite number is recorded as None (the gate text says why)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def checkpoint(
    state: TrainingState,
    report: EvalReport,
    registry: Registry,
    extra: dict[str, Any],
    write_weights: Callable[[torch.nn.Module, Path], None] | None = None,
) -> CheckpointRecord:
    status = CheckpointStatus.candidate if report.promote else CheckpointStatus.rejected
    metrics = {**report.metrics(), "train_loss": state.last_loss, "gate": report.reason, **extra}
    weights = state.model if write_weights is None else partial(write_weights, state.model)
    return registry.publish(
        weights, state.snapshot(), parent=state.base_version, status=status, metrics=_finite(metrics)
    )
