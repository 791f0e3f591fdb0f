"""Stage 2 — optimize: forward, backward and one optimizer step (AdamW, SGD or momentum), on
packed text (``optimize``) or on preferences (``optimize_preferences``).

Per-token weights (from each sample's weight) scale the loss; gradients of several micro-batches
may add up to one step; an optional penalty pulls the weights toward anchor weights (L2-SP, EWC).
A non-finite loss or gradient norm skips the step and leaves the weights untouched; the caller
rejects the batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from llmos.trainer.parallel import Ranks
from llmos.trainer.preference import Loss, PreferenceSet, Reference, preference_loss
from llmos.trainer.preprocess import MicroBatch
from llmos.trainer.state import OptimizerConfig, TrainingState

Penalty = Callable[[torch.nn.Module], torch.Tensor]


@dataclass(frozen=True)
class PreferenceConfig:
    loss: Loss = "dpo"
    beta: float = 0.1
    weight: float = 1.0  # the preference loss's scale in its step
    micro_batch: int = 8  # completion rows per forward pass


@dataclass(frozen=True)
class StepReport:
    loss: float  # mean token loss before the update (unweighted, without the penalty)
    grad_norm: float
    tokens: int
    skipped: str | None = None  # why the step was skipped, if it was
    new_loss: float = math.nan  # mean token loss before the update on new samples' rows (not replay)
    new_tokens: int = 0


def lr_at(step: int, cfg: OptimizerConfig) -> float:
    warm = cfg.warmup_steps
    if warm > 0 and step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "inverse_sqrt" and warm > 0:
        return cfg.lr * math.sqrt(warm / (step + 1))
    return cfg.lr


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[object]:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def token_losses(
    model: torch.nn.Module,
    ids: torch.Tensor,
    positions: torch.Tensor | None = None,
    teacher: torch.nn.Module | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each next token: ids (B, T+1), positions (B, T+1) or None -> losses (B, T).
    Rows marked in ``rows`` (B,) take instead the KL divergence from ``teacher``'s next-token
    distribution to the model's (distillation: the whole distribution, not one sampled token)."""
    x, y = ids[:, :-1], ids[:, 1:]
    pos = None if positions is None else positions[:, :-1].to(x.device, non_blocking=True)
    logits = model(input_ids=x, position_ids=pos, use_cache=False).logits  # (B, T, V)
    losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    if teacher is None or rows is None or not bool(rows.any()):
        return losses
    r = rows.to(x.device, non_blocking=True)
    with torch.no_grad():
        target = (
            teacher(input_ids=x[r], position_ids=None if pos is None else pos[r], use_cache=False)
            .logits.float()
            .log_softmax(-1)
        )  # (b, T, V)
    kl = F.kl_div(logits[r].float().log_softmax(-1), target, log_target=True, reduction="none").sum(-1)  # (b, T)
    return losses.masked_scatter(r[:, None].expand_as(losses), kl)


