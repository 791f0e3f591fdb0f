"""Stage 4 — checkpoint: hand the candidate to the registry, which writes it durably.

A candidate that failed evaluation is recorded (status ``rejected``, with its metrics and the
gate's reason) so an operator can see what was refused and why; its weights are not written:
nothing may serve or resume from them, and a run of refusals (one per refused post) would
otherwise cost a full checkpoint each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from llmos.registry.registry import Registry
from llmos.store.checkpoints import CheckpointRecord
from llmos.store.lineage import TextKind
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
    fence: int | None = None,
    texts: Mapping[str, TextKind] | None = None,
) -> CheckpointRecord:
    """Record the candidate, with the ``texts`` that trained it (lineage, llmos/store/lineage.py);
    ``fence``, the trainer lease's token: a trainer that lost the lease records nothing (LeaseLost)."""
    metrics = _finite({**report.metrics(), "train_loss": state.last_loss, "gate": report.reason, **extra})
    if not report.promote:
        return registry.record_refused(state.base_version, state.step, state.samples_seen, metrics, fence, texts)
    weights = state.model if write_weights is None else partial(write_weights, state.model)
    return registry.publish(
        weights,
        state.snapshot(),
        parent=state.base_version,
        status=CheckpointStatus.candidate,
        metrics=metrics,
        fence=fence,
        texts=texts,
    )
