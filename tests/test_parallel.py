"""Data parallelism is exact: K optimizer steps on 2 ranks (gloo, CPU, real processes with a file
rendezvous) give the weights and losses of K steps in one process on the same micro-batches, for
AdamW, with an uneven share (3 micro-batches a step on 2 ranks), a regularizer's penalty, and
one micro-batch a step (a rank with nothing to train)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmos.model.builtin import byte_tokenizer, create_tiny
from llmos.model.loader import ModelFactory
from llmos.trainer.optimize import optimize
from llmos.trainer.parallel import Ranks
from llmos.trainer.preprocess import MicroBatch, PreprocessConfig, eval_batch
from llmos.trainer.state import OptimizerConfig, TrainingState, make_optimizer

CPU = torch.device("cpu")
CFG = OptimizerConfig(lr=3e-3, warmup_steps=2)
STEPS = 4


def steps_of(micro_per_step: int) -> list[list[MicroBatch]]:
    """STEPS steps of ``micro_per_step`` micro-batches each (blocks of texts of several lengths)."""
    texts = [f"Sample {i}: the river carries {i * 7} boats past the mill {'and more ' * (i % 5)}." for i in range(64)]
    batch = eval_batch(texts, byte_tokenizer(), PreprocessConfig(64, 8192, 0.0))
    mbs = list(batch.micro_batches(2, torch.Generator().manual_seed(0)))
    assert len(mbs) >= STEPS * micro_per_step
    return [mbs[i * micro_per_step : (i + 1) * micro_per_step] for i in range(STEPS)]


def train(model_dir: Path, micro_per_step: int, penalty: bool, ranks: Ranks | None) -> tuple[dict[str, Any], list]:
    torch.manual_seed(0)
    model = ModelFactory(str(model_dir), CPU).instance().train()
    state = TrainingState(model, make_optimizer(model, CFG), 0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def pull(m: torch.nn.Module) -> torch.Tensor:  # an L2-SP-like pull toward the start
        return 0.1 * sum(((p - start[n]) ** 2).sum() for n, p in m.named_parameters())  # type: ignore[return-value]

    reports = []
    for mbs in steps_of(micro_per_step):
        r = optimize(state, mbs, CFG, CPU, penalty=pull if penalty else None, ranks=ranks)
        assert r.skipped is None
        reports.append((r.loss, r.grad_norm, r.tokens))
    return {n: p.detach().clone() for n, p in model.named_parameters()}, reports


CASES = [(3, False), (4, True), (1, False)]  # uneven shares; a penalty; a rank with nothing to train


def _rank(rank: int, world: int, init: str, model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ranks = Ranks.of_group()
        assert ranks is not None and ranks.rank == rank
        runs = [train(Path(model_dir), micro, penalty, ranks) for micro, penalty in CASES]
        torch.save(runs, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_take_the_steps_one_process_takes(tmp_path: Path) -> None:
    model_dir = create_tiny(tmp_path / "tiny", n_layer=1, n_positions=128)
    mp.start_processes(
        _rank,
        args=(2, f"file://{tmp_path / 'rendezvous'}", str(model_dir), str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    start = dict(ModelFactory(str(model_dir), CPU).instance().named_parameters())
    for case, (micro, penalty) in enumerate(CASES):
        alone, alone_reports = train(model_dir, micro, penalty, None)  # this process's thread count: no matter
        for rank in range(2):
            weights, reports = torch.load(tmp_path / f"rank{rank}.pt")[case]
            for name, w in alone.items():
                # atol: the attention's key bias has a gradient of zero in exact arithmetic (softmax
                # ignores a shift), so its gradient is rounding noise, which AdamW scales up to a few
                # 1e-6 and which depends on the order of the sums; a step moves a weight by up to
                # lr = 3e-3, so a step taken wrong anywhere is still hundreds of times this bound.
                torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=2e-5, msg=f"{case} {rank} {name}")
            for (loss, norm, tokens), (loss1, norm1, tokens1) in zip(reports, alone_reports, strict=True):
                assert tokens == tokens1
                assert math.isclose(loss, loss1, rel_tol=1e-5) and math.isclose(norm, norm1, rel_tol=1e-4)
        # The steps moved the weights (an exactness test of nothing would pass too).
        assert max(float((w - start[n].detach()).abs().max()) for n, w in alone.items()) > 1e-3


def _sender_or_follower(rank: int, world: int, init: str, model_dir: str, out: str) -> None:
    from llmos.trainer.distributed import StepSender, follow

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ranks = Ranks.of_group()
        assert ranks is not None
        factory = ModelFactory(model_dir, CPU)
        if rank > 0:
            model = follow(ranks, factory, CFG).model  # rank 0's, through every step and sync
        else:
            sender, steps = StepSender(ranks), steps_of(1) + steps_of(2)
            model = factory.instance(None).train()
            state = TrainingState(model, make_optimizer(model, CFG), 0)
            for mbs in steps[:2]:
                sender.step(state, mbs, CFG, CPU)
            mark = state.mark()
            for mbs in steps[2:4]:
                sender.step(state, mbs, CFG, CPU)
            state.restore(mark)  # the early stop keeps an earlier pass: the others must follow
            sender.step(state, steps[4], CFG, CPU)
            with torch.no_grad():  # a new state, as when going back to a version: sent whole
                model = factory.instance(None).train()
                for p in model.parameters():
                    p.mul_(0.5)
            state = TrainingState(model, make_optimizer(model, CFG), 7)
            for mbs in steps[5:7]:
                sender.step(state, mbs, CFG, CPU)
            sender.stop()
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, os.path.join(out, f"s{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_the_other_ranks_follow_rank_0s_state_through_restores_and_new_states(tmp_path: Path) -> None:
    # Rank 1 ends where rank 0 ends only if it was sent the state each time rank 0 changed it
    # otherwise than by a step they took together (each change is followed by a step here).
    model_dir = create_tiny(tmp_path / "tiny", n_layer=1, n_positions=128)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(
        _sender_or_follower, args=(2, init, str(model_dir), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    a, b = (torch.load(tmp_path / f"s{rank}.pt") for rank in range(2))
    for name, w in a.items():
        torch.testing.assert_close(b[name], w, rtol=0, atol=0, msg=name)  # the same arithmetic on each rank
