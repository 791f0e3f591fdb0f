"""Data-parallel training against one process: the optimize stage's tokens/s on the same steps
(8 micro-batches of 8 blocks a step, AdamW, bf16 where llmos picks it) in one process and on 2
gloo ranks (real processes, as `torchrun --nproc-per-node 2 -m llmos train` runs them), each
variant alternated over rounds on this machine. Writes bench/results/parallel.md.

    .venv/bin/python bench/parallel.py                  # built-in and 4M-parameter shapes
    .venv/bin/python bench/parallel.py --rounds 2 --out /tmp/parallel.md

On a CPU two ranks share the cores that one process's threads would use: this compares two ways
of using them, the all-reduce included; on several GPUs each rank has its own.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from common import commit, machine, median  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from llmos.model.builtin import byte_tokenizer, create_tiny  # noqa: E402
from llmos.model.loader import ModelFactory  # noqa: E402
from llmos.trainer.distributed import leave  # noqa: E402
from llmos.trainer.optimize import optimize  # noqa: E402
from llmos.trainer.parallel import Ranks  # noqa: E402
from llmos.trainer.preprocess import MicroBatch, PreprocessConfig, eval_batch  # noqa: E402
from llmos.trainer.sharded import Shards  # noqa: E402
from llmos.trainer.state import OptimizerConfig, TrainingState, make_optimizer  # noqa: E402

CPU = torch.device("cpu")
CFG = OptimizerConfig(lr=1e-3, warmup_steps=0)
SHAPES = {"built-in (2 x 128)": {}, "4M (5 x 256)": {"n_layer": 5, "n_embd": 256, "n_head": 4}}
MICRO, ROWS, BLOCK, STEPS = 8, 8, 128, 6


def steps() -> list[list[MicroBatch]]:
    texts = [f"Text {i}: the harbour keeps {i * 3} boats and a lighthouse that counts them all." for i in range(4000)]
    mbs = list(eval_batch(texts, byte_tokenizer(), PreprocessConfig(BLOCK, 8192, 0.0)).micro_batches(ROWS))
    mbs = [mb for mb in mbs if mb.ids.shape[0] == ROWS]
    return [mbs[i * MICRO : (i + 1) * MICRO] for i in range(STEPS + 1)]  # the first: a warm-up


def held_mib(state: TrainingState) -> float:
    """The training state this process holds: its weights (or shard of them) and the optimizer's."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    tensors = [local(p.detach()) for p in state.model.parameters()]
    optimizer = cast(torch.optim.Optimizer, state.optimizer)
    tensors += [local(v) for moments in optimizer.state.values() for v in moments.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def tokens_per_s(model_dir: str, ranks: Ranks | None, bf16: bool) -> tuple[float, float]:
    model = ModelFactory(model_dir, CPU).instance().train()
    state = TrainingState(model, make_optimizer(model, CFG), 0)
    work = steps()
    optimize(state, work[0], CFG, CPU, bf16, ranks=ranks)
    if ranks is not None:
        dist.barrier()
    t0, tokens = time.perf_counter(), 0
    for mbs in work[1:]:
        tokens += optimize(state, mbs, CFG, CPU, bf16, ranks=ranks).tokens
    return tokens / (time.perf_counter() - t0), held_mib(state)


def sharded_tokens_per_s(model_dir: str, ranks: Ranks, bf16: bool) -> tuple[float, float]:
    """train.parallel fsdp: each step on the shards, then the weights gathered to rank 0's copy
    (llmos/trainer/sharded.py), as `llmos train` does after every step."""
    shards = Shards(ranks, ModelFactory(model_dir, CPU).instance(), CFG, CPU)
    work = steps()
    shards.step(work[0], bf16, None, 0)
    shards.gather_weights()
    dist.barrier()
    t0, tokens = time.perf_counter(), 0
    for mbs in work[1:]:
        tokens += shards.step(mbs, bf16, None, shards.state.step).tokens
        shards.gather_weights()
    return tokens / (time.perf_counter() - t0), held_mib(shards.state)


def _rank(rank: int, world: int, init: str, model_dir: str, bf16: bool, out: str, sharded: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ranks = Ranks.of_group()
        assert ranks is not None
        rate = sharded_tokens_per_s(model_dir, ranks, bf16) if sharded else tokens_per_s(model_dir, ranks, bf16)
        if rank == 0:
            Path(out).write_text(f"{rate[0]} {rate[1]}")
    finally:
        leave(together=sys.exc_info()[0] is None)  # (a barrier: see distributed.leave)


def two_ranks(model_dir: str, bf16: bool, work: Path, n: int, sharded: bool = False) -> tuple[float, float]:
    out = work / f"rate-{n}"
    init = f"file://{work / f'rendezvous-{n}'}"
    mp.start_processes(_rank, args=(2, init, model_dir, bf16, str(out), sharded), nprocs=2, start_method="spawn")
    rate, mib = out.read_text().split()
    return float(rate), float(mib)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "parallel.md")
    args = ap.parse_args()
    t0, m = time.monotonic(), machine()
    flags = m["cpu_features"]
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags  # as model.precision auto picks for full training
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmos-parallel-") as tmp:
        work, n = Path(tmp), 0
        for name, shape in SHAPES.items():
            model_dir = str(create_tiny(work / name.split()[0], n_positions=256, **shape))
            one1, one2, two, fsdp = [], [], [], []
            for r in range(args.rounds):
                order = ["one1", "one2", "two", "fsdp"] if r % 2 == 0 else ["fsdp", "two", "one2", "one1"]
                for v in order:
                    if v in ("two", "fsdp"):
                        n += 1
                        (two if v == "two" else fsdp).append(two_ranks(model_dir, bf16, work, n, v == "fsdp"))
                    else:
                        torch.set_num_threads(1 if v == "one1" else 2)
                        (one1 if v == "one1" else one2).append(tokens_per_s(model_dir, None, bf16))
            held = {"one": one1[0][1], "two": two[0][1], "fsdp": fsdp[0][1]}  # MiB: the same every round
            rows.append((name, *(median([r for r, _ in v]) for v in (one1, one2, two, fsdp)), held))
    lines = [
        "# Data-parallel training: one process against 2 ranks",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC at commit {commit()} on {m['cpu']} ({m['cores']} cores, "
        f"{flags}), GPU: {m['gpu'] or 'none'}; torch {m['torch']}; {'bf16' if bf16 else 'fp32'}; "
        f"whole run {time.monotonic() - t0:.0f} s.",
        f"Command: `.venv/bin/python bench/parallel.py --rounds {args.rounds}`. The optimize stage's tokens/s over "
        f"{STEPS} steps of {MICRO} micro-batches x {ROWS} blocks of {BLOCK} tokens (AdamW), after one warm-up step; "
        "the median of the rounds, the variants alternated. 2 ranks: gloo, 1 torch thread each, the step's "
        "micro-batches shared, one all-reduce of the gradients a step (llmos/trainer/parallel.py); each rank "
        "builds the same steps itself here, where `llmos train` under torchrun sends them from rank 0 "
        "(broadcast_object_list), a cost this does not include. FSDP (train.parallel fsdp, "
        "llmos/trainer/sharded.py): the same steps on 2 ranks with the training state sharded (FSDP2), the "
        "weights gathered to rank 0's full copy after each step, as `llmos train` does.",
        "",
        "",
        "Tokens/s:",
        "",
        "| model | 1 process, 1 thread | 1 process, 2 threads | 2 ranks x 1 thread (DDP) | 2 ranks / 1 process "
        "(2 threads) | 2 ranks x 1 thread (FSDP) | FSDP / 1 process (2 threads) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, a, b, c, d, _held in rows:
        lines.append(f"| {name} | {a:,.0f} | {b:,.0f} | {c:,.0f} | {c / b:.2f}x | {d:,.0f} | {d / b:.2f}x |")
    lines += [
        "",
        "The training state rank 0 holds (weights and AdamW's moments, MiB; not counted: the base model's weights "
        "every rank keeps, and under FSDP rank 0's full copy of the weights to evaluate and checkpoint):",
        "",
        "| model | 1 process | a DDP rank | an FSDP rank | FSDP / DDP |",
        "|---|---|---|---|---|",
    ]
    for name, *_rates, held in rows:
        one, ddp, fsdp = held["one"], held["two"], held["fsdp"]
        lines.append(f"| {name} | {one:.1f} | {ddp:.1f} | {fsdp:.1f} | {fsdp / ddp:.2f}x |")
    lines += [
        "",
        "On 2 cores the ranks use the cores one process's two threads would, so this compares two ways of "
        "using them, the all-reduce included. A GPU per rank is what makes data parallelism pay; none was lent "
        "to measure it. FSDP buys memory, not speed: each layer's weights are gathered before its forward and "
        "backward passes and the gradients reduce-scattered after, more traffic than DDP's one all-reduce.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
