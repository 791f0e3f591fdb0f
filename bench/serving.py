"""Serving under load (figure 10): llmos's batched decoding against references, side by side.

    make bench-serving      (or: python bench/serving.py --out bench/results)

  10a generated tokens/s with 1, 8 and 32 concurrent clients (each one greedy request of 32 new
      tokens, all sent at once) through llmos's serving engine, against Hugging Face `generate` on
      a static batch of the same prompts (goal >= 0.9x);
  10b the gaps between the tokens of 8 streams while a 2,000-token prompt arrives: p99 of the
      gaps from its arrival to its first token, against the median gap before it (goal <= 3x),
      with prompts run in chunks (serving.prefill_chunk_tokens at most, each sized to cost no more
      than a decoding step: the default) and whole, on the built-in model and on a 6 x 512 one;
  10c the batcher that ships against transformers' own continuous batching
      (`model.generate_batch`: a paged KV cache and a scheduler), 32 prompts x 32 new tokens.

Each figure alternates its variants round by round and reports the median of per-round ratios.
Everything runs in this process on the CPU (or --device cuda), the models built from configs
(random weights: nothing is downloaded) and loaded through llmos's own loader.
Results go to <out>/serving.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from common import commit, machine, median, percentile  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from llmos.model.builtin import create_tiny  # noqa: E402
from llmos.model.loader import ModelFactory  # noqa: E402
from llmos.serving.batch import Batcher  # noqa: E402
from llmos.serving.engine import pick_token  # noqa: E402
from llmos.serving.types import SamplingParams  # noqa: E402
from llmos.settings import ServingSettings  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
NEW = 32
DEFAULTS = ServingSettings()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prompts(tok: Any, n: int) -> list[list[int]]:
    eos = tok.eos_token_id
    return [[eos, *tok.encode(f"Client {i}: the tide at Korvel turns", add_special_tokens=False)] for i in range(n)]


def batched(
    batcher: Batcher, model: torch.nn.Module, seqs: list[list[int]], new: int = NEW, each_token: bool = False
) -> tuple[float, int]:
    """All requests at once, one thread each (as clients are): seconds until the last ends, tokens
    made. Whole answers, as /generate without streaming takes them (each_token: as a stream does)."""
    made = [0] * len(seqs)
    go = threading.Barrier(len(seqs) + 1)

    def client(i: int) -> None:
        go.wait()
        events = batcher.decode(model, seqs[i], GREEDY, new, None, each_token)
        made[i] = sum(1 for t in events if isinstance(t, int))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(seqs))]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(made)


def static_generate(model: torch.nn.Module, seqs: list[list[int]], eos: int, new: int = NEW) -> tuple[float, int]:
    """Hugging Face generate on one left-padded batch of the same prompts; tokens up to each EOS."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[eos] * (width - len(s)) + s for s in seqs], device=model.device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=eos, eos_token_id=eos
        )
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    made = 0
    for row in out[:, width:].tolist():
        made += row.index(eos) if eos in row else len(row)
    return dt, made


def fig10a(factory: ModelFactory, rounds: int) -> dict[str, Any]:
    model, eos = factory.instance().eval(), factory.tokenizer.eos_token_id
    out: dict[str, Any] = {}
    for clients in (1, 8, 32):
        seqs = prompts(factory.tokenizer, clients)
        variants = {
            f"llmos (max_concurrency {DEFAULTS.max_concurrency})": Batcher(
                factory.device, eos, DEFAULTS.max_concurrency, pick_token
            ),
        }
        if clients > DEFAULTS.max_concurrency:
            variants["llmos (max_concurrency 32)"] = Batcher(factory.device, eos, 32, pick_token)
        rates: dict[str, list[float]] = {name: [] for name in [*variants, "generate"]}
        batched(next(iter(variants.values())), model, seqs)  # warm
        static_generate(model, seqs, eos)
        for _ in range(rounds):
            for name, b in variants.items():
                dt, n = batched(b, model, seqs)
                rates[name].append(n / dt)
            dt, n = static_generate(model, seqs, eos)
            rates["generate"].append(n / dt)
        row: dict[str, Any] = {"generate tok/s": median(rates["generate"])}
        for name in variants:
            row[f"{name} tok/s"] = median(rates[name])
            row[f"{name} / generate"] = median([a / b for a, b in zip(rates[name], rates["generate"], strict=True)])
        out[str(clients)] = row
        log(f"10a {clients} clients: {row}")
    return out


