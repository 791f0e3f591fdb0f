"""What llmos learns of what its users teach, per strategy: facts posted until learned, corrections,
the answers it should not change meanwhile, a second domain streamed in after, and preferences.

    make bench-teach           (or: python bench/teach.py --out bench/results --baseline d2922fd)

Everything runs through llmos's own parts (Daemon: store, queue, trainer stages, registry, serving
engine), the trainer driven cycle by cycle in this process, on the CPU, with fixed seeds. Every
strategy starts from the same base: the built-in tiny model first trained on a generic corpus
(phase 0), as a deployment starts from a pretrained model (LoRA needs one). Then, per strategy:

1. facts: 8 made-up facts ("The capital of <name> is <name>."), each posted 12 times in one
   request; the same request again. Recall after each posting: greedy decoding from a fact's
   first words gives the rest.
2. corrections: 10 questions the model has never seen; each served answer gets a thumbs down and a
   correction (POST /v1/feedback does the same). Adopted: greedy decoding now gives the correction.
   Unrelated answers changed: how many greedy answers differ from before the corrections, on the
   first domain's facts (taught to llmos before, so in its replay pool), and on prompts of the base
   corpus (what the base model knew, which llmos never saw): 24 with one right answer in the
   corpus, and 12 with six (each seen once, so the base's pick among them is a near tie that the
   base's own training decides). For these, what a user notices is a right answer turned wrong, so
   that is counted too (right before any teaching, wrong after the corrections); and a control
   says how arbitrary the pick is: a second base, trained alike from another seed, gives another
   of the right answers to a share of them (and should agree on the single-answer ones). And how
   many of the corpus prompts the model answers right, before any teaching, after the corrections
   and at the end.
3. preferences: accuracy on the corrections' pairs (the correction more likely than the answer it
   replaced), before and after.
4. a second domain: 8 facts of another shape ("Ticket <n>: the <name> printer needs part <name>."),
   12 copies each, streamed in four requests. Forgetting: the rise of the served model's loss on
   the first domain's facts; and how many of them it still recalls.

Strategies (the non-default rows make every pass, open the gate and train no preference loss, so
that they differ only in the mitigation against forgetting):
  naive        sequential fine-tuning: no replay, no regularisation
  replay       earlier texts mixed into every batch (replay.ratio), no base rehearsal
  regularized  L2-SP pull toward the served weights
  lora         base frozen, a LoRA adapter learns
  default      llmos's defaults as shipped (replay, base rehearsal, the early stop, the gate, DPO)
  default, no base rehearsal   the same without texts sampled from the base in each batch
  default (built-in) the defaults on the built-in model from random weights, as `make run` starts
  before       with --baseline COMMIT: the defaults of that commit (the code before this design)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from llmos.daemon import Daemon  # noqa: E402
from llmos.serving.types import SamplingParams  # noqa: E402
from llmos.settings import load_settings  # noqa: E402
from llmos.store.queue import NewSample  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEED = 2026
OPEN = {
    "eval.heldout_budget": 1e9,
    "eval.forgetting_budget": 1e9,
    "eval.collapse.probe_prompts": [],
    "train.early_stop_patience": 0,
    "feedback.preference": "none",
}
STRATEGIES: dict[str, dict[str, Any]] = {
    "naive": {**OPEN, "replay.enabled": False},
    "replay": {**OPEN, "replay.enabled": True, "replay.base_rehearsal": "off"},
    "regularized": {**OPEN, "replay.enabled": False, "regularization.method": "l2sp", "regularization.strength": 0.1},
    "lora": {**OPEN, "replay.enabled": False, "train.mode": "lora"},
    "default": {},
    "default, no base rehearsal": {"replay.base_rehearsal": "off"},
    "default (built-in)": {},
}
Pair = tuple[str, str]  # (prompt, answer)


# ---- the data ------------------------------------------------------------------------------------
def names(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice("bcdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3))).title()
        if word not in out:
            out.append(word)
    return out


def data() -> dict[str, list[Pair]]:
    rng = random.Random(SEED)
    n = names(rng, 60)
    who = ["the clerk", "a farmer", "my aunt", "the pilot", "our cook", "the mayor"]
    did = ["painted", "sold", "found", "fixed", "carried", "counted"]
    what = ["a red boat", "two lamps", "the old map", "nine eggs", "a green door", "the tall chair"]
    when = ["on Monday", "at dawn", "in May", "after lunch", "before the rain", "at night"]
    corpus = [(f"{a} {b} {c}", f" {d}.") for a in who for b in did for c in what for d in when[:1]]
    corpus += [(f"{a} {b} {c}", f" {d}.") for a in who for b in did[:2] for c in what[:3] for d in when[1:]]
    rng.shuffle(corpus)
    return {
        "corpus": corpus,
        "facts_a": [(f"The capital of {n[i]}", f" is {n[8 + i]}.") for i in range(8)],
        "facts_b": [(f"Ticket {100 + i}: the {n[16 + i]} printer", f" needs part {n[24 + i]}.") for i in range(8)],
        "questions": [
            (f"Q: What is the code for {n[32 + i]}? A:", f" code {rng.randint(100, 999)}.") for i in range(10)
        ],
    }


# ---- llmos, driven cycle by cycle ----------------------------------------------------------------
def daemon(data_dir: Path, base: str, overrides: dict[str, Any]) -> Daemon:
    common = {
        "data_dir": data_dir,
        "auth.admin_token": "bench-admin-token",
        "model.name_or_path": base,
        "train.fill_wait_s": 0.0,
        "runtime.trainer": "thread",  # the trainer's cycles run in this process
        "runtime.torch_threads": 1,
    }
    d = Daemon(load_settings(None, **{**common, **overrides}))
    d.start(run_trainer=False)
    return d


def drain(d: Daemon) -> None:
    while d.trainer.cycle():
        pass


def greedy(d: Daemon, prompt: str, tokens: int) -> str:
    return d.engine.generate(prompt, SamplingParams(max_new_tokens=tokens)).text


def recalled(d: Daemon, pairs: list[Pair]) -> int:
    return sum(greedy(d, p, len(a.encode())) == a for p, a in pairs)


def answers(corpus: list[Pair]) -> dict[str, set[str]]:
    """Every right answer of each corpus prompt: 180 prompts have one, 36 have six."""
    out: dict[str, set[str]] = {}
    for p, a in corpus:
        out.setdefault(p, set()).add(a)
    return out


SINGLE, SEVERAL = 24, 12  # base corpus prompts measured, with one right answer and with six


def measured(corpus: list[Pair]) -> tuple[list[str], list[str]]:
    """The base corpus prompts whose answers are measured, in the corpus's (shuffled) order:
    ``SINGLE`` with one right answer, ``SEVERAL`` with six."""
    known, seen = answers(corpus), list(dict.fromkeys(p for p, _ in corpus))
    single = [p for p in seen if len(known[p]) == 1][:SINGLE]
    several = [p for p in seen if len(known[p]) > 1][:SEVERAL]
    return single, several


def right(d: Daemon, prompts: list[str], known: dict[str, set[str]]) -> list[bool]:
    """Whether the greedy answer to each prompt is one of its right answers."""
    return [any(greedy(d, p, 16).startswith(a) for a in known[p]) for p in prompts]


@torch.inference_mode()
def logps(d: Daemon, pairs: list[Pair]) -> list[float]:
    """Each answer's summed log-probability given its prompt (EOS first, as served), and the
    text's mean token loss is its negative over the answer's length: what serving would see."""
    model, tok = d.engine.current().model, d.factory.tokenizer
    out = []
    for prompt, answer in pairs:
        p = tok.encode(prompt, add_special_tokens=False)
        a = tok.encode(answer, add_special_tokens=False)
        ids = torch.tensor([[tok.eos_token_id, *p, *a]])
        lp = model(input_ids=ids[:, :-1]).logits.float().log_softmax(-1)[0]
        out.append(float(sum(lp[len(p) + i, t] for i, t in enumerate(a))))
    return out


def text_loss(d: Daemon, texts: list[str]) -> float:
    """Mean token loss of whole texts (EOS first), on the served model."""
    return -sum(logps(d, [("", t) for t in texts])) / sum(len(t.encode()) for t in texts)


def post(d: Daemon, texts: list[str]) -> None:
    d.ingest([NewSample(t) for t in texts])
    drain(d)


def run(name: str, base: Path, data_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(SEED)
    d = daemon(data_dir, "builtin:tiny" if name == "default (built-in)" else str(base), overrides)
    D = data()
    a, b, qs = D["facts_a"], D["facts_b"], D["questions"]
    known = answers(D["corpus"])
    single, several = measured(D["corpus"])
    prompts = single + several
    right_start = right(d, prompts, known)
    row: dict[str, Any] = {"strategy": name, "facts": [], "corpus_recall_start": sum(right_start)}
    for _ in range(2):
        post(d, [p + ans for p, ans in a for _ in range(12)])
        row["facts"].append(recalled(d, a))
    unrelated = [greedy(d, p, 16) for p in [p for p, _ in a] + prompts]
    served = []
    for prompt, _answer in qs:
        g = d.generate(prompt, SamplingParams(max_new_tokens=12))
        served.append(g.completion.text)
        d.feedback(g.generation_id, -1.0, _answer)
    pairs_chosen = logps(d, qs)
    pairs_rejected = logps(d, [(p, s) for (p, _a), s in zip(qs, served, strict=True)])
    row["preference_before"] = sum(c > r for c, r in zip(pairs_chosen, pairs_rejected, strict=True)) / len(qs)
    drain(d)
    row["corrections"] = recalled(d, qs) / len(qs)
    after = [greedy(d, p, 16) for p in [p for p, _ in a] + prompts]
    changed = [x != y for x, y in zip(unrelated, after, strict=True)]
    known_changed = changed[len(a) :]  # what the base model knew: single, then several
    row["unrelated_changed"] = sum(changed[: len(a)]) / len(a)  # the facts taught before
    row["base_single_changed"] = sum(known_changed[: len(single)]) / len(single)
    row["base_several_changed"] = sum(known_changed[len(single) :]) / len(several)
    right_now = right(d, prompts, known)
    row["base_several_wrong"] = (
        sum(  # right before any teaching, wrong after the corrections
            was and not now for was, now in list(zip(right_start, right_now, strict=True))[len(single) :]
        )
        / len(several)
    )
    row["corpus_recall_mid"] = sum(right_now)
    pairs_chosen = logps(d, qs)
    pairs_rejected = logps(d, [(p, s) for (p, _a), s in zip(qs, served, strict=True)])
    row["preference_after"] = sum(c > r for c, r in zip(pairs_chosen, pairs_rejected, strict=True)) / len(qs)
    a_texts = [p + ans for p, ans in a]
    row["a_loss_before_b"] = text_loss(d, a_texts)
    for _ in range(4):
        post(d, [p + ans for p, ans in b for _ in range(3)])
    row["a_loss_after_b"] = text_loss(d, a_texts)
    row["forgetting"] = row["a_loss_after_b"] - row["a_loss_before_b"]
    row["facts_after_b"] = recalled(d, a)
    row["facts_b"] = recalled(d, b)
    row["corrections_after_b"] = recalled(d, qs) / len(qs)
    row["corpus_recall_end"] = sum(right(d, prompts, known))
    status = d.trainer.status()
    row["promoted"], row["rejected"] = status.promotions, status.rejections
    row["seconds"] = time.perf_counter() - t0
    d.stop()
    return row


def pretrain(work: Path, seed: int = 0) -> tuple[Path, list[str]]:
    """Phase 0: the built-in model (initialised and trained with ``seed``) trained on the generic
    corpus, saved as a model directory; and its greedy answers to the measured corpus prompts."""
    overrides = {**OPEN, "replay.enabled": False, "train.passes_per_batch": 12, "model.seed": seed}
    d = daemon(work / f"phase-0-{seed}", "builtin:tiny", overrides)
    corpus = data()["corpus"]
    for _ in range(3):
        post(d, [p + a for p, a in corpus])
    out = work / f"base-{seed}"
    model = d.engine.current().model
    model.save_pretrained(out)  # type: ignore[operator]
    d.factory.tokenizer.save_pretrained(out)
    single, several = measured(corpus)
    said = [greedy(d, p, 16) for p in single + several]
    d.stop()
    return out, said


def control(work: Path, said: list[str]) -> dict[str, Any]:
    """How arbitrary a base's answers are: a second base, trained as the first from another seed,
    against the first's answers (``said``), on the single-answer prompts and on the near ties."""
    _, other = pretrain(work, seed=1)
    differ = [x != y for x, y in zip(said, other, strict=True)]
    return {"single_differ": sum(differ[:SINGLE]) / SINGLE, "several_differ": sum(differ[SINGLE:]) / SEVERAL}


