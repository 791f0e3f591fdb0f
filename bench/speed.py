"""Speed: llmos's trainer and server against references on the same machine, side by side.

    make bench-speed        (or: python bench/speed.py --out bench/results [--device cuda])

Figures (issue 4), each a ratio of two things measured in this run, alternated round by round:
  1 trainer tokens/s: the real optimize stage against a bare PyTorch loop (same model, batch, dtype)
  2 samples/s of the real trainer (claim ... hot-swap) against the naive one-text-per-step loop
  3 bf16 autocast against fp32: speed, loss curve, achieved FLOP/s against each dtype's matmul peak
  4 generation tokens/s against bare model.generate; time to first token when streaming (HTTP)
  5 /generate latency with the trainer busy against paused (HTTP), with and without yielding
  6 hot-swap: longest gap between tokens of in-flight requests during 50 swaps, and errors
  7 freshness: seconds from a POST to the first response served by a version trained on it (HTTP)
  8 ingest: acknowledged texts/s, one text per request and 1000 per request (HTTP)
Results go to <out>/speed.json; bench/report.py writes RESULTS.md from it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    ROOT,
    Server,
    alternate,
    blast,
    machine,
    median,
    percentile,
    ratios,
    raw_post,
)
from transformers import AutoModelForCausalLM  # noqa: E402

from llmos.daemon import Daemon  # noqa: E402
from llmos.model.loader import ModelFactory  # noqa: E402
from llmos.serving.types import SamplingParams  # noqa: E402
from llmos.settings import load_settings  # noqa: E402
from llmos.store.queue import NewSample  # noqa: E402
from llmos.threads import ThreadBudget  # noqa: E402
from llmos.trainer.optimize import optimize  # noqa: E402
from llmos.trainer.preprocess import MicroBatch, PreprocessConfig, is_heldout, preprocess  # noqa: E402
from llmos.trainer.state import OptimizerConfig, TrainingState, make_optimizer  # noqa: E402
from llmos.wiring import auto_bf16  # noqa: E402

SEED = 1234
BATCH, BLOCK = 8, 128  # the trainer's defaults: train.micro_batch, train.block_size
OPT = OptimizerConfig()  # llmos's defaults: AdamW, lr 3e-3, clip 1.0
PROMPT = "The quick brown fox jumps over the lazy dog, and then"
LIMITS_OFF = {"LLMOS_LIMITS__KEY_RATE_PER_S": "0", "LLMOS_LIMITS__SOURCE_RATE_PER_S": "0"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def short_texts(n: int, seed: int = SEED) -> list[str]:
    """n short, distinct, learnable sentences (40-80 characters)."""
    rng = random.Random(seed)
    who = ["the clerk", "a farmer", "my aunt", "the pilot", "our cook", "a student", "the mayor", "his dog"]
    did = ["painted", "sold", "found", "carried", "fixed", "hid", "counted", "borrowed"]
    what = ["a red boat", "two lamps", "the old map", "nine eggs", "a blue kite", "the violin", "six chairs"]
    when = ["on Monday", "at dawn", "in May", "after lunch", "last winter", "at noon", "by the river"]
    return [f"Note {i}: {rng.choice(who)} {rng.choice(did)} {rng.choice(what)} {rng.choice(when)}." for i in range(n)]


def micro_batches(factory: ModelFactory, texts: list[str]) -> list[MicroBatch]:
    """The texts packed by the real preprocess stage into full (BATCH, BLOCK+1) micro-batches."""
    from llmos.store.queue import Sample
    from llmos.store.tables import SampleStatus

    samples = [
        Sample(str(i), i, t, None, 1.0, SampleStatus.training, None, None, None)  # type: ignore[arg-type]
        for i, t in enumerate(texts)
    ]
    pre = preprocess(samples, factory.tokenizer, PreprocessConfig(BLOCK, 8192, 0.0))
    return [mb for mb in pre.batch.micro_batches(BATCH) if mb.ids.shape == (BATCH, BLOCK + 1)]


def params_of(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: torch.nn.Module, seq: int) -> float:
    """Training FLOPs per token: 6 per weight that multiplies (every weight but the position
    table; the token table counts once, as the tied output layer) plus attention's 12 L T d."""
    cfg = model.config  # type: ignore[attr-defined]
    wpe = cfg.n_positions * cfg.n_embd
    return 6 * (params_of(model) - wpe) + 12 * cfg.n_layer * seq * cfg.n_embd


def matmul_peak(device: torch.device, dtype: torch.dtype, rounds: int = 3) -> float:
    """FLOP/s of a 2048 x 2048 matmul in ``dtype`` (best of a few)."""
    n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = 0.0
    reps = 5 if device.type == "cpu" else 50
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