def fig10b(factory: ModelFactory, rounds: int) -> dict[str, Any]:
    """8 streams of 300 tokens; when each has 20, a 2,000-token prompt arrives (8 new tokens)."""
    model, tok = factory.instance().eval(), factory.tokenizer
    eos = tok.eos_token_id
    streams = prompts(tok, 8)
    text = " ".join(f"line {n} of the manual says the lamp is teal." for n in range(60))
    long = [eos, *tok.encode(text, add_special_tokens=False)][:2000]

    def once(chunk: int) -> dict[str, float]:
        batcher = Batcher(factory.device, eos, 16, pick_token, chunk=chunk)
        stamps: list[list[float]] = [[] for _ in streams]
        ready = threading.Barrier(len(streams) + 1)

        def stream(i: int) -> None:
            for t in batcher.decode(model, streams[i], GREEDY, 300, None):
                if isinstance(t, int):
                    stamps[i].append(time.perf_counter())
                    if len(stamps[i]) == 20:
                        ready.wait()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(streams))]
        for t in threads:
            t.start()
        ready.wait()
        arrived = time.perf_counter()
        first = None
        for t in batcher.decode(model, long, GREEDY, 8, None):
            if first is None and isinstance(t, int):
                first = time.perf_counter()
        for t in threads:
            t.join()
        assert first is not None
        before = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False) if b < arrived]
        during = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False) if arrived < b and a < first]
        return {
            "median gap before, ms": 1e3 * median(before),
            "p99 gap before, ms": 1e3 * percentile(before, 99),  # the machine's own jitter, no long prompt
            "p99 gap during, ms": 1e3 * percentile(during, 99),
            "p99 / median": percentile(during, 99) / median(before),
            "first token of the long prompt, ms": 1e3 * (first - arrived),
        }

    variants = {f"paced chunks of up to {DEFAULTS.prefill_chunk_tokens}": DEFAULTS.prefill_chunk_tokens, "whole": 0}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    once(DEFAULTS.prefill_chunk_tokens)  # warm
    for _ in range(rounds):
        for name, chunk in variants.items():
            runs[name].append(once(chunk))
    out = {name: {k: median([r[k] for r in rs]) for k in rs[0]} for name, rs in runs.items()}
    log(f"10b {out}")
    return out


def fig10c(factory: ModelFactory, rounds: int) -> dict[str, Any]:
    model, eos = factory.instance().eval(), factory.tokenizer.eos_token_id
    seqs = prompts(factory.tokenizer, 32)
    mine = Batcher(factory.device, eos, 32, pick_token)
    config = GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos)

    def theirs() -> tuple[float, int]:
        t0 = time.perf_counter()
        out = model.generate_batch(inputs=seqs, generation_config=config, progress_bar=False)
        return time.perf_counter() - t0, sum(len(o.generated_tokens) for o in out.values())

    theirs()  # its first call sets up the paged cache and warms up
    batched(mine, model, seqs)
    a, b = [], []
    for _ in range(rounds):
        dt, n = batched(mine, model, seqs)
        a.append(n / dt)
        dt, n = theirs()
        b.append(n / dt)
    out = {
        "llmos batcher tok/s": median(a),
        "transformers continuous batching tok/s": median(b),
        "llmos / transformers": median([x / y for x, y in zip(a, b, strict=True)]),
    }
    log(f"10c {out}")
    return out


