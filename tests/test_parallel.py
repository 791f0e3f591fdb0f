"""Data parallelism is exact: K optimizer steps on 2 ranks (gloo, CPU, real processes with a file
rendezvous) give the weights and losses of K steps in one process on the same micro-batches, for
AdamW, with an uneven share (3 micro-batches a step on 2 ranks), a regularizer's penalty, and
one micro-batch a step (a rank with nothing to train)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmos.model.builtin import byte_tokenizer, create_tiny
from llmos.model.loader import ModelFactory
from llmos.trainer.distributed import leave
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
        leave(together=sys.exc_info()[0] is None)  # (a barrier: see distributed.leave)


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
        leave(together=sys.exc_info()[0] is None)  # (a barrier: see distributed.leave)


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


FSDP_CASES = [3, 1]  # micro-batches a step: an uneven share; a rank with only padding


def _fsdp_rank(rank: int, world: int, init: str, model_dir: str, out: str) -> None:
    from llmos.trainer.sharded import Shards

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ranks = Ranks.of_group()
        assert ranks is not None
        runs = []
        for micro in FSDP_CASES:
            torch.manual_seed(0)
            shards = Shards(ranks, ModelFactory(model_dir, CPU).instance(), CFG, CPU)
            reports = []
            for mbs in steps_of(micro):
                r = shards.step(mbs, False, None, shards.state.step)
                assert r.skipped is None
                reports.append((r.loss, r.grad_norm, r.tokens))
            runs.append((shards.gather_weights(), reports))
        if rank == 0:
            torch.save(runs, os.path.join(out, "fsdp.pt"))
    finally:
        leave(together=sys.exc_info()[0] is None)  # (a barrier: see distributed.leave)


def test_fsdp_on_two_ranks_takes_the_steps_one_process_takes(tmp_path: Path) -> None:
    """train.parallel fsdp: the weights sharded over 2 ranks (FSDP2), K steps give the weights and
    losses of K steps in one process on the same micro-batches."""
    model_dir = create_tiny(tmp_path / "tiny", n_layer=2, n_positions=128)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_fsdp_rank, args=(2, init, str(model_dir), str(tmp_path)), nprocs=2, start_method="spawn")
    runs = torch.load(tmp_path / "fsdp.pt")
    for (weights, reports), micro in zip(runs, FSDP_CASES, strict=True):
        alone, alone_reports = train(model_dir, micro, False, None)
        assert set(alone) <= set(weights)
        for name, w in alone.items():
            torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=2e-5, msg=f"{micro} {name}")  # see above
        for (loss, norm, tokens), (loss1, norm1, tokens1) in zip(reports, alone_reports, strict=True):
            assert tokens == tokens1
            assert math.isclose(loss, loss1, rel_tol=1e-5) and math.isclose(norm, norm1, rel_tol=1e-4)


def _through_marks(state: TrainingState, step: Any, new_state: Any) -> list[Any]:
    """Steps, a mark, more steps, a restore (the early stop), a step, then a new state with the
    mark's optimizer state (going back to a version): what rank 0's trainer does with its state.
    Returns the snapshots' optimizer states along the way."""
    steps, saved = steps_of(1) + steps_of(2), []
    for mbs in steps[:2]:
        step(state, mbs)
    mark = state.mark()
    again = state.mark()  # (a mark is used once: a torch optimizer keeps the tensors it loads)
    for mbs in steps[2:4]:
        step(state, mbs)
    saved.append(state.snapshot().optimizer)
    state.restore(mark)
    step(state, steps[4])
    state = new_state(again)
    for mbs in steps[5:7]:
        step(state, mbs)
    saved.append(state.snapshot().optimizer)
    return [state, saved]


def _fsdp_sender_or_follower(rank: int, world: int, init: str, model_dir: str, out: str) -> None:
    from llmos.trainer.distributed import ShardedSender, follow_sharded
    from llmos.trainer.sharded import Shards
    from llmos.trainer.state import load_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ranks = Ranks.of_group()
        assert ranks is not None
        factory = ModelFactory(model_dir, CPU)
        if rank > 0:
            follow_sharded(ranks, factory, CFG)
            return
        sender = ShardedSender(Shards(ranks, factory.instance(None), CFG, CPU))

        def new_state(mark: Any) -> TrainingState:
            model = factory.instance(None).train()
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.5)
            state = TrainingState(model, sender.optimizer_for(model, CFG), 0, step=mark.step)
            load_optimizer(state.optimizer, mark.optimizer)
            return state

        model = factory.instance(None).train()
        state = TrainingState(model, sender.optimizer_for(model, CFG), 0)
        end, saved = _through_marks(state, lambda st, mbs: sender.step(st, mbs, CFG, CPU), new_state)
        sender.stop()
        weights = {n: p.detach().clone() for n, p in end.model.named_parameters()}
        torch.save((weights, saved), os.path.join(out, "fsdp-sender.pt"))
    finally:
        leave(together=sys.exc_info()[0] is None)  # (a barrier: see distributed.leave)


def test_fsdp_rank_0_keeps_the_state_one_process_has_through_marks_restores_and_new_states(tmp_path: Path) -> None:
    """Under FSDP rank 0's full weights and its optimizer (gathered from the shards for a mark or
    a checkpoint, sent back to them on a restore or a new state) follow what one process has."""
    model_dir = create_tiny(tmp_path / "tiny", n_layer=1, n_positions=128)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(
        _fsdp_sender_or_follower, args=(2, init, str(model_dir), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    weights, saved = torch.load(tmp_path / "fsdp-sender.pt")
    factory = ModelFactory(str(model_dir), CPU)

    def new_state(mark: Any) -> TrainingState:
        from llmos.trainer.state import load_optimizer

        model = factory.instance(None).train()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        state = TrainingState(model, make_optimizer(model, CFG), 0, step=mark.step)
        load_optimizer(state.optimizer, mark.optimizer)
        return state

    model = factory.instance(None).train()
    state = TrainingState(model, make_optimizer(model, CFG), 0)
    end, alone_saved = _through_marks(state, lambda st, mbs: optimize(st, mbs, CFG, CPU), new_state)
    for name, p in end.model.named_parameters():
        torch.testing.assert_close(weights[name], p.detach(), rtol=1e-4, atol=2e-5, msg=name)
    for got, expected in zip(saved, alone_saved, strict=True):  # one process's format, the same numbers
        assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in expected["param_groups"]]
        assert set(got["state"]) == set(expected["state"])
        for i, moments in expected["state"].items():
            for key, value in moments.items():
                torch.testing.assert_close(got["state"][i][key], value, rtol=1e-4, atol=2e-5, msg=f"{i} {key}")