# ---- figures 1 and 3: the optimize stage ---------------------------------------------------------
def bare_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, device: torch.device, bf16: bool
) -> None:
    """A training step as a bare PyTorch loop writes it (nanoGPT's shape): no per-step sync."""
    ids = ids.to(device, non_blocking=True)  # (B, T+1)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits  # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), OPT.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def trainer_efficiency(
    factory: ModelFactory,
    device: torch.device,
    dtypes: list[str],
    rounds: int,
    steps: int,
    texts: list[str],
    kernels_dt: str | None,
) -> dict[str, Any]:
    """Figures 1 and 3 (speed): tokens/s of llmos's optimize() and of the bare loop, per dtype,
    every variant once per round; with kernels_dt, also the built-in model's former kernels in
    that dtype."""
    mbs = micro_batches(factory, texts)
    variants: dict[str, Callable[[], float]] = {}
    for dt in dtypes:
        bf16 = dt == "bf16"
        ours = factory.instance()
        ours.train()
        state = TrainingState(ours, make_optimizer(ours, OPT), 0)
        bare = factory.instance()
        bare.train()
        bare_opt = make_optimizer(bare, OPT)

        def run_ours(state: TrainingState = state, bf16: bool = bf16, batches: list[MicroBatch] = mbs) -> float:
            sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                optimize(state, [batches[i % len(batches)]], OPT, device, bf16)
            sync(device)
            return steps * BATCH * BLOCK / (time.perf_counter() - t0)

        def run_bare(model: torch.nn.Module = bare, opt: torch.optim.Optimizer = bare_opt, bf16: bool = bf16) -> float:
            sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                bare_step(model, opt, mbs[i % len(mbs)].ids, device, bf16)
            sync(device)
            return steps * BATCH * BLOCK / (time.perf_counter() - t0)

        run_ours()  # warm-up: allocator, autocast caches, kernels
        run_bare()
        variants[f"llmos_{dt}"] = run_ours
        variants[f"bare_{dt}"] = run_bare
    if kernels_dt is not None:
        # The kernels the built-in model had before: PyTorch's SDPA attention and GPT-2's GELU
        # written as five operations, the same weights and the same optimize().
        before = AutoModelForCausalLM.from_pretrained(
            factory.base, dtype=torch.float32, attn_implementation="sdpa", activation_function="gelu_new"
        ).to(device)
        before.train()
        before_state = TrainingState(before, make_optimizer(before, OPT), 0)
        variants["kernels_before"] = functools.partial(run_ours, before_state, kernels_dt == "bf16")
        variants["kernels_before"]()  # warm-up
        # The same stage without each packed text's own positions: transformers then no longer
        # masks attention per text (the texts of a block attend to each other, as in the bare loop).
        shared = factory.instance()
        shared.train()
        shared_state = TrainingState(shared, make_optimizer(shared, OPT), 0)
        shared_mbs = [mb._replace(positions=None) for mb in mbs]
        variants["shared_attention"] = functools.partial(run_ours, shared_state, kernels_dt == "bf16", shared_mbs)
        variants["shared_attention"]()  # warm-up
    res = alternate(variants, rounds)
    model = factory.instance()
    out: dict[str, Any] = {
        "params": params_of(model),
        "flops_per_token": flops_per_token(model, BLOCK),
        "batch": f"{BATCH} x {BLOCK} tokens",
        "rounds": rounds,
        "steps_per_round": steps,
    }
    if kernels_dt is not None:
        out["kernels"] = {
            "dtype": kernels_dt,
            "attention": model.config._attn_implementation,
            "activation": model.config.activation_function,
            "before_tok_s": median(res["kernels_before"]),
            "after_tok_s": median(res[f"llmos_{kernels_dt}"]),
            "ratio": median(ratios(res[f"llmos_{kernels_dt}"], res["kernels_before"])),
        }
        out["shared_attention"] = {
            "dtype": kernels_dt,
            "tok_s": median(res["shared_attention"]),
            "vs_bare": median(ratios(res["shared_attention"], res[f"bare_{kernels_dt}"])),
        }
    for dt in dtypes:
        out[dt] = {
            "llmos_tok_s": median(res[f"llmos_{dt}"]),
            "bare_tok_s": median(res[f"bare_{dt}"]),
            "ratio": median(ratios(res[f"llmos_{dt}"], res[f"bare_{dt}"])),
            "ratios": ratios(res[f"llmos_{dt}"], res[f"bare_{dt}"]),
        }
    if "bf16" in dtypes and "fp32" in dtypes:
        out["bf16_over_fp32"] = median(ratios(res["llmos_bf16"], res["llmos_fp32"]))
    return out


def fig1(factory: ModelFactory, device: torch.device, texts: list[str], quick: bool) -> dict[str, Any]:
    """Figure 1 in both dtypes where bf16 runs natively (CUDA, a CPU with bf16 instructions); else
    fp32 in full and bf16 only briefly beside it (one round of 2 steps), for figure 3's ratio:
    emulated bf16 ran a 2048-square matmul at 1/240 of fp32's rate on such a CPU."""
    native = device.type == "cuda" or auto_bf16(device, lora=False)
    rounds, steps = (3, 8) if quick else (7, 16)
    if native:
        log("figure 1: optimize stage against a bare loop (fp32, bf16)")
        eff = trainer_efficiency(factory, device, ["fp32", "bf16"], rounds, steps, texts, kernels_dt="bf16")
    else:
        log("figure 1: optimize stage against a bare loop (fp32; bf16 is emulated here: 2 steps)")
        eff = trainer_efficiency(factory, device, ["fp32"], rounds, steps, texts, kernels_dt="fp32")
        brief = trainer_efficiency(factory, device, ["fp32", "bf16"], 1, 2, texts, kernels_dt=None)
        eff["bf16"] = {**brief["bf16"], "brief": "1 round of 2 steps"}
        eff["bf16_over_fp32"] = brief["bf16_over_fp32"]
    eff["native_bf16"] = native
    return eff