def report(results: dict[str, Any]) -> str:
    m, lines = results["machine"], []
    lines += [
        "# Serving under load (figure 10)",
        "",
        f"Measured {results['when']} at commit {results['commit']} on {m['cpu']} ({m['cores']} cores, "
        f"{m['cpu_features']}), torch {m['torch']}, {results['device']}{', ' + m['gpu'] if m['gpu'] else ''}; "
        f"whole run {results['seconds']:.0f} s.",
        f"Command: `{results['command']}`. Each figure: median of per-round ratios, variants alternated.",
        "",
        "## 10a generated tokens/s against `generate` on a static batch (goal >= 0.9x)",
        "",
    ]
    for size, fig in results["fig10a"].items():
        lines += [f"{size}:", "", "| clients | generate tok/s | llmos | tok/s | / generate |", "|---|---|---|---|---|"]
        for clients, row in fig.items():
            for name in sorted(k.removesuffix(" tok/s") for k in row if k.startswith("llmos") and k.endswith(" tok/s")):
                lines.append(
                    f"| {clients} | {row['generate tok/s']:.0f} | {name} | {row[name + ' tok/s']:.0f} | "
                    f"{row[name + ' / generate']:.2f}x |"
                )
        lines.append("")
    lines += [
        "## 10b gaps between tokens of 8 streams while a 2,000-token prompt arrives (goal: p99 <= 3x the median)",
        "",
        "*p99 before*: the p99 gap before the long prompt arrives, the machine's own jitter.",
        "",
        "| model | prompt run | median gap before (ms) | p99 before (ms) | p99 gap while it runs (ms) | p99 / median "
        "| its first token (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, fig in results["fig10b"].items():
        for name, r in fig.items():
            lines.append(
                f"| {size} | {name} | {r['median gap before, ms']:.1f} | {r['p99 gap before, ms']:.1f} | "
                f"{r['p99 gap during, ms']:.1f} | {r['p99 / median']:.2f}x | "
                f"{r['first token of the long prompt, ms']:.0f} |"
            )
    lines += [
        "",
        "## 10c the batcher that ships against transformers' continuous batching (32 prompts x 32 tokens)",
        "",
        "| model | llmos tok/s | transformers CB tok/s | llmos / transformers |",
        "|---|---|---|---|",
    ]
    for size, r in results["fig10c"].items():
        lines.append(
            f"| {size} | {r['llmos batcher tok/s']:.0f} | {r['transformers continuous batching tok/s']:.0f} | "
            f"{r['llmos / transformers']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


SIZES = {"built-in (2 x 128)": {}, "6 x 512": {"n_layer": 6, "n_embd": 512, "n_head": 8}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--report", type=Path, help="only write the .md of this results .json again")
    args = parser.parse_args()
    if args.report:
        args.report.with_suffix(".md").write_text(report(json.loads(args.report.read_text())))
        return
    device = torch.device(args.device)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))  # the decoding thread's share, as served
    t0 = time.time()
    results: dict[str, Any] = {
        "commit": commit(),
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "device": str(device),
        "command": "make bench-serving",
        "fig10a": {},
        "fig10c": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for size, shape in SIZES.items():
            factory = ModelFactory(str(create_tiny(Path(tmp) / size.replace(" ", ""), **shape)), device)
            results["fig10a"][size] = fig10a(factory, args.rounds)
            results["fig10c"][size] = fig10c(factory, max(2, args.rounds // 2))
        results["fig10b"] = {}
        for size, shape in SIZES.items():  # a chunk's fixed cost weighs most on the smallest model
            long = ModelFactory(
                str(create_tiny(Path(tmp) / f"long-{len(results['fig10b'])}", n_positions=2304, **shape)), device
            )
            results["fig10b"][size] = fig10b(long, args.rounds)
    results["seconds"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "" if device.type == "cpu" else f"-{device.type}"
    (args.out / f"serving{tag}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"serving{tag}.md").write_text(report(results))
    log(f"wrote {args.out}/serving{tag}.md")


if __name__ == "__main__":
    main()
