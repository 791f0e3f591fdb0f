"""The trainer under ``torchrun``: rank 0 is the trainer (it holds the lease, claims, evaluates,
checkpoints and promotes, as one process does); the other ranks hold a copy of the model and
optimizer (DDP) or their shard of it (FSDP, ``train.parallel: fsdp``: llmos/trainer/sharded.py)
and take part in each optimizer step, training their share of its micro-batches
(llmos/trainer/parallel.py).

Rank 0 sends each step's micro-batches to the others (``broadcast_object_list``) and, before a
step, the whole training state (weights, optimizer state, step) whenever it changed otherwise
than by the steps they took together: a new term, going back to a version, the early stop
restoring its best pass, a preference step. The others never touch the store. When rank 0
stops it tells them to; if any rank dies, ``torchrun`` stops the group, and the claims of rank 0
go back to the queue after their lease, as a dead single trainer's do.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from llmos.model.loader import ModelFactory
from llmos.trainer.optimize import Penalty, PreferenceConfig, StepReport, optimize, optimize_preferences
from llmos.trainer.parallel import Ranks
from llmos.trainer.preference import PreferenceSet, Reference
from llmos.trainer.preprocess import MicroBatch
from llmos.trainer.sharded import ShardedOptimizer, Shards, copy_into
from llmos.trainer.state import Optimizer, OptimizerConfig, TrainingState, load_optimizer, make_optimizer

log = logging.getLogger(__name__)

# A rank waits for rank 0's next step however long the queue stays empty.
IDLE_TIMEOUT = timedelta(days=365)


def use_local_gpu() -> None:
    """Under torchrun with CUDA: make this rank's own GPU (LOCAL_RANK) the current device before
    anything is placed, so that "cuda" means it (nccl wants one GPU per rank)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: torch.device) -> Ranks | None:
    """Join the process group ``torchrun`` describes (WORLD_SIZE, RANK, MASTER_ADDR, ...): gloo on
    a CPU, nccl on CUDA. None when not started by torchrun, or with one rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=IDLE_TIMEOUT)
    ranks = Ranks.of_group()
    if ranks is not None:
        log.info("rank %d of %d (%s), pid %d", ranks.rank, ranks.world, backend, os.getpid())
    return ranks


def leave(together: bool) -> None:
    """Leave the process group: ``together`` (every rank is ending, none failed), a barrier first,
    so that each rank is done with the others' last collective; then the objects that held
    collectives' tensors are collected before the group goes. Without both, gloo's threads could
    still hold a finished collective's work when the interpreter exits: 5 of 16 two-rank runs of
    FSDP steps aborted at exit ("terminate called without an active exception"), 0 of 16 with
    either."""
    if together:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def _broadcast(obj: Any = None) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _state_of(state: TrainingState) -> dict[str, Any]:
    weights = {n: p.detach().cpu() for n, p in state.model.named_parameters() if p.requires_grad}
    return {"weights": weights, "optimizer": state.optimizer.state_dict(), "step": state.step}


class StepSender:
    """Rank 0's optimize stage: each step sent to the other ranks and taken with them."""

    def __init__(self, ranks: Ranks) -> None:
        assert ranks.rank == 0
        self.ranks = ranks
        self._synced: tuple[TrainingState, int] | None = None  # the state and revision the others hold
        self.broken = False  # a collective failed: another rank is gone, and the group with it

    def step(
        self,
        state: TrainingState,
        micro_batches: Sequence[MicroBatch],
        cfg: OptimizerConfig,
        device: torch.device,
        bf16: bool = False,
        penalty: Penalty | None = None,
        teacher: torch.nn.Module | None = None,
    ) -> StepReport:
        try:
            if self._synced is None or self._synced[0] is not state or self._synced[1] != state.revision:
                _broadcast(("state", _state_of(state)))
            _broadcast(("step", list(micro_batches), bf16, teacher is not None))
            report = optimize(state, micro_batches, cfg, device, bf16, penalty, teacher, self.ranks)
        except (RuntimeError, OSError):  # gloo and nccl report a lost peer so (DistBackendError included)
            self.broken = True
            raise
        self._synced = (state, state.revision)
        return report

    def preference_step(
        self,
        state: TrainingState,
        ps: PreferenceSet,
        ref: Reference,
        cfg: OptimizerConfig,
        pref: PreferenceConfig,
        device: torch.device,
        bf16: bool = False,
        penalty: Penalty | None = None,
    ) -> StepReport:
        """Rank 0 alone (the others are sent the state before the next text step)."""
        return optimize_preferences(state, ps, ref, cfg, pref, device, bf16, penalty)

    def optimizer_for(self, model: torch.nn.Module, cfg: OptimizerConfig) -> Optimizer:
        return make_optimizer(model, cfg)

    def stop(self) -> None:
        _broadcast(("stop",))


