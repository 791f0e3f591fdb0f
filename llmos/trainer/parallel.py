"""Data parallelism for the optimize stage: the ranks of a torch.distributed process group (as
``torchrun`` starts them; gloo on a CPU, nccl on CUDA) share each step's micro-batches, and the
step is the one a single process would take on all of them.

Rank r trains micro-batches r, r + N, r + 2N, ... of the step (N ranks). Each micro-batch's loss
is scaled as in one process (its mean token loss over the step's micro-batch count), so the sum
of the ranks' gradients is the single-process gradient; one all-reduce (SUM) over a flat buffer of
every trainable gradient brings that sum to every rank, with the step's loss and token counts
beside it. Every rank then clips the same norm and takes the same optimizer step from the same
state: the weights stay equal on every rank without being sent. The regularizer's penalty is
added by rank 0 alone, so that it counts once.

The all-reduce is torch.distributed's own (DistributedDataParallel does the same, bucketed and
overlapped with the backward pass); the DDP wrapper is not used because it needs every rank to run
the same number of backward passes, and a step's micro-batches do not always divide by the ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the trainer's process group. ``sharded``: the model is sharded
    with FSDP2 (llmos/trainer/sharded.py), which sums the gradients itself as each backward ends."""

    rank: int
    world: int
    sharded: bool = False

    @staticmethod
    def of_group() -> Ranks | None:
        """The initialised default group's, or None when there is none (one process)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return Ranks(dist.get_rank(), dist.get_world_size())

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's share: items rank, rank + world, ..."""
        return list(items[self.rank :: self.world])

    def each(self, n: int) -> int:
        """The share of the rank with the most of ``n`` items."""
        return -(-n // self.world)

    def sum_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """``stats`` summed across the ranks."""
        summed = stats.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed

    def sum_gradients(self, model: torch.nn.Module, stats: torch.Tensor) -> torch.Tensor:
        """Sum every trainable parameter's gradient, and ``stats``, across the ranks (in place for
        the gradients; a parameter no micro-batch of this rank reached counts as zeros).
        Returns the summed stats."""
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        flat = _flatten_dense_tensors([*grads, stats.reshape(-1).to(grads[0].dtype)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        *summed, summed_stats = _unflatten_dense_tensors(flat, [*grads, stats.reshape(-1)])
        for g, s in zip(grads, summed, strict=True):
            g.copy_(s)
        return summed_stats.to(stats.dtype).view_as(stats)
