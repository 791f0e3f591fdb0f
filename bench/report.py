"""Write bench/results/RESULTS.md from what bench/speed.py and bench/scaling.py measured.

    python bench/report.py --results bench/results --command "make bench"

Every number comes from the JSON files of the run; nothing here is measured or typed in.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import commit

GOALS = {
    "1": ("≥ 0.95", lambda r: r >= 0.95),
    "2": ("≥ 10×", lambda r: r >= 10),
    "3": ("≤ 2 %", lambda r: r <= 0.02),
    "4": ("≥ 0.95", lambda r: r >= 0.95),
    "5": ("≤ 1.5", lambda r: r <= 1.5),
    "6": ("≤ 10 ms, 0 errors", None),
    "7": ("≤ 2 s", lambda r: r <= 2),
    "8s": ("≥ 500 req/s", lambda r: r >= 500),
    "8b": ("≥ 20,000 texts/s", lambda r: r >= 20_000),
}


def met(key: str, value: float) -> str:
    check = GOALS[key][1]
    if check is None or value is None or (isinstance(value, float) and math.isnan(value)):
        return "?"
    return "**met**" if check(value) else "**not met**"


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def machine_line(m: dict[str, Any]) -> str:
    gpu = m.get("gpu") or "none"
    return f"{m['cpu']}, {m['cores']} cores ({m['cpu_features']}), GPU: {gpu}; torch {m['torch']}, Python {m['python']}"


def speed_table(s: dict[str, Any]) -> list[str]:
    rows = ["| # | figure | llmos | reference | ratio / value | goal | |", "|---|---|---|---|---|---|---|"]
    if "fig1" in s:
        f1 = s["fig1"]
        for dt in ("fp32", "bf16"):
            if dt in f1:
                d = f1[dt]
                # A dtype the CPU only emulates is measured briefly, for figure 3; llmos does not train in it.
                goal = (
                    f"| – | emulated, {d['brief']} |"
                    if "brief" in d
                    else f"| {GOALS['1'][0]} | {met('1', d['ratio'])} |"
                )
                rows.append(
                    f"| 1 | trainer tokens/s, optimize stage vs bare PyTorch loop ({dt}, {f1['batch']}, "
                    f"{f1['params'] / 1e6:.2f}M params) | {fmt(d['llmos_tok_s'])} | {fmt(d['bare_tok_s'])} "
                    f"| {fmt(d['ratio'], 3)} {goal}"
                )
    if "fig2" in s:
        f2 = s["fig2"]
        rows.append(
            f"| 2 | samples/s on {f2['texts']} short texts: real trainer (1 pass) vs naive one-text-per-step loop "
            f"| {fmt(f2['llmos_samples_s'])} | {fmt(f2['naive_samples_s'])} | {fmt(f2['ratio'])}× "
            f"| {GOALS['2'][0]} | {met('2', f2['ratio'])} |"
        )
    if "fig3" in s:
        f3 = s["fig3"]
        loss = f3["loss"]
        emulated = (
            " (no bf16 instructions on this CPU: emulated, so model.precision auto trains in fp32)"
            if s["fig1"].get("native_bf16") is False
            else ""
        )
        rows.append(
            f"| 3 | bf16 autocast vs fp32: optimize tokens/s{emulated} | bf16 | fp32 "
            f"| {fmt(f3['speed_bf16_over_fp32'])}× | faster | "
            + ("**faster**" if f3["bf16_faster"] else "**slower**")
            + " |"
        )
        rows.append(
            f"| 3 | bf16 vs fp32: loss curve, largest gap of the 10-step means over {loss['steps']} steps "
            f"| {fmt(loss['bf16_final'], 3)} (final) | {fmt(loss['fp32_final'], 3)} (final) "
            f"| {100 * loss['max_rel_diff']:.2f} % | {GOALS['3'][0]} | {met('3', loss['max_rel_diff'])} |"
        )
        for dt in ("fp32", "bf16"):
            if dt not in f3:
                continue
            d = f3[dt]
            rows.append(
                f"| 3 | achieved FLOP/s, {dt} training vs 2048² {dt} matmul peak "
                f"| {d['achieved_flops'] / 1e9:.1f} G | {d['matmul_peak_flops'] / 1e9:.1f} G "
                f"| {100 * d['fraction_of_peak']:.0f} % of peak | – | |"
            )
    if "fig4" in s:
        f4 = s["fig4"]
        rows.append(
            f"| 4 | greedy generation tokens/s ({f4['new_tokens'].get('llmos')} new) vs bare model.generate "
            f"| {fmt(f4['llmos_tok_s'])} | {fmt(f4['bare_tok_s'])} | {fmt(f4['ratio'], 3)} | {GOALS['4'][0]} "
            f"| {met('4', f4['ratio'])} |"
        )
    if "fig4_http" in s:
        h = s["fig4_http"]
        rows.append(
            f"| 4 | time to first token, GET /generate?stream=true ({h['new_tokens']} tokens) vs the whole "
            f"non-streamed answer | {fmt(h['ttft_ms'], 1)} ms | {fmt(h['plain_total_ms'], 1)} ms "
            f"| {fmt(h['ttft_over_plain'])} | – | |"
        )
        rows.append(
            f"| 4 | the whole streamed answer vs the non-streamed one (HTTP, client parsing included) "
            f"| {fmt(h['stream_total_ms'], 1)} ms | {fmt(h['plain_total_ms'], 1)} ms "
            f"| {fmt(h['stream_total_over_plain'])} | – | |"
        )
    if "fig5" in s:
        for name, d in s["fig5"].items():
            rows.append(
                f"| 5 | /generate p99 (16 tokens), trainer busy vs paused, {d['requests_per_state']} requests each — "
                f"{name}; p50 {fmt(d['busy_p50_ms'], 1)} vs {fmt(d['paused_p50_ms'], 1)} ms, ratio "
                f"{fmt(d['p50_ratio'])} | {fmt(d['busy_p99_ms'], 1)} ms | {fmt(d['paused_p99_ms'], 1)} ms "
                f"| {fmt(d['p99_ratio'])} (single runs: {', '.join(fmt(r['p99_ratio']) for r in d['runs'])})"
                + (  # not recorded by runs before the trainer process
                    f"; the trainer made {fmt(d['busy_steps_per_s'], 1)} steps/s while it served"
                    if "busy_steps_per_s" in d
                    else ""
                )
                + f" | {GOALS['5'][0]} | {met('5', d['p99_ratio'])} |"
            )
    for key, where in (("fig6", ""), ("fig6_process", ", promoted by another process (runtime.trainer = process)")):
        if key not in s:
            continue
        f6 = s[key]
        ok = f6["max_gap_during_swaps_ms"] <= 10 and f6["errors"] == 0
        rows.append(
            f"| 6 | hot-swap{where}: longest gap between tokens of the request in flight during {f6['swaps']} swaps "
            f"(median gap {fmt(f6['median_gap_ms'], 2)} ms, a swap's load {fmt(f6['swap_load_ms_median'], 0)} ms); "
            f"errors {f6['errors']} in {f6['requests_completed']} requests "
            f"| {fmt(f6['max_gap_during_swaps_ms'], 1)} ms (p99 {fmt(f6['p99_gap_during_swaps_ms'], 1)}) "
            f"| {fmt(f6['max_gap_without_swaps_ms'], 1)} ms (p99 {fmt(f6['p99_gap_without_swaps_ms'], 1)}) "
            f"without swaps | {fmt(f6['max_gap_during_swaps_ms'], 1)} ms | {GOALS['6'][0]} "
            f"| {'**met**' if ok else '**not met**'} |"
        )
    if "fig7" in s:
        for name, d in s["fig7"].items():
            if name.startswith(("baseline", "before")):  # rows of the before/after table
                continue
            settings = ", ".join(f"{setting_name(k)}={v}" for k, v in d["settings"].items())
            refused = d["refused_by_gate"]
            extra = ""
            if refused:
                extra = f"; {refused} of {d['posts']} refused by the gate after {fmt(median(d['refused_after_s']))} s"
            # No post served means no freshness to report: the goal is not met.
            value = f"{fmt(d['seconds_median'])} s" if d["seconds"] else "none served"
            verdict = met("7", d["seconds_median"]) if d["seconds"] else "**not met**"
            rows.append(
                f"| 7 | freshness: POST to the first answer by a version trained on it — "
                f"{'settings for freshness' if name == 'fresh' else 'default settings'} ({settings or 'none'}){extra} "
                f"| {value} | – | {value} | {GOALS['7'][0]} | {verdict} |"
            )
    if "fig8" in s:
        f8 = s["fig8"]["llmos"]
        rows.append(
            f"| 8 | ingest, one text per request (16 connections), acknowledged = committed "
            f"| {fmt(f8['single_req_s'])} req/s | – | {fmt(f8['single_req_s'])} | {GOALS['8s'][0]} "
            f"| {met('8s', f8['single_req_s'])} |"
        )
        rows.append(
            f"| 8 | ingest, 1000 texts per request (2 connections) | {fmt(f8['batch_texts_s'])} texts/s | – "
            f"| {fmt(f8['batch_texts_s'])} | {GOALS['8b'][0]} | {met('8b', f8['batch_texts_s'])} |"
        )
    return rows


def setting_name(env: str) -> str:
    """LLMOS_TRAIN__FILL_WAIT_S -> train.fill_wait_s"""
    return env.removeprefix("LLMOS_").lower().replace("__", ".")


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if not n:
        return float("nan")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def before_after(s: dict[str, Any]) -> list[str]:
    rows = ["| change (file) | figure | before | after |", "|---|---|---|---|"]
    base = s.get("baseline")
    if "fig8" in s and "baseline" in s["fig8"]:
        b, a = s["fig8"]["baseline"], s["fig8"]["llmos"]
        rows.append(
            f"| group commit of concurrent ingests, Core insert, depth estimate (store/queue.py, daemon.py) "
            f"| 8: one text per request | {fmt(b['single_req_s'])} req/s | {fmt(a['single_req_s'])} req/s |"
        )
        rows.append(
            f"| the same | 8: 1000 texts per request | {fmt(b['batch_texts_s'])} texts/s "
            f"| {fmt(a['batch_texts_s'])} texts/s |"
        )
    if "fig5" in s:
        names = list(s["fig5"])
        if len(names) >= 2:
            b, a = s["fig5"][names[0]], s["fig5"][names[1]]
            rows.append(
                f"| the trainer waits between steps while generations are in flight, its thread niced "
                f"(trainer/loop.py, serving/engine.py, settings) | 5: p99 busy / paused (p50) | {fmt(b['p99_ratio'])} "
                f"({fmt(b['p50_ratio'])}) | {fmt(a['p99_ratio'])} ({fmt(a['p50_ratio'])}) |"
            )
        if len(names) >= 3:
            a, idle = s["fig5"][names[1]], s["fig5"][names[2]]
            rows.append(
                f"| opt-in thread budget: every core for the trainer after 1 s without a generation (threads.py, "
                f"runtime.torch_threads_idle; before: the default) | 5: p99 busy / paused (p50) "
                f"| {fmt(a['p99_ratio'])} ({fmt(a['p50_ratio'])}) "
                f"| {fmt(idle['p99_ratio'])} ({fmt(idle['p50_ratio'])}) |"
            )
    process = [n for n in s.get("fig5", {}) if "own process" in n]
    if process and len(s["fig5"]) >= 2:
        a, p = s["fig5"][list(s["fig5"])[1]], s["fig5"][process[0]]
        rows.append(
            f"| the trainer in its own process (trainer/process.py, runtime.trainer = process; before: a thread) "
            f"| 5: p99 busy / paused (p50); trainer steps/s while serving | {fmt(a['p99_ratio'])} "
            f"({fmt(a['p50_ratio'])}); {fmt(a['busy_steps_per_s'], 1)} | {fmt(p['p99_ratio'])} "
            f"({fmt(p['p50_ratio'])}); {fmt(p['busy_steps_per_s'], 1)} |"
        )
    if "fig1" in s and "fp32" in s["fig1"] and "bf16" in s["fig1"] and s["fig1"].get("native_bf16", True):
        f1 = s["fig1"]
        rows.append(
            f"| model.precision auto = bf16 on CPUs with bf16 instructions (daemon.py) | 1/3: optimize tokens/s "
            f"| {fmt(f1['fp32']['llmos_tok_s'])} (fp32) | {fmt(f1['bf16']['llmos_tok_s'])} (bf16) |"
        )
    if "fig1" in s and "kernels" in s["fig1"]:
        k = s["fig1"]["kernels"]
        rows.append(
            f"| built-in model: {k['attention']} attention, {k['activation']} (model/builtin.py, daemon.py; "
            f"before: sdpa, gelu_new) | 1: optimize tokens/s ({k['dtype']}), same run | {fmt(k['before_tok_s'])} "
            f"| {fmt(k['after_tok_s'])} ({fmt(k['ratio'])}x) |"
        )
    if "fig4_concurrent" in s:
        f = s["fig4_concurrent"]
        rows.append(
            f"| batched decoding: concurrent requests share one forward pass per token (serving/batch.py, "
            f"engine.py; serving.max_concurrency 1 before, 8 after) | 4: generated tokens/s, {f['clients']} clients "
            f"x {f['new_tokens']} tokens, same run | {fmt(f['one_at_a_time_tok_s'])} "
            f"| {fmt(f['batched_tok_s'])} ({fmt(f['ratio'])}x) |"
        )
    if "fig7" in s and "before_early_stop" in s["fig7"]:
        b, a = s["fig7"]["before_early_stop"], s["fig7"]["defaults"]

        def served(d: dict[str, Any]) -> str:
            value = f"{fmt(d['seconds_median'])} s" if d["seconds"] else "none served"
            return f"{value} ({len(d['seconds'])}/{d['posts']} served)"

        rows.append(
            f"| the early stop: a batch's passes end once the held-out loss stops falling, and the best pass is "
            f"kept (trainer/loop.py, evaluate.py, state.py) | 7: freshness at default settings, same run "
            f"| {served(b)} | {served(a)} |"
        )
    if "fig7" in s and "baseline_fresh" in s["fig7"]:
        b, a = s["fig7"]["baseline_fresh"], s["fig7"]["fresh"]
        rows.append(
            f"| all of the above | 7: freshness, settings for freshness (served / posts) "
            f"| {fmt(b['seconds_median'])} s ({len(b['seconds'])}/{b['posts']}) "
            f"| {fmt(a['seconds_median'])} s ({len(a['seconds'])}/{a['posts']}) |"
        )
    note = (
        f"Before = the commit {base} (the last before this work), run from a `git archive` of it beside this "
        "checkout's server, alternating; for figure 5, the same code with the change switched off by settings, "
        "alternating in the same run; for figures 1/3, the same stage in each dtype."
        if base
        else "Figure 5 switches the change off by settings in the same run."
    )
    return [note, "", *rows]


def scaling_table(sc: dict[str, Any]) -> list[str]:
    sizes = sc["sizes"]
    rows = [
        "| size | shape (layers × width) | params | dtype | 1: trainer tok/s | 1: vs bare loop | 4: generate tok/s "
        "| 4: vs model.generate | 7: freshness s (served/posts) | train FLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = None
    for name, d in sizes.items():
        f1 = d["fig1"][d["dtype"]]
        fpt = d["fig1"]["flops_per_token"]
        f7 = d["fig7"]
        rows.append(
            f"| {name} | {d['shape']['n_layer']} × {d['shape']['n_embd']} | {d['fig1']['params'] / 1e6:.1f}M "
            f"| {d['dtype']} | {fmt(f1['llmos_tok_s'])} | {fmt(f1['ratio'])} | {fmt(d['fig4']['llmos_tok_s'])} "
            f"| {fmt(d['fig4']['ratio'])} | {fmt(f7['seconds_median'])} ({len(f7['seconds'])}/{f7['posts']}) "
            f"| {fpt * f1['llmos_tok_s'] / 1e9:.1f} G |"
        )
        if first is None:
            first = (d["fig1"]["params"], f1["llmos_tok_s"], d["fig4"]["llmos_tok_s"], f7["seconds_median"])
    if first and len(sizes) > 1:
        rows += ["", "Growth against the smallest model (cost per token or per post; parameters ×):", ""]
        rows += ["| size | params × | training time per token × | generation time per token × | freshness × |"]
        rows += ["|---|---|---|---|---|"]
        for name, d in sizes.items():
            f1 = d["fig1"][d["dtype"]]
            rows.append(
                f"| {name} | {d['fig1']['params'] / first[0]:.0f} | {first[1] / f1['llmos_tok_s']:.1f} "
                f"| {first[2] / d['fig4']['llmos_tok_s']:.1f} | {d['fig7']['seconds_median'] / first[3]:.1f} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--command", default="python bench/speed.py; python bench/scaling.py; python bench/report.py")
    parser.add_argument("--device", default="cpu", help="cpu: RESULTS.md; cuda: RESULTS-cuda.md from the cuda runs")
    parser.add_argument("--commit", help="the commit the runs measured (default: this checkout's)")
    args = parser.parse_args()
    d = args.results

    def load(name: str) -> dict[str, Any] | None:
        p = d / name
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None

    if args.device == "cpu":
        speed, scaling = load("speed.json"), load("scaling.json")
        gpu_speed, gpu_scaling = load("speed-cuda.json"), load("scaling-cuda.json")
    else:
        speed, scaling = load(f"speed-{args.device}.json"), load(f"scaling-{args.device}.json")
        gpu_speed = gpu_scaling = None
    ref = speed or scaling or gpu_speed or gpu_scaling
    if ref is None:
        raise SystemExit(f"no results in {d}: run bench/speed.py and bench/scaling.py first")
    lines = [
        "# Speed: llmos against references measured side by side",
        "",
        f"Written {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{args.command}`, measured at commit "
        f"{args.commit or commit()}.",
        f"Machine: {machine_line(ref['machine'])}.",
    ]
    if speed:
        lines.append(
            f"`{speed['command']}`: {speed['seconds']:.0f} s, device {speed['device']}, "
            f"torch threads: {speed['torch_threads']}."
        )
    if scaling:
        lines.append(f"`{scaling['command']}`: {scaling['seconds']:.0f} s, device {scaling['device']}.")
    lines += [
        "",
        "Each ratio compares two things measured in the same run, alternated round by round (A, B, B, A, ...) "
        "on a shared, noisy machine; a figure is the median of the per-round ratios unless it says otherwise. "
        "Absolute numbers are context only.",
        "",
    ]
    if speed:
        lines += ["## Figures 1-8 (built-in tiny model)", "", *speed_table(speed), ""]
        lines += ["## Before and after", "", *before_after(speed), ""]
    if scaling:
        lines += ["## Figure 9: scaling (figures 1, 4, 7 by model size)", "", *scaling_table(scaling), ""]
    if args.device == "cpu":
        lines += ["## GPU", ""]
        if gpu_speed or gpu_scaling:
            lines += ["From `bench/gpu_check.sh` (see RESULTS-cuda.md for its run):", ""]
            if gpu_speed:
                lines += [f"Machine: {machine_line(gpu_speed['machine'])}.", "", *speed_table(gpu_speed), ""]
            if gpu_scaling:
                lines += [*scaling_table(gpu_scaling), ""]
        else:
            lines += [
                "Not run: no CUDA GPU was available where these figures were measured. `bench/gpu_check.sh` runs "
                "the GPU tests and these benchmarks on cuda and writes `speed-cuda.json`, `scaling-cuda.json` "
                "and `RESULTS-cuda.md` here.",
                "",
            ]
    lines += ["## Notes", "", *notes(speed, scaling)]
    out = d / ("RESULTS.md" if args.device == "cpu" else f"RESULTS-{args.device}.md")
    out.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    print(out.read_text(encoding="utf-8"))


def notes(speed: dict[str, Any] | None, scaling: dict[str, Any] | None) -> list[str]:
    out = []
    if speed and "fig2" in speed:
        f2 = speed["fig2"]
        settings = ", ".join(f"{k}={v}" for k, v in f2["llmos_settings"].items())
        line = (
            f"- Figure 2 compares samples/s on the same base model; llmos ({f2.get('dtype', '?')}) "
            "runs its whole cycle (claim, preprocess, prequential loss, optimize, evaluate, checkpoint with fsync, "
            f"hot-swap) with {settings}, one pass as the naive loop makes."
        )
        if "naive_fp32_samples_s" in f2:
            bf16 = (
                f"and in bf16 ({fmt(f2['naive_bf16_samples_s'])}); the ratio is against the faster "
                f"({f2['naive_dtype']})"
                if f2.get("naive_bf16_samples_s") is not None
                else "(not in bf16: this CPU has no bf16 instructions)"
            )
            line += (
                f" The naive loop ran with torch's default threads (all cores) in fp32 "
                f"({fmt(f2['naive_fp32_samples_s'])} samples/s) {bf16}. With the opt-in idle thread budget "
                f"(runtime.torch_threads_idle = every core) llmos made {fmt(f2['llmos_idle_cores_samples_s'])} "
                f"samples/s, {f2['idle_cores_ratio']:.2f}× its default."
            )
        if "naive_ms_per_8_token_step" in f2 and "fig1" in speed:
            dt = f2.get("dtype", "fp32")
            tok_s = speed["fig1"].get(dt, {}).get("llmos_tok_s")
            if tok_s:
                ceiling = tok_s / f2["tokens_per_text"] / f2["naive_samples_s"]
                line += (
                    f" What bounds the ratio here: the naive loop's fixed cost per step (its step on an 8-token "
                    f"text) is {f2['naive_ms_per_8_token_step']:.1f} ms of its {f2['naive_ms_per_text']:.1f} ms per "
                    f"{f2['tokens_per_text']:.0f}-token text, and batching removes only that part; the optimize "
                    f"stage alone at its figure-1 rate ({fmt(tok_s)} tokens/s) would make at most {ceiling:.1f}× the "
                    "naive samples/s. The 10× goal needs hardware on which a small step is almost all fixed cost "
                    "(a GPU)."
                )
        out.append(line)
    if speed and "fig1" in speed and "shared_attention" in speed["fig1"]:
        sa = speed["fig1"]["shared_attention"]
        ours = speed["fig1"][sa["dtype"]]["ratio"]
        out.append(
            "- Figure 1: the optimize stage gives each packed text its own positions (from the EOS that starts it), "
            "and transformers then masks attention per text, so that a text is trained as a prompt is served; "
            "the bare loop lets the texts of a block attend to each other. The same stage without the positions "
            f"({sa['dtype']}, same run) made {fmt(sa['tok_s'])} tokens/s, {sa['vs_bare']:.3f} of the bare loop "
            f"against {ours:.3f} with them: the rest of the stage's own cost."
        )
    if speed and "fig5" in speed:
        out.append(
            "- Figure 5: sequential GET /generate (16 new tokens) against a `llmos serve` process training on 3,000 "
            "queued texts; phases of 50 requests alternate trainer busy / paused (admin pause), 6 of each per run, "
            "two runs per variant (alternating), percentiles over both runs."
        )
    if speed and "fig6" in speed:
        out.append(
            "- Figure 6: one generation in flight at a time (serving.max_concurrency 1), streaming 48 tokens after "
            "another, while a thread at the trainer's CPU priority promotes and loads another version (registry "
            "promote, then engine.sync: verify, load the standby, swap the reference) 20 ms apart; windows "
            "without swaps, as long, alternate with the swap windows. Errors count exceptions and answers that "
            "differ from the greedy answer of the version that served them. The second row: another process "
            "promotes, as the trainer process does, and the thread only syncs (the API process's share of a swap)."
        )
    if speed and "fig7" in speed and "defaults" in speed["fig7"]:
        d = speed["fig7"]["defaults"]
        if d["refused_by_gate"]:
            out.append(
                f"- Figure 7 at default settings: {d['refused_by_gate']} of {d['posts']} single posts were refused by "
                "the gate. Each post is trained among 32 replayed texts; the early stop (train.early_stop_patience) "
                "keeps the pass with the lowest loss on its half of the held-out texts, and the gate reads the other "
                "half. A post that no pass helps on the held-out texts keeps "
                "its last pass, and on this 0.56M-parameter model learning it can raise the held-out loss of the "
                "other recent texts past eval.tolerance (2%): the gate refuses it, by design. The before/after table "
                "gives the same defaults with the early stop off (all 40 passes)."
            )
    if speed and "fig8" in speed:
        out.append(
            "- Figure 8: the trainer is paused and rate limits are off, so that the HTTP and store path is what is "
            "measured; the server refuses to start unless SQLite runs WAL with synchronous=FULL (it started), and "
            "every 202 comes after the commit that holds its rows."
        )
    if scaling:
        out.append(
            "- Figure 9: models are random-init GPT-2 shapes with the 257-token byte vocabulary (so 12 layers of width "
            "896 make about GPT-2 small's 124M parameters, which include a 50k-token embedding); figure 1 uses the "
            "dtype llmos picks, few steps for the largest."
        )
    return out


if __name__ == "__main__":
    main()
