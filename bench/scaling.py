"""Scaling: figures 1, 4 and 7 of bench/speed.py for GPT-2-shaped models of about 1M, 4M, 14M and
124M parameters (random initialisation, created locally with the byte-level tokenizer).

    make bench-scaling      (or: python bench/scaling.py --out bench/results [--device cuda])

Each size: the optimize stage against a bare loop (figure 1, in the dtype llmos picks), greedy
generation against model.generate (figure 4), and freshness over HTTP with the freshness
settings of figure 7. The largest model runs few steps and few posts, to stay cheap.
Results go to <out>/scaling.json; bench/report.py writes RESULTS.md from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from common import machine  # noqa: E402
from speed import (  # noqa: E402
    FRESH,
    SEED,
    fig4_engine,
    fig7,
    log,
    settings_for,
    short_texts,
    trainer_efficiency,
)

from llmos.daemon import Daemon  # noqa: E402
from llmos.model.builtin import create_tiny  # noqa: E402
from llmos.threads import ThreadBudget  # noqa: E402

# The byte-level vocabulary has 257 tokens, so width and depth carry the parameters: GPT-2 small's
# 124M includes a 38.6M-parameter table for its 50k-token vocabulary; here 12 layers of width 896
# make up about the same total.
SIZES: dict[str, dict[str, int]] = {
    "1M": {"n_layer": 4, "n_embd": 128, "n_head": 4},
    "4M": {"n_layer": 5, "n_embd": 256, "n_head": 8},
    "14M": {"n_layer": 8, "n_embd": 384, "n_head": 6},
    "124M": {"n_layer": 12, "n_embd": 896, "n_head": 14},
}
# (rounds, steps per round) of figure 1; (rounds, new tokens) of figure 4; (warm texts, posts) of figure 7
COST = {
    "1M": ((5, 8), (5, 64), (32, 4)),
    "4M": ((5, 6), (5, 64), (32, 4)),
    "14M": ((3, 4), (3, 48), (32, 3)),
    "124M": ((3, 1), (3, 24), (8, 2)),
}


def one_size(work: Path, name: str, device: torch.device) -> dict[str, Any]:
    shape = SIZES[name]
    path = create_tiny(work / f"model-{name}", seed=SEED, n_positions=1024, **shape)
    (r1, s1), (r4, n4), (w7, p7) = COST[name]
    overrides = {"model.name_or_path": str(path), "model.device": device.type}
    daemon = Daemon(settings_for(work / f"data-{name}", **overrides))
    daemon.start(run_trainer=False)
    dtype = "bf16" if daemon.trainer.cfg.bf16 else "fp32"
    out: dict[str, Any] = {"shape": shape, "dtype": dtype}
    log(f"{name}: figure 1 ({dtype})")
    torch.set_num_threads(ThreadBudget.of().idle)  # this thread trains, as the trainer's does when no generation comes
    out["fig1"] = trainer_efficiency(daemon.factory, device, [dtype], r1, s1, short_texts(400), kernels_dt=None)
    log(f"{name}: figure 4")
    out["fig4"] = fig4_engine(daemon, r4, n4)
    daemon.stop()
    del daemon
    log(f"{name}: figure 7")
    out["fig7"] = fig7(work, f"scaling-{name}", FRESH, p7, warm=w7, model=str(path))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="*", choices=list(SIZES), default=list(SIZES))
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "device": str(device), "sizes": {}}
    work = Path(tempfile.mkdtemp(prefix="llmos-scaling-"))
    try:
        for name in args.sizes:
            results["sizes"][name] = one_size(work, name, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t0
    results["command"] = "python " + " ".join(["bench/scaling.py", *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    name = "scaling.json" if device.type == "cpu" else f"scaling-{device.type}.json"
    (args.out / name).write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    log(f"wrote {args.out / name} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
