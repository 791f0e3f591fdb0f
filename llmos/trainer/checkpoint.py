"""Stage 4 — checkpoint: hand the candidate to the registry, which writes it durably.

A candidate that failed evaluation is still written (status ``rejected``) so an operator can
inspect what was refused; the registry's pruning removes it in time.
"""

from __future__ import annotations

import math
from typing import Any

from llmos.registry.registry import Registry
from llmos.store.checkpoints import CheckpointRecord
from llmos.store.tables import CheckpointStatus
from llmos.trainer.evaluate import EvalReport
from llmos.trainer.state import TrainingState


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or Infinity: a non-finite number is recorded as None (the gate text says why)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def checkpoint(state: TrainingState, report: EvalReport, registry: Registry, extra: dict[str, Any]) -> CheckpointRecord:
    status = CheckpointStatus.candidate if report.promote else CheckpointStatus.rejected
    metrics = {**report.metrics(), "train_loss": state.last_loss, "gate": report.reason, **extra}
    return registry.publish(
        state.model, state.snapshot(), parent=state.base_version, status=status, metrics=_finite(metrics)
    )
