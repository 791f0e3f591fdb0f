"""FSDP2 for the trainer under torchrun (``train.parallel: fsdp``): the training state (the
weights, their gradients and the optimizer's moments) sharded over the ranks with
torch.distributed.fsdp's ``fully_shard``, so that a model whose training state does not fit one
device trains on several (AdamW's state in fp32 is four times the weights).

Rank 0 keeps one full copy of the weights beside its shard, for what it does alone and as one
process does it (evaluate, recall, checkpoint, promote); after each step the shards are gathered
into it. A model must fit one device to be evaluated and served, not to be trained. Its optimizer
is a handle (``ShardedOptimizer``) that gathers the ranks' optimizer state to the host when rank 0
saves it (a checkpoint, the early stop's mark) and sends a saved one back to the shards, in the
format one process saves: checkpoints move between one process, DDP and FSDP.

The ranks stay together by command, as under DDP (llmos/trainer/distributed.py): rank 0 sends
what comes next and every rank does it, since each FSDP forward, backward and state-dict call is a
collective. A step's micro-batches are shared out as under DDP and padded with zero-weight copies
so that every rank runs as many passes; FSDP averages the ranks' gradients into each rank's shard,
so each rank's loss counts N times (each micro-batch's loss is scaled as in one process: the
average of N times the shares is their sum). A preference step runs the whole preference set on
every rank: the average of N equal gradients is the one gradient. (FSDP's sum, a divide factor of
1, needs a reduction gloo does not have.)
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, cast

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from llmos.trainer.optimize import PreferenceConfig, StepReport, optimize, optimize_preferences
from llmos.trainer.parallel import Ranks
from llmos.trainer.preference import PreferenceSet, Reference
from llmos.trainer.preprocess import MicroBatch
from llmos.trainer.state import OptimizerConfig, TrainingState, make_optimizer

log = logging.getLogger(__name__)

TO_HOST = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole, on rank 0's host; {} elsewhere
FROM_RANK_0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)  # rank 0's, to every shard


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` sharded in place: each of its blocks (the classes transformers names as never to
    be split) a unit of its own, so that one block's weights are gathered at a time, then the rest."""
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


class Shards:
    """One rank's shard of the training state, and what every rank does with it."""

    def __init__(self, ranks: Ranks, model: torch.nn.Module, cfg: OptimizerConfig, device: torch.device) -> None:
        self.ranks = replace(ranks, sharded=True)
        self.cfg, self.device = cfg, device
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's order
        self.model = shard(model.train())
        self.state = TrainingState(self.model, make_optimizer(self.model, cfg), 0)

    def fresh_optimizer(self) -> None:
        self.state.optimizer = make_optimizer(self.model, self.cfg)

    def load_weights(self, full: dict[str, torch.Tensor]) -> None:
        """Rank 0's ``full`` weights into every shard (the others pass {})."""
        set_model_state_dict(self.model, cast(dict[str, Any], full), options=FROM_RANK_0)

    def gather_weights(self) -> dict[str, torch.Tensor]:
        """The whole weights on rank 0's host; {} on the others."""
        return cast(dict[str, torch.Tensor], get_model_state_dict(self.model, options=TO_HOST))

    def load_optimizer(self, saved: dict[str, Any]) -> None:
        """Rank 0's ``saved`` optimizer state (one process's format) into every shard's optimizer."""
        by_name = self._by_name(saved) if saved else {}
        optimizer = cast(torch.optim.Optimizer, self.state.optimizer)
        set_optimizer_state_dict(self.model, optimizer, by_name, options=FROM_RANK_0)

    def gather_optimizer(self) -> dict[str, Any]:
        """The optimizer state of every shard, whole, on rank 0's host in one process's format; {}
        on the others."""
        optimizer = cast(torch.optim.Optimizer, self.state.optimizer)
        whole = get_optimizer_state_dict(self.model, optimizer, options=TO_HOST)
        return self._by_index(cast(dict[str, Any], whole)) if self.ranks.rank == 0 else {}

    def step(self, micro: list[MicroBatch], bf16: bool, teacher: torch.nn.Module | None, step: int) -> StepReport:
        self.state.step = step
        return optimize(self.state, micro, self.cfg, self.device, bf16, None, teacher, self.ranks)

    def preference_step(
        self, ps: PreferenceSet, ref: Reference, pref: PreferenceConfig, bf16: bool, step: int
    ) -> StepReport:
        self.state.step = step
        return optimize_preferences(self.state, ps, ref, self.cfg, pref, self.device, bf16)

    def _by_index(self, whole: dict[str, Any]) -> dict[str, Any]:
        index = {name: i for i, name in enumerate(self.names)}
        return {
            "state": {index[name]: value for name, value in whole["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in whole["param_groups"]],
        }

    def _by_name(self, saved: dict[str, Any]) -> dict[str, Any]:
        return {
            "state": {self.names[int(i)]: value for i, value in saved["state"].items()},
            "param_groups": [{**g, "params": [self.names[int(i)] for i in g["params"]]} for g in saved["param_groups"]],
        }


class ShardedOptimizer:
    """Rank 0's optimizer under FSDP (the Optimizer protocol of llmos/trainer/state.py): its state
    lives in the ranks' shards; reading it gathers them, loading it sends it to them."""

    def __init__(self, shards: Shards, send: Any) -> None:
        self._shards, self._send = shards, send

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._shards.state.optimizer.param_groups)

    def state_dict(self) -> dict[str, Any]:
        self._send(("gather",))
        return self._shards.gather_optimizer()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._send(("load",))
        self._shards.load_optimizer(state_dict)

    def step(self) -> Any:
        raise RuntimeError("under FSDP the ranks take each step together (ShardedSender.step)")

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # the shards' gradients are the shards' optimizer's to clear


def copy_into(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """The gathered weights into rank 0's full copy."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(full[name])