def optimize(
    state: TrainingState,
    micro_batches: Sequence[MicroBatch],
    cfg: OptimizerConfig,
    device: torch.device,
    bf16: bool = False,
    penalty: Penalty | None = None,
    teacher: torch.nn.Module | None = None,
    ranks: Ranks | None = None,
) -> StepReport:
    """One optimizer step over ``micro_batches``, gradients accumulated; rows of base rehearsal
    learn ``teacher``'s distribution (``token_losses``). The losses it reports are
    those before the update: on the new samples' rows, that is the prequential (test-then-train)
    loss, which the trainer takes from a batch's first pass instead of a forward pass of its own.
    With ``ranks`` (data parallel, llmos/trainer/parallel.py) every rank is given the same
    ``micro_batches``, trains its share and takes the step one process would take on them all."""
    model = state.model
    losses_sum = torch.zeros((), device=device)
    new_sum = torch.zeros((), device=device)
    n_tokens = n_new = 0
    mine = list(micro_batches) if ranks is None else ranks.share(micro_batches)
    scale = 1  # FSDP averages the ranks' gradients: N times each rank's sums them
    if ranks is not None and ranks.sharded:  # each FSDP pass is a collective: every rank runs as many
        scale = ranks.world
        idle = micro_batches[0]._replace(weights=torch.zeros_like(micro_batches[0].weights), rehearse=None)
        mine += [idle] * (ranks.each(len(micro_batches)) - len(mine))
    for ids, weights, new, positions, rehearse in mine:
        targets = weights[:, 1:] > 0  # (B, T) real targets (weight 0 is padding), on the host
        n = int(targets.sum())
        ids = ids.to(device, non_blocking=True)  # (B, T+1)
        w = weights.to(device, non_blocking=True)[:, 1:]  # (B, T): weight of each target token
        with autocast(device, bf16):
            losses = token_losses(model, ids, positions, teacher, rehearse)  # (B, T)
        loss = (losses * w).sum() / max(n, 1) / len(micro_batches) * scale
        loss.backward()
        fresh = targets if new is None else targets & new[:, None]  # (B, T) targets of new rows
        losses_sum = losses_sum + (losses.detach() * (w > 0)).sum()
        new_sum = new_sum + (losses.detach() * fresh.to(device, non_blocking=True)).sum()
        n_tokens, n_new = n_tokens + n, n_new + int(fresh.sum())
    if penalty is not None and (ranks is None or ranks.rank == 0):
        penalty(model).backward()
    if ranks is not None:  # the gradients and counts of every rank's share, summed on each
        counts = torch.stack([losses_sum, new_sum, losses_sum.new_tensor(n_tokens), losses_sum.new_tensor(n_new)])
        if ranks.sharded:  # (FSDP summed the gradients into each rank's shard)
            losses_sum, new_sum, tokens, fresh_tokens = ranks.sum_stats(counts.float())
        else:
            losses_sum, new_sum, tokens, fresh_tokens = ranks.sum_gradients(model, counts.float())
        n_tokens, n_new = int(tokens), int(fresh_tokens)
    # One host sync per step: the losses for the log and the finiteness check.
    norm = _clipped_norm(model, cfg)
    stats = torch.stack([losses_sum / n_tokens, norm, new_sum / max(n_new, 1)]).tolist()
    mean_loss, grad_norm, new_loss = (float(v) for v in stats)
    new_loss = new_loss if n_new else math.nan
    skipped = _apply(state, cfg, mean_loss, grad_norm)
    if skipped is not None:
        return StepReport(mean_loss, grad_norm, n_tokens, skipped=skipped)
    return StepReport(mean_loss, grad_norm, n_tokens, new_loss=new_loss, new_tokens=n_new)


def optimize_preferences(
    state: TrainingState,
    ps: PreferenceSet,
    ref: Reference,
    cfg: OptimizerConfig,
    pref: PreferenceConfig,
    device: torch.device,
    bf16: bool = False,
    penalty: Penalty | None = None,
) -> StepReport:
    """One optimizer step on the preference loss over the whole set (llmos/trainer/preference.py),
    weighted by ``pref.weight``. The loss it reports is the preference loss before the update."""
    model = state.model
    with autocast(device, bf16):
        loss, _accuracy = preference_loss(model, ps, ref, pref.loss, pref.beta, device, pref.micro_batch)
    (pref.weight * loss).backward()
    if penalty is not None:
        penalty(model).backward()
    norm = _clipped_norm(model, cfg)
    mean_loss, grad_norm = (float(v) for v in torch.stack([loss.detach().float(), norm]).tolist())
    skipped = _apply(state, cfg, mean_loss, grad_norm, text_loss=False)
    return StepReport(mean_loss, grad_norm, 0, skipped=skipped)


def _clipped_norm(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
    if isinstance(norm, DTensor):  # sharded parameters (FSDP2): the norm over every rank's shard
        norm = norm.full_tensor()
    return norm.float()


def _apply(
    state: TrainingState, cfg: OptimizerConfig, loss: float, grad_norm: float, text_loss: bool = True
) -> str | None:
    """The optimizer step for the gradients in place, unless the loss or gradient norm is not
    finite (then the gradients are dropped and the weights stay as they were: the reason).
    ``text_loss``: the loss is a token loss, the state's last training loss."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        state.optimizer.zero_grad(set_to_none=True)
        return f"non-finite loss ({loss}) or gradient norm ({grad_norm})"
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(state.step, cfg)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.revision += 1
    if text_loss:
        state.last_loss = loss
    return None