def loss_curves(
    factory: ModelFactory, device: torch.device, texts: list[str], steps: int | None = None
) -> dict[str, Any]:
    """Figure 3 (accuracy): one pass over the texts (or its first ``steps`` micro-batches) from the
    same initial weights, fp32 and bf16."""
    mbs = micro_batches(factory, texts)[:steps]
    curves: dict[str, list[float]] = {}
    for dt in ("fp32", "bf16"):
        torch.manual_seed(SEED)
        model = factory.instance()
        model.train()
        state = TrainingState(model, make_optimizer(model, OPT), 0)
        curves[dt] = [optimize(state, [mb], OPT, device, dt == "bf16").loss for mb in mbs]

    def smooth(xs: list[float], k: int = 10) -> list[float]:
        return [sum(xs[i - k + 1 : i + 1]) / k for i in range(k - 1, len(xs))]

    f, b = smooth(curves["fp32"]), smooth(curves["bf16"])
    rel = [abs(y - x) / x for x, y in zip(f, b, strict=True)]
    return {
        "steps": len(mbs),
        "max_rel_diff": max(rel),
        "final_rel_diff": rel[-1],
        "fp32_final": f[-1],
        "bf16_final": b[-1],
        "curves": curves,
    }


def fig3(eff: dict[str, Any], curves: dict[str, Any], device: torch.device) -> dict[str, Any]:
    # Emulated bf16 has no peak to speak of: its rate depends on the matrix size (a 512 matmul ran
    # at 4x the rate of a 2048 one), so only the dtypes the hardware runs are measured.
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16} if eff["native_bf16"] else {"fp32": torch.float32}
    peaks = alternate({dt: functools.partial(matmul_peak, device, dtype, 1) for dt, dtype in dtypes.items()}, 3)
    fpt = eff["flops_per_token"]
    out: dict[str, Any] = {"speed_bf16_over_fp32": eff["bf16_over_fp32"], "loss": curves}
    for dt in dtypes:
        achieved = fpt * eff[dt]["llmos_tok_s"]
        best = max(peaks[dt])
        out[dt] = {"achieved_flops": achieved, "matmul_peak_flops": best, "fraction_of_peak": achieved / best}
    out["bf16_faster"] = eff["bf16_over_fp32"] > 1.0
    out["bf16_within_2pct"] = curves["max_rel_diff"] <= 0.02
    return out


# ---- figure 2: against the naive loop ------------------------------------------------------------
def settings_for(data_dir: Path, **overrides: Any) -> Any:
    # In this process the benchmarks drive the trainer's cycles themselves: the trainer thread's
    # Trainer. Servers started over HTTP (figures 4-5, 7-8) run the defaults, a trainer process.
    base: dict[str, Any] = {
        "data_dir": data_dir,
        "auth.admin_token": "bench",
        "model.seed": SEED,
        "runtime.trainer": "thread",
    }
    return load_settings(None, **{**base, **overrides})


def fig2(work: Path, device: torch.device, texts: list[str], rounds: int) -> dict[str, Any]:
    """samples/s over the same texts: the real trainer (claim, preprocess, prequential loss,
    optimize, evaluate, checkpoint, hot-swap; one pass, as the naive loop makes) against a loop
    that takes one optimizer step per text, as a hand-written online loop does. The naive loop
    runs in fp32 and in llmos's dtype, with torch's default threads (all cores); the ratio is
    against the faster of the two. llmos runs with its defaults and, beside them, with the opt-in
    idle thread budget (every core for the trainer while no generation comes)."""
    n = len(texts)
    one_pass = {
        "train.passes_per_batch": 1,
        "train.heldout_fraction": 0.0,
        "train.fill_wait_s": 0.0,
        "replay.enabled": False,
        "model.device": device.type,
    }
    counter = {"run": 0}

    def llmos_run(**overrides: Any) -> float:
        counter["run"] += 1
        daemon = Daemon(settings_for(work / f"fig2-{counter['run']}", **one_pass, **overrides))
        daemon.start(run_trainer=False)
        daemon.ingest([NewSample(t) for t in texts])
        t0 = time.perf_counter()
        while daemon.queue.depth() > 0:
            daemon.trainer.cycle()
        dt = time.perf_counter() - t0
        daemon.stop()
        return n / dt

    def naive_run(bf16: bool) -> float:
        daemon = Daemon(settings_for(work / "fig2-naive", **one_pass))  # the same base model and device
        factory = daemon.factory
        torch.set_num_threads(os.cpu_count() or 1)  # torch's default, as a hand-written loop has it
        model = factory.instance()
        model.train()
        opt = make_optimizer(model, OPT)
        eos = factory.tokenizer.eos_token_id
        t0 = time.perf_counter()
        for text in texts:
            ids = torch.tensor([[eos, *factory.tokenizer.encode(text, add_special_tokens=False), eos]])  # (1, T+1)
            bare_step(model, opt, ids, device, bf16)
        sync(device)
        dt = time.perf_counter() - t0
        daemon.stop()
        return n / dt

    probe = Daemon(settings_for(work / "fig2-naive", **one_pass))
    dtype = "bf16" if probe.trainer.cfg.bf16 else "fp32"
    probe.stop()
    variants = {
        "llmos": llmos_run,
        "llmos_idle_cores": functools.partial(llmos_run, **{"runtime.torch_threads_idle": os.cpu_count() or 1}),
        "naive_fp32": functools.partial(naive_run, False),
    }
    if device.type == "cuda" or auto_bf16(device, lora=False):  # emulated bf16 would only slow it down
        variants["naive_bf16"] = functools.partial(naive_run, True)
    res = alternate(variants, rounds)
    naive = max((k for k in res if k.startswith("naive_")), key=lambda k: median(res[k]))
    # What bounds the ratio on this machine: the naive loop's fixed cost per step (a step on an
    # 8-token text), against the per-text time of the whole loop.
    daemon = Daemon(settings_for(work / "fig2-naive", **one_pass))
    torch.set_num_threads(os.cpu_count() or 1)
    tok = daemon.factory.tokenizer
    tokens_per_text = sum(len(tok.encode(t, add_special_tokens=False)) + 1 for t in texts) / n
    model = daemon.factory.instance()
    model.train()
    opt = make_optimizer(model, OPT)
    short = torch.tensor([[tok.eos_token_id, *tok.encode("A short one.", add_special_tokens=False)][:9]])
    naive_bf16 = naive == "naive_bf16"
    for _ in range(3):
        bare_step(model, opt, short, device, naive_bf16)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(50):
        bare_step(model, opt, short, device, naive_bf16)
    sync(device)
    fixed_ms = (time.perf_counter() - t0) / 50 * 1e3
    daemon.stop()
    return {
        "texts": n,
        "tokens_per_text": tokens_per_text,
        "naive_ms_per_text": 1e3 / median(res[naive]),
        "naive_ms_per_8_token_step": fixed_ms,
        "dtype": dtype,
        "naive_dtype": naive.removeprefix("naive_"),
        "naive_fp32_samples_s": median(res["naive_fp32"]),
        "naive_bf16_samples_s": median(res["naive_bf16"]) if "naive_bf16" in res else None,
        "llmos_samples_s": median(res["llmos"]),
        "llmos_idle_cores_samples_s": median(res["llmos_idle_cores"]),
        "idle_cores_ratio": median(ratios(res["llmos_idle_cores"], res["llmos"])),
        "naive_samples_s": median(res[naive]),
        "ratio": median(ratios(res["llmos"], res[naive])),
        "ratios": ratios(res["llmos"], res[naive]),
        "rounds": rounds,
        "llmos_settings": one_pass,
    }