class ShardedSender:
    """Rank 0's optimize stage under FSDP (llmos/trainer/sharded.py): every step, and every read
    or write of the training state that the shards hold, done with the other ranks."""

    def __init__(self, shards: Shards) -> None:
        assert shards.ranks.rank == 0
        self.shards = shards
        self._synced: tuple[TrainingState, int] | None = None  # the state and revision the shards hold
        self.broken = False

    def _send(self, cmd: tuple[Any, ...]) -> None:
        try:
            _broadcast(cmd)
        except (RuntimeError, OSError):
            self.broken = True
            raise

    def optimizer_for(self, model: torch.nn.Module, cfg: OptimizerConfig) -> Optimizer:
        """A fresh optimizer in every shard, and rank 0's handle on it."""
        self._send(("fresh",))
        self.shards.fresh_optimizer()
        return ShardedOptimizer(self.shards, self._send)

    def _sync(self, state: TrainingState) -> None:
        if self._synced is None or self._synced[0] is not state or self._synced[1] != state.revision:
            self._send(("weights",))
            self.shards.load_weights({n: t.detach() for n, t in state.model.state_dict().items()})

    def _after(self, state: TrainingState, report: StepReport) -> StepReport:
        full = self.shards.gather_weights()
        if report.skipped is None:
            copy_into(state.model, full)
            state.step, state.revision = self.shards.state.step, state.revision + 1
            if report.tokens:
                state.last_loss = report.loss
        self._synced = (state, state.revision)
        return report

    def step(
        self,
        state: TrainingState,
        micro_batches: Sequence[MicroBatch],
        cfg: OptimizerConfig,
        device: torch.device,
        bf16: bool = False,
        penalty: Penalty | None = None,
        teacher: torch.nn.Module | None = None,
    ) -> StepReport:
        assert penalty is None  # (settings refuse regularization with fsdp)
        try:
            self._sync(state)
            self._send(("step", list(micro_batches), bf16, teacher is not None, state.step))
            return self._after(state, self.shards.step(list(micro_batches), bf16, teacher, state.step))
        except (RuntimeError, OSError):
            self.broken = True
            raise

    def preference_step(
        self,
        state: TrainingState,
        ps: PreferenceSet,
        ref: Reference,
        cfg: OptimizerConfig,
        pref: PreferenceConfig,
        device: torch.device,
        bf16: bool = False,
        penalty: Penalty | None = None,
    ) -> StepReport:
        assert penalty is None
        try:
            self._sync(state)
            self._send(("pref", ps, ref, pref, bf16, state.step))
            return self._after(state, self.shards.preference_step(ps, ref, pref, bf16, state.step))
        except (RuntimeError, OSError):
            self.broken = True
            raise

    def stop(self) -> None:
        _broadcast(("stop",))


def follow_sharded(ranks: Ranks, factory: ModelFactory, cfg: OptimizerConfig) -> Shards:
    """A rank other than 0 under FSDP: do what rank 0 sends until it stops. Returns its shards."""
    shards = Shards(ranks, factory.instance(None), cfg, factory.device)
    steps = 0
    log.info("rank %d holds its shard of the training state (FSDP)", ranks.rank)
    while True:
        cmd = _broadcast()
        kind = cmd[0]
        if kind == "stop":
            log.info("rank %d: rank 0 stopped after %d steps taken together", ranks.rank, steps)
            return shards
        if kind == "weights":
            shards.load_weights({})
        elif kind == "fresh":
            shards.fresh_optimizer()
        elif kind == "load":
            shards.load_optimizer({})
        elif kind == "gather":
            shards.gather_optimizer()
        elif kind == "step":
            _kind, micro, bf16, distill, step = cmd
            shards.step(micro, bf16, factory.base_model() if distill else None, step)
            shards.gather_weights()
            steps += 1
        elif kind == "pref":
            _kind, ps, ref, pref, bf16, step = cmd
            shards.preference_step(ps, ref, pref, bf16, step)
            shards.gather_weights()
            steps += 1


def follow(ranks: Ranks, factory: ModelFactory, cfg: OptimizerConfig) -> TrainingState:
    """A rank other than 0: take rank 0's steps until it stops. Returns the state it ends with."""
    model = factory.instance(None).train()
    state = TrainingState(model, make_optimizer(model, cfg), 0)
    steps = 0
    log.info("rank %d follows rank 0's steps", ranks.rank)
    while True:
        cmd = _broadcast()
        if cmd[0] == "stop":
            log.info("rank %d: rank 0 stopped after %d steps taken together", ranks.rank, steps)
            return state
        if cmd[0] == "state":
            saved = cmd[1]
            with torch.no_grad():
                params = dict(state.model.named_parameters())
                for name, w in saved["weights"].items():
                    params[name].copy_(w)
            load_optimizer(state.optimizer, saved["optimizer"])
            state.step = saved["step"]
        elif cmd[0] == "step":
            _kind, micro, bf16, distill = cmd
            teacher = factory.base_model() if distill else None
            optimize(state, micro, cfg, factory.device, bf16, None, teacher, ranks)
            steps += 1