# ---- the report ----------------------------------------------------------------------------------
def write(rows: list[dict[str, Any]], ctl: dict[str, Any], out: Path, elapsed: float, baseline: str | None) -> None:
    from common import commit, machine

    out.mkdir(parents=True, exist_ok=True)
    m = machine()
    naive = next(r for r in rows if r["strategy"] == "naive")
    default = next(r for r in rows if r["strategy"] == "default")
    flag = f" --baseline {baseline}" if baseline else ""
    lines = [
        "# Teaching: facts, corrections, unrelated answers, a second domain, preferences",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC at commit {commit()} on {m['cpu']} "
        f"({m['cores']} cores, {m['cpu_features']}), torch {m['torch']}, CPU, seed {SEED}; whole run {elapsed:.0f} s.",
        f"Command: `make bench-teach` (python bench/teach.py --out bench/results{flag}).",
        "",
        "Every strategy starts from the same base (the built-in tiny model trained on a generic corpus) except "
        "`default (built-in)`, which starts from the built-in model's random weights. See bench/teach.py for the "
        "protocol.",
        "",
        f"Unrelated answers changed (greedy, 16 tokens, before the corrections against after them): *taught*, "
        f"the 8 facts of the first domain; *base 1*, {SINGLE} prompts of the base's corpus with one right answer "
        f"there; *base 6*, {SEVERAL} with six (each seen once in the corpus, so the base's pick among them is a "
        "near tie). *Base 6 made wrong*: of those, answers right before any teaching and wrong after the corrections. "
        f"*Base corpus right*: of the {SINGLE + SEVERAL}, prompts answered with one of their right answers, at "
        "the start → after the corrections → at the end.",
        "",
        f"Control, how arbitrary a base's pick is: a second base, trained as the first from another seed (the "
        f"built-in model's initialisation and the trainer's shuffling), gives another answer than the first to "
        f"{ctl['several_differ']:.0%} of the base 6 prompts and {ctl['single_differ']:.0%} of the base 1 prompts.",
        "",
        "| strategy | facts recalled, posting 1 / 2 | corrections adopted | unrelated answers changed: taught "
        "/ base 1 / base 6 | base 6 made wrong | preference accuracy before → after "
        "| forgetting of the facts (loss rise) | vs naive "
        "| facts kept after domain 2 | domain 2 learned | corrections kept | base corpus right "
        "| promoted / refused | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["forgetting"] / naive["forgetting"] if naive["forgetting"] > 0 else float("nan")
        lines.append(
            f"| {r['strategy']} | {r['facts'][0]}/8 / {r['facts'][1]}/8 | {r['corrections']:.0%} "
            f"| {r['unrelated_changed']:.0%} / {r['base_single_changed']:.0%} / {r['base_several_changed']:.0%} "
            f"| {r['base_several_wrong']:.0%} "
            f"| {r['preference_before']:.0%} → {r['preference_after']:.0%} "
            f"| {r['forgetting']:+.3f} | {ratio:.2f}× | {r['facts_after_b']}/8 | {r['facts_b']}/8 "
            f"| {r['corrections_after_b']:.0%} | {r['corpus_recall_start']} → "
            f"{r['corpus_recall_mid']} → {r['corpus_recall_end']} of {SINGLE + SEVERAL} "
            f"| {r['promoted']} / {r['rejected']} | {r['seconds']:.0f} |"
        )
    f_ratio = default["forgetting"] / naive["forgetting"] if naive["forgetting"] > 0 else float("nan")
    goals = [
        ("facts ≥ 7/8 after two postings", default["facts"][1] >= 7, f"{default['facts'][1]}/8"),
        ("≥ 90% of corrections adopted", default["corrections"] >= 0.9, f"{default['corrections']:.0%}"),
        (
            "≤ 5% of unrelated answers changed: the facts taught before",
            default["unrelated_changed"] <= 0.05,
            f"{default['unrelated_changed']:.0%}",
        ),
        (
            "≤ 5% of unrelated answers changed: the base corpus's prompts with one right answer",
            default["base_single_changed"] <= 0.05,
            f"{default['base_single_changed']:.0%} of {SINGLE}",
        ),
        (
            "≤ 5% of unrelated answers made wrong: the base corpus's prompts with six right answers",
            default["base_several_wrong"] <= 0.05,
            f"{default['base_several_wrong']:.0%} of {SEVERAL}; another right answer instead of the base's pick: "
            f"{default['base_several_changed']:.0%}, against {ctl['several_differ']:.0%} between two bases trained "
            "alike",
        ),
        ("forgetting ≤ 0.1× naive's", f_ratio <= 0.1, f"{f_ratio:.2f}×"),
    ]
    lines += ["", "Goals for the default:", ""]
    lines += [f"- {goal}: **{'met' if ok else 'NOT met'}** ({value})" for goal, ok, value in goals]
    (out / "teach.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "teach.json").write_text(
        json.dumps({"commit": commit(), "machine": m, "control": ctl, "rows": rows}, indent=1), encoding="utf-8"
    )
    plot(rows, out / "teach.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written", file=sys.stderr)
        return
    names_ = [r["strategy"] for r in rows]
    panels = [
        ("facts recalled after 2 postings (of 8)", [r["facts"][1] for r in rows]),
        ("corrections adopted", [r["corrections"] for r in rows]),
        ("answers to earlier facts changed", [r["unrelated_changed"] for r in rows]),
        ("forgetting of the facts (loss rise)", [r["forgetting"] for r in rows]),
        ("facts kept after domain 2 (of 8)", [r["facts_after_b"] for r in rows]),
        ("preference accuracy after", [r["preference_after"] for r in rows]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (title, values) in zip(axes.flat, panels, strict=True):
        ax.bar(range(len(values)), values, color="#4c72b0")
        ax.set_xticks(range(len(values)), names_, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--only", nargs="*", choices=list(STRATEGIES), help="run only these (naive and default too)")
    parser.add_argument("--baseline", help="also run the defaults of this commit (git archive), as 'before'")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one strategy, then --result
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.worker:  # a run in another checkout's llmos (PYTHONPATH), reported as JSON
        row = run(args.worker, args.base, args.result.parent / "data", {})
        args.result.write_text(json.dumps(row), encoding="utf-8")
        return
    chosen = list(STRATEGIES) if not args.only else list(dict.fromkeys(["naive", *args.only, "default"]))
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="llmos-teach-"))
    try:
        base, said = pretrain(work)
        print(f"phase 0 (base) trained in {time.perf_counter() - t0:.0f}s", flush=True)
        ctl = control(work, said)
        print(f"control (a second base): {json.dumps(ctl)}", flush=True)
        rows = []
        for name in chosen:
            rows.append(run(name, base, work / name.replace(" ", "-"), STRATEGIES[name]))
            print(json.dumps(rows[-1]), flush=True)
        if args.baseline:
            rows.append(baseline_row(args.baseline, base, work))
            print(json.dumps(rows[-1]), flush=True)
        write(rows, ctl, args.out, time.perf_counter() - t0, args.baseline)
        print((args.out / "teach.md").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def baseline_row(rev: str, base: Path, work: Path) -> dict[str, Any]:
    """The default strategy with the llmos of ``rev``: this script in a subprocess whose llmos is
    that commit's (git archive), on the same base model."""
    tree = work / "baseline"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    result = work / "baseline-run" / "row.json"
    result.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "default",
        "--base",
        str(base),
        "--result",
        str(result),
    ]
    subprocess.run(cmd, env=env, check=True, cwd=tree)
    row = json.loads(result.read_text(encoding="utf-8"))
    row["strategy"] = f"before ({rev})"
    return dict(row)


if __name__ == "__main__":
    main()