# ---- figure 4: generation ------------------------------------------------------------------------
def fig4_engine(daemon: Daemon, rounds: int, new_tokens: int = 64) -> dict[str, Any]:
    """Greedy tokens/s of the serving engine against bare model.generate on the same model."""
    engine = daemon.engine
    model = engine.current().model
    tok = engine.tokenizer
    eos = tok.eos_token_id
    ids = torch.tensor([[eos, *tok.encode(PROMPT, add_special_tokens=False)]], device=engine.device)
    params = SamplingParams(max_new_tokens=new_tokens)
    counts: dict[str, int] = {}

    def ours() -> float:
        sync(engine.device)
        t0 = time.perf_counter()
        c = engine.generate(PROMPT, params)
        counts["llmos"] = c.completion_tokens
        return c.completion_tokens / (time.perf_counter() - t0)

    def bare() -> float:
        sync(engine.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(  # type: ignore[operator]
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=eos,
            )
        sync(engine.device)
        n = out.shape[1] - ids.shape[1]
        counts["bare"] = n
        return n / (time.perf_counter() - t0)

    ours()
    bare()
    res = alternate({"llmos": ours, "bare": bare}, rounds)
    return {
        "new_tokens": counts,
        "llmos_tok_s": median(res["llmos"]),
        "bare_tok_s": median(res["bare"]),
        "ratio": median(ratios(res["llmos"], res["bare"])),
        "rounds": rounds,
    }


def sse_first_and_total(client: httpx.Client, url: str, params: dict[str, Any]) -> tuple[float, float, int]:
    """(seconds to the first text event, seconds to the end, text events)."""
    t0 = time.perf_counter()
    first = None
    n = 0
    with client.stream("GET", url, params={**params, "stream": "true"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:") and first is None:
                first = time.perf_counter() - t0
            if line.startswith("data:"):
                n += 1
    return first or float("nan"), time.perf_counter() - t0, n


def fig4_http(srv: Server, rounds: int, new_tokens: int = 64) -> dict[str, Any]:
    """Time to first token over HTTP when streaming, against the whole non-streamed answer."""
    q = {"prompt": PROMPT, "max_new_tokens": new_tokens}
    with httpx.Client(timeout=60) as c:
        ttft: list[float] = []
        stream_total: list[float] = []
        plain: list[float] = []

        def streamed() -> float:
            first, total, _n = sse_first_and_total(c, srv.url + "/generate", q)
            ttft.append(first)
            stream_total.append(total)
            return first

        def whole() -> float:
            t0 = time.perf_counter()
            c.get(srv.url + "/generate", params=q).raise_for_status()
            plain.append(time.perf_counter() - t0)
            return plain[-1]

        streamed()
        whole()
        ttft.clear(), stream_total.clear(), plain.clear()
        alternate({"stream": streamed, "plain": whole}, rounds)
    return {
        "new_tokens": new_tokens,
        "ttft_ms": 1e3 * median(ttft),
        "stream_total_ms": 1e3 * median(stream_total),
        "plain_total_ms": 1e3 * median(plain),
        "ttft_over_plain": median(ratios(ttft, plain)),
        "stream_total_over_plain": median(ratios(stream_total, plain)),
        "rounds": rounds,
    }


def fig4_concurrent(
    work: Path, rounds: int, clients: int = 8, per_client: int = 4, new_tokens: int = 32
) -> dict[str, Any]:
    """Generated tokens/s with ``clients`` clients each sending requests one after another, the
    server decoding one request at a time (serving.max_concurrency 1) against decoding them
    together (the default, 8); both servers up at once, rounds alternating."""
    prompts = [f"{PROMPT} (client {i})" for i in range(clients)]

    def run(url: str) -> float:
        tokens = [0] * clients

        def client(i: int) -> None:
            with httpx.Client(timeout=120) as c:
                for _ in range(per_client):
                    r = c.post(url + "/generate", json={"prompt": prompts[i], "max_new_tokens": new_tokens})
                    r.raise_for_status()
                    tokens[i] += r.json()["completion_tokens"]

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(tokens) / (time.perf_counter() - t0)

    one = {**LIMITS_OFF, "LLMOS_SERVING__MAX_CONCURRENCY": "1"}  # nothing is posted: the trainer idles
    batched = {**LIMITS_OFF, "LLMOS_SERVING__MAX_CONCURRENCY": "8"}
    with Server(work / "fig4c-one", one) as a, Server(work / "fig4c-batched", batched) as b:
        run(a.url), run(b.url)  # warm-up
        got = alternate({"one": lambda: run(a.url), "batched": lambda: run(b.url)}, rounds)
    return {
        "clients": clients,
        "new_tokens": new_tokens,
        "one_at_a_time_tok_s": median(got["one"]),
        "batched_tok_s": median(got["batched"]),
        "ratio": median(ratios(got["batched"], got["one"])),
        "rounds": rounds,
    }


# ---- figure 5: serving while training ------------------------------------------------------------
def fig5(work: Path, env: dict[str, str], phases: int, per_phase: int, tag: str) -> dict[str, Any]:
    """p50/p99 of sequential 16-token /generate requests, trainer busy against paused, alternating
    phases (busy, paused, busy, ...) on one server."""
    env = {**LIMITS_OFF, "LLMOS_LIMITS__MAX_QUEUE_DEPTH": "1000000", **env}
    busy: list[float] = []
    paused: list[float] = []
    busy_steps, busy_s = 0, 0.0
    with Server(work / f"fig5-{tag}", env) as srv, httpx.Client(timeout=60) as c:
        # Enough text to keep the trainer busy throughout (40 passes per batch by default).
        texts = short_texts(3000, seed=SEED + 5)
        for i in range(0, len(texts), 1000):
            c.post(srv.url + "/v1/texts", json={"items": [{"text": t} for t in texts[i : i + 1000]]}).raise_for_status()
        time.sleep(2)  # the trainer picks up its first batch
        q = {"prompt": PROMPT, "max_new_tokens": 16}
        c.get(srv.url + "/generate", params=q).raise_for_status()
        for phase in range(2 * phases):
            is_busy = phase % 2 == 0
            srv.admin(c, "/v1/admin/trainer/resume" if is_busy else "/v1/admin/trainer/pause")
            time.sleep(0.5)  # the pause takes effect at the next step boundary
            step0, phase0 = c.get(srv.url + "/v1/trainer").json()["step"], time.perf_counter()
            for _ in range(per_phase):
                t0 = time.perf_counter()
                c.get(srv.url + "/generate", params=q).raise_for_status()
                (busy if is_busy else paused).append(time.perf_counter() - t0)
                time.sleep(0.01)
            if is_busy:  # the trainer's steps while it served (a settle may fall in a phase, or not)
                busy_steps += c.get(srv.url + "/v1/trainer").json()["step"] - step0
                busy_s += time.perf_counter() - phase0
        status = c.get(srv.url + "/v1/trainer").json()
    return {
        "settings": {k: v for k, v in env.items() if k.startswith(("LLMOS_TRAIN", "LLMOS_RUNTIME"))},
        "busy_p50_ms": 1e3 * percentile(busy, 50),
        "busy_p99_ms": 1e3 * percentile(busy, 99),
        "paused_p50_ms": 1e3 * percentile(paused, 50),
        "paused_p99_ms": 1e3 * percentile(paused, 99),
        "p50_ratio": percentile(busy, 50) / percentile(paused, 50),
        "p99_ratio": percentile(busy, 99) / percentile(paused, 99),
        "requests_per_state": len(busy),
        "trainer_steps": status.get("step"),
        "busy_steps_per_s": busy_steps / busy_s,
        "busy_ms": [1e3 * x for x in busy],
        "paused_ms": [1e3 * x for x in paused],
    }


# Before issue 4's changes the trainer did not yield to requests in flight.
THREAD = {"LLMOS_RUNTIME__TRAINER": "thread"}
FIG5_VARIANTS = {
    "before (a trainer thread that does not yield, not niced)": {
        **THREAD,
        "LLMOS_TRAIN__YIELD_TO_REQUESTS_S": "0",
        "LLMOS_RUNTIME__TRAINER_NICE": "0",
    },
    "a trainer thread (runtime.trainer = thread; train.yield_to_requests_s 0.2)": THREAD,
    "opt-in: every core for the trainer thread after 1 s without a generation (runtime.torch_threads_idle = cores)": {
        **THREAD,
        "LLMOS_RUNTIME__TORCH_THREADS_IDLE": str(os.cpu_count() or 1),
    },
    "defaults: the trainer in its own process (runtime.trainer = process)": {},
}


def fig5_compare(work: Path, rounds: int, phases: int, per_phase: int, names: list[str]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            log(f"figure 5: serving while training, {name}")
            runs[name].append(fig5(work, FIG5_VARIANTS[name], phases, per_phase, f"{r}-{names.index(name)}"))
    out = {}
    for name, rs in runs.items():
        # Pooled over the runs: p99 of a few hundred requests per state.
        busy = [x for r in rs for x in r["busy_ms"]]
        paused = [x for r in rs for x in r["paused_ms"]]
        out[name] = {
            "p99_ratio": percentile(busy, 99) / percentile(paused, 99),
            "p50_ratio": percentile(busy, 50) / percentile(paused, 50),
            "busy_p99_ms": percentile(busy, 99),
            "paused_p99_ms": percentile(paused, 99),
            "busy_p50_ms": percentile(busy, 50),
            "paused_p50_ms": percentile(paused, 50),
            "requests_per_state": len(busy),
            "busy_steps_per_s": median([r["busy_steps_per_s"] for r in rs]),
            "runs": rs,
        }
    return out


# ---- figure 6: hot-swap --------------------------------------------------------------------------
def promoter(store_url: str, conn: Any) -> None:
    """Figure 6's trainer process: promotes the versions it is sent, in a process of its own, as
    runtime.trainer = process does (the API process then only syncs)."""
    from llmos.store.checkpoints import CheckpointIndex
    from llmos.store.db import Database

    db = Database(store_url)
    index = CheckpointIndex(db)
    while (version := conn.recv()) is not None:
        conn.send(index.activate(version, expected=index.active_version(), promote=True))
    db.dispose()


def fig6(
    work: Path, device: torch.device, swaps: int = 50, streams: int = 1, trainer: str = "thread"
) -> dict[str, Any]:
    """Generations stream without pause on ``streams`` threads while the serving engine swaps
    between two versions ``swaps`` times (each a full load of the standby, then the reference);
    the gaps between consecutive tokens are compared with equally long windows without swaps.
    ``trainer`` "process": the promotions come from another process, and this one only syncs."""
    daemon = Daemon(
        settings_for(
            work / f"fig6-{trainer}",
            **{
                "train.passes_per_batch": 2,
                "train.heldout_fraction": 0.0,
                "train.fill_wait_s": 0.0,
                "model.device": device.type,
                "serving.max_concurrency": streams,
                "eval.heldout_budget": 1e9,
                # Two quick versions to swap between, not a test of the gate: the collapse guard
                # refused the second one's looser probes (distinct 3-grams 0.292 < 0.3).
                "eval.collapse.probe_prompts": [],
            },
        )
    )
    daemon.start(run_trainer=False)
    versions = []
    for k in range(2):
        daemon.ingest([NewSample(t) for t in short_texts(40, seed=SEED + 10 + k)])
        while daemon.queue.depth() > 0:
            daemon.trainer.cycle()
        versions.append(daemon.engine.current().version)
    engine, registry = daemon.engine, daemon.registry
    params = SamplingParams(max_new_tokens=48)
    expected = {}
    for v in versions:
        registry.rollback(v)
        engine.sync()
        expected[v] = engine.generate(PROMPT, params).text
    assert expected[versions[0]] != expected[versions[1]], "the two versions answer alike; nothing to check"

    stop = threading.Event()
    gaps: list[tuple[float, float]] = []  # (time of the token, gap before it)
    errors: list[str] = []
    completed = [0]
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            try:
                last = time.perf_counter()
                local = []
                done = None
                for _tok, result in engine.stream(PROMPT, params):
                    now = time.perf_counter()
                    local.append((now, now - last))
                    last = now
                    done = result
                assert done is not None
                with lock:
                    gaps.extend(local[1:])  # the first gap includes the prompt
                    completed[0] += 1
                    if done.text != expected[done.version]:
                        errors.append(f"version {done.version} answered {done.text!r}")
            except Exception as exc:  # counted, not raised: the figure is the error count
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    swap_windows: list[tuple[float, float]] = []
    calm_windows: list[tuple[float, float]] = []
    swap_s: list[float] = []
    per_block = 5

    conn = None
    if trainer == "process":
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        helper = ctx.Process(target=promoter, args=(daemon.settings.store_url, child_conn), daemon=True)
        helper.start()

    def swapper() -> None:
        # Swaps run on the trainer's thread in llmos (stage 5), at the trainer's CPU priority; with
        # the trainer in its own process, on the supervisor's thread after the child promoted.
        nice = daemon.trainer.cfg.nice
        if nice > 0 and sys.platform == "linux" and conn is None:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        for block in range(swaps // per_block):
            t0 = time.perf_counter()
            for i in range(per_block):
                version = versions[(block * per_block + i) % 2]
                if conn is not None:
                    conn.send(version)
                    assert conn.recv()
                else:
                    registry.promote(version, registry.active_version())
                s0 = time.perf_counter()
                engine.sync()
                swap_s.append(time.perf_counter() - s0)
                time.sleep(0.02)
            t1 = time.perf_counter()
            swap_windows.append((t0, t1))
            time.sleep(t1 - t0)  # as long again without swaps
            calm_windows.append((t1, time.perf_counter()))

    swap_thread = threading.Thread(target=swapper)
    swap_thread.start()
    swap_thread.join()
    stop.set()
    for t in threads:
        t.join(30)
    if conn is not None:
        conn.send(None)
        helper.join(30)
    daemon.stop()

    def within(windows: list[tuple[float, float]]) -> list[float]:
        return [g for at, g in gaps if any(a <= at <= b for a, b in windows)]

    during, calm = within(swap_windows), within(calm_windows)
    return {
        "trainer": trainer,
        "swaps": len(swap_s),
        "streams": streams,
        "max_gap_during_swaps_ms": 1e3 * max(during),
        "p99_gap_during_swaps_ms": 1e3 * percentile(during, 99),
        "max_gap_without_swaps_ms": 1e3 * max(calm),
        "p99_gap_without_swaps_ms": 1e3 * percentile(calm, 99),
        "median_gap_ms": 1e3 * median([g for _at, g in gaps]),
        "swap_load_ms_median": 1e3 * median(swap_s),
        "requests_completed": completed[0],
        "errors": len(errors),
        "error_examples": errors[:3],
    }


# ---- figure 7: freshness -------------------------------------------------------------------------
def freshness_once(c: httpx.Client, url: str, text: str, timeout: float = 900) -> tuple[float, bool]:
    """(seconds, served): from POSTing ``text`` to the first /generate answered by a version
    trained on it; or, when the gate refused that version, to the refusal (served False)."""
    t0 = time.perf_counter()
    r = c.post(url + "/v1/texts", json={"text": text})
    r.raise_for_status()
    sid = r.json()["ids"][0]
    trained_in = None
    while time.perf_counter() - t0 < timeout:
        if trained_in is None:
            s = c.get(url + f"/v1/texts/{sid}").json()
            if s["status"] == "rejected":
                return time.perf_counter() - t0, False
            if s["status"] == "heldout":
                raise RuntimeError("the text was held out: it is never trained")
            trained_in = s["trained_in_version"]
        if trained_in is not None:
            g = c.get(url + "/generate", params={"prompt": "x", "max_new_tokens": 1})
            if g.json()["model_version"] >= trained_in:
                return time.perf_counter() - t0, True
        time.sleep(0.01)
    raise TimeoutError("no verdict on the text in time")


def fresh_texts(n: int, fraction: float, seed: int) -> list[str]:
    """Texts like the warm-up ones (so that the gate can promote a version trained on one) that
    the hash-based split does not hold out (a held-out text is never trained)."""
    return [t for t in short_texts(20 * n + 20, seed=seed) if not is_heldout(t, fraction)][:n]


FRESH = {  # what a user who wants new text served quickly would set
    "LLMOS_TRAIN__FILL_WAIT_S": "0",  # no wait for more texts to fill the batch
    "LLMOS_TRAIN__PASSES_PER_BATCH": "4",  # 4 passes over a batch instead of 40
}


def fig7(
    work: Path,
    tag: str,
    env: dict[str, str],
    repeats: int,
    warm: int = 64,
    model: str | None = None,
    tree: Path | None = None,
) -> dict[str, Any]:
    """Freshness, after ``warm`` texts were trained (so that replay and evaluation sets are as in
    a running server); texts are posted one at a time, each after the previous was served."""
    env = {**LIMITS_OFF, **env}
    if model is not None:
        env["LLMOS_MODEL__NAME_OR_PATH"] = model
    times = []
    with Server(work / f"fig7-{tag}", env, tree=tree) as srv, httpx.Client(timeout=60) as c:
        if warm:
            r = c.post(srv.url + "/v1/texts", json={"items": [{"text": t} for t in short_texts(warm, seed=SEED + 7)]})
            r.raise_for_status()
            last = r.json()["ids"][-1]
            deadline = time.monotonic() + 900
            while c.get(srv.url + f"/v1/texts/{last}").json()["status"] in ("queued", "training"):
                if time.monotonic() > deadline:
                    raise TimeoutError("the warm-up texts were not trained in time")
                time.sleep(0.1)
        refused = []
        for t in fresh_texts(repeats, 0.1, seed=SEED + 70 + len(tag)):
            dt, served = freshness_once(c, srv.url, t)
            (times if served else refused).append(dt)
    return {
        "seconds_median": median(times),
        "seconds": times,
        "refused_by_gate": len(refused),
        "refused_after_s": refused,
        "posts": repeats,
        "settings": {k: v for k, v in env.items() if k not in LIMITS_OFF},
        "warm": warm,
    }


# ---- figure 8: ingest ----------------------------------------------------------------------------
def fig8(work: Path, singles: int, batches: int, rounds: int, baseline: Path | None = None) -> dict[str, Any]:
    """Acknowledged texts/s (a 202 means committed, synchronous=FULL), trainer paused so that the
    store path is what is measured. With ``baseline`` (another checkout), its server is measured
    too, alternating with this one."""
    env = {**LIMITS_OFF, "LLMOS_LIMITS__MAX_QUEUE_DEPTH": "100000000"}
    trees: dict[str, Path | None] = {"llmos": None}
    if baseline is not None:
        trees["baseline"] = baseline
    n = [0]

    def single(srv: Server) -> float:
        reqs = [raw_post(srv.port, "/v1/texts", {"text": f"single {n[0]}-{i}: a short text."}) for i in range(singles)]
        n[0] += 1
        dt, statuses, _ = blast(srv.port, reqs, 16)
        assert statuses == {202: singles}, statuses
        return singles / dt

    def batched(srv: Server) -> float:
        items = [[{"text": f"batch {n[0]}-{j}-{i}: a short text."} for i in range(1000)] for j in range(batches)]
        n[0] += 1
        dt, statuses, _ = blast(srv.port, [raw_post(srv.port, "/v1/texts", {"items": chunk}) for chunk in items], 2)
        assert statuses == {202: batches}, statuses
        return batches * 1000 / dt

    servers = {name: Server(work / f"fig8-{name}", env, tree=tree) for name, tree in trees.items()}
    try:
        with httpx.Client(timeout=60) as c:
            for srv in servers.values():
                srv.__enter__()
                srv.admin(c, "/v1/admin/trainer/pause")
                single(srv)  # warm-up
            variants: dict[str, Callable[[], float]] = {}
            for name, srv in servers.items():
                variants[f"{name}_single"] = lambda srv=srv: single(srv)  # type: ignore[misc]
                variants[f"{name}_batch"] = lambda srv=srv: batched(srv)  # type: ignore[misc]
            res = alternate(variants, rounds)
            synchronous = {name: c.get(srv.url + "/readyz").status_code for name, srv in servers.items()}
    finally:
        for srv in servers.values():
            srv.__exit__(None, None, None)
    out: dict[str, Any] = {"connections": {"single": 16, "batch": 2}, "ready": synchronous, "rounds": rounds}
    for name in servers:
        out[name] = {
            "single_req_s": median(res[f"{name}_single"]),
            "single_runs": res[f"{name}_single"],
            "batch_texts_s": median(res[f"{name}_batch"]),
            "batch_runs": res[f"{name}_batch"],
        }
    return out


# ---- main ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="figures to run (1-8); default all")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument(
        "--baseline",
        help="a git revision (say, the commit before a change): figures 7 and 8 measure its server too, "
        "side by side with this checkout's",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    only = set(args.only or [str(i) for i in range(1, 9)])
    q = args.quick
    torch.manual_seed(SEED)
    budget = ThreadBudget.of()  # the daemon's default
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine(),
        "device": str(device),
        "torch_threads": f"{budget.serving} (decoding and training; the opt-in idle budget is off)",
    }
    work = Path(tempfile.mkdtemp(prefix="llmos-speed-"))
    texts = short_texts(2000)
    baseline: Path | None = None
    if args.baseline:
        baseline = work / "baseline"
        baseline.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
        results["baseline"] = args.baseline
    try:
        tiny = Daemon(settings_for(work / "tiny", **{"model.device": device.type}))
        tiny.start(run_trainer=False)
        torch.set_num_threads(budget.idle)  # this thread trains below, as the trainer's does when no generation comes
        if only & {"1", "3"}:
            results["fig1"] = eff = fig1(tiny.factory, device, texts, q)
            if "3" in only:
                log("figure 3: bf16 against fp32 (loss curves, peaks)")
                steps = None if eff["native_bf16"] else 24
                results["fig3"] = fig3(eff, loss_curves(tiny.factory, device, texts, steps), device)
        if "4" in only:
            log("figure 4: generation against model.generate")
            results["fig4"] = fig4_engine(tiny, 3 if q else 25)  # ~0.4 s a round: 9 rounds were too few to steady it
        tiny.stop()
        if "2" in only:
            log("figure 2: samples/s against the naive loop")
            results["fig2"] = fig2(work, device, texts, 1 if q else 2)
        if "6" in only:
            log("figure 6: hot-swap stalls")
            results["fig6"] = fig6(work, device, swaps=10 if q else 50)
            log("figure 6: hot-swap stalls, promotions from another process (runtime.trainer = process)")
            results["fig6_process"] = fig6(work, device, swaps=10 if q else 50, trainer="process")
        if True:  # over HTTP: the server takes cuda when there is one (model.device auto)
            if "4" in only:
                log("figure 4: time to first token over HTTP")
                with Server(work / "fig4", LIMITS_OFF) as srv:
                    results["fig4_http"] = fig4_http(srv, 5 if q else 15)
                log("figure 4: concurrent clients, decoded one at a time and batched")
                results["fig4_concurrent"] = fig4_concurrent(work, 2 if q else 5)
            if "5" in only:
                # --quick (the GPU check) leaves out the "before" variants: it has 5 minutes in all
                variants = [n for n in FIG5_VARIANTS if not (q and n.startswith("before"))]
                results["fig5"] = fig5_compare(work, 1 if q else 2, 1 if q else 6, 15 if q else 50, variants)
            if "7" in only:
                log("figure 7: freshness")
                results["fig7"] = {
                    "fresh": fig7(work, "fresh", FRESH, 3 if q else 8),
                    "defaults": fig7(work, "defaults", {}, 2 if q else 4),
                }
                if not q:  # the defaults with the early stop off: every batch gets all its passes
                    off = {"LLMOS_TRAIN__EARLY_STOP_PATIENCE": "0"}
                    results["fig7"]["before_early_stop"] = fig7(work, "defaults-no-early-stop", off, 4)
                if baseline is not None:
                    log("figure 7: freshness, baseline checkout")
                    results["fig7"]["baseline_fresh"] = fig7(
                        work, "baseline-fresh", FRESH, 3 if q else 8, tree=baseline
                    )
            if "8" in only:
                log("figure 8: ingest")
                results["fig8"] = fig8(work, 300 if q else 2000, 5 if q else 20, 1 if q else 3, baseline)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t_start
    results["command"] = "python " + " ".join(["bench/speed.py", *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    name = "speed.json" if device.type == "cpu" else f"speed-{device.type}.json"
    (args.out / name).write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    log(f"wrote {args.out / name} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
