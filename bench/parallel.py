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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from common import commit, machine, median  # noqa: E402

from llmos.model.builtin import byte_tokenizer, create_tiny  # noqa: E402
from llmos.model.loader import ModelFactory  # noqa: E402
from llmos.trainer.optimize import optimize  # noqa: E402
from llmos.trainer.parallel import Ranks  # noqa: E402
from llmos.trainer.preprocess import MicroBatch, PreprocessConfig, eval_batch  # noqa: E402
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


def tokens_per_s(model_dir: str, ranks: Ranks | None, bf16: bool) -> float:
    model = ModelFactory(model_dir, CPU).instance().train()
    state = TrainingState(model, make_optimizer(model, CFG), 0)
    work = steps()
    optimize(state, work[0], CFG, CPU, bf16, ranks=ranks)
    if ranks is not None:
        dist.barrier()
    t0, tokens = time.perf_counter(), 0
    for mbs in work[1:]:
        tokens += optimize(state, mbs, CFG, CPU, bf16, ranks=ranks).tokens
    return tokens / (time.perf_counter() - t0)


def _rank(rank: int, world: int, init: str, model_dir: str, bf16: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        rate = tokens_per_s(model_dir, Ranks.of_group(), bf16)
        if rank == 0:
            Path(out).write_text(str(rate))
    finally:
        dist.destroy_process_group()


def two_ranks(model_dir: str, bf16: bool, work: Path, n: int) -> float:
    out = work / f"rate-{n}"
    init = f"file://{work / f'rendezvous-{n}'}"
    mp.start_processes(_rank, args=(2, init, model_dir, bf16, str(out)), nprocs=2, start_method="spawn")
    return float(out.read_text())


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
            one1, one2, two = [], [], []
            for r in range(args.rounds):
                order = ["one1", "one2", "two"] if r % 2 == 0 else ["two", "one2", "one1"]
                for v in order:
                    if v == "two":
                        n += 1
                        two.append(two_ranks(model_dir, bf16, work, n))
                    else:
                        torch.set_num_threads(1 if v == "one1" else 2)
                        (one1 if v == "one1" else one2).append(tokens_per_s(model_dir, None, bf16))
            rows.append((name, median(one1), median(one2), median(two)))
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
        "(broadcast_object_list), a cost this does not include.",
        "",
        "| model | 1 process, 1 thread | 1 process, 2 threads | 2 ranks x 1 thread | 2 ranks / 1 process (2 threads) |",
        "|---|---|---|---|---|",
    ]
    for name, a, b, c in rows:
        lines.append(f"| {name} | {a:,.0f} | {b:,.0f} | {c:,.0f} | {c / b:.2f}x |")
    lines += [
        "",
        "On 2 cores the ranks use the cores one process's two threads would, so this compares two ways of "
        "using them, the all-reduce included. A GPU per rank is what makes data parallelism pay; none was lent "
        "to measure it.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
