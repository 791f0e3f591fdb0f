"""Catastrophic forgetting, measured: learn domain A, then stream domain B through the real
trainer, once per mitigation strategy, and report what each keeps of A and learns of B.

    make bench-forgetting          (or: python bench/forgetting.py --out bench/results)

Everything runs through llmos's own parts (Daemon: store, queue, trainer stages, registry,
serving engine) on the built-in tiny model, CPU, fixed seeds. Domain A is a set of made-up
facts; the model learns it first (phase A, shared by every strategy), and its weights become the
base each strategy starts from, with A's samples in the store as llmos would have them (trained,
in the replay pool; held-out variants in the anchor set). Then domain B, facts of another shape,
streams in batch by batch. After each batch we measure the served model's loss on probe
sentences of A (retention) and of B (plasticity). The probes are never given to llmos: the
held-out variants it keeps (which its gate and early stop read) are other sentences.

Strategies (the gate is opened wide and the early stop is off for these rows, so they differ
only in the mitigation):
  naive   - sequential fine-tuning as the seed document's loop does it: no replay, no regularisation
  replay  - earlier samples mixed into each batch (train: replay.ratio)
  l2sp    - L2 pull toward the weights B started from
  ewc     - the same, weighted by a diagonal Fisher estimated on the anchor set
  lora    - base frozen, a LoRA adapter learns B
  default - llmos's defaults as shipped (replay, the early stop, and the promotion gate on)

Figures: final loss on A and B; forgetting = rise of A's loss during B; BWT (backward transfer)
= A's loss before B minus after (negative = forgetting); B gain = fall of B's loss.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from llmos.daemon import Daemon  # noqa: E402
from llmos.settings import load_settings  # noqa: E402
from llmos.store.queue import NewSample  # noqa: E402
from llmos.store.tables import SampleStatus  # noqa: E402
from llmos.trainer.evaluate import heldout_loss  # noqa: E402
from llmos.trainer.preprocess import PreprocessConfig, eval_batch  # noqa: E402

SEED = 1234
A_FACTS = 24
B_FACTS = 24
VARIANTS = 6  # training sentences per fact; then one held out in llmos's store, then the probe
B_BATCHES = 6

WIDE_OPEN = {
    "eval.heldout_budget": 1e9,
    "eval.forgetting_budget": 1e9,
    "eval.collapse.probe_prompts": [],
    "train.early_stop_patience": 0,
    "feedback.preference": "none",
}
STRATEGIES: dict[str, dict[str, Any]] = {
    "naive": {**WIDE_OPEN, "replay.enabled": False, "regularization.method": "none"},
    "replay": {**WIDE_OPEN, "replay.enabled": True},
    "l2sp": {**WIDE_OPEN, "replay.enabled": False, "regularization.method": "l2sp", "regularization.strength": 0.3},
    "ewc": {**WIDE_OPEN, "replay.enabled": False, "regularization.method": "ewc", "regularization.strength": 0.5},
    "lora": {**WIDE_OPEN, "replay.enabled": False, "train.mode": "lora"},
    # Shipping defaults, with B's own held-out split as in production (the other rows hold out
    # nothing, so that all of B trains and only the probes are unseen).
    "default": {"train.heldout_fraction": 0.1},
}


def make_domains(rng: random.Random) -> tuple[list[list[str]], list[list[str]]]:
    """Facts as lists of sentences: VARIANTS to train on, one that llmos holds out, one probe."""

    def name() -> str:
        return "".join(rng.choice("bcdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3))).title()

    a = []
    for _ in range(A_FACTS):
        country, city = name(), name()
        a.append([f"The capital of {country} is {city} (record {k})." for k in range(VARIANTS + 2)])
    b = []
    for i in range(B_FACTS):
        product, code, fix = name(), rng.randint(100, 999), rng.choice(["reboot", "reseat", "reflash", "reset"])
        b.append(
            [f"Ticket {i}: the {product} shows error {code}, so {fix} it (case {k})." for k in range(VARIANTS + 2)]
        )
    return a, b


@dataclass
class Run:
    name: str
    a_curve: list[float] = field(default_factory=list)
    b_curve: list[float] = field(default_factory=list)
    promoted: int = 0
    rejected: int = 0
    seconds: float = 0.0

    def row(self) -> dict[str, float | int | str]:
        forgetting = self.a_curve[-1] - self.a_curve[0]
        return {
            "strategy": self.name,
            "A before": self.a_curve[0],
            "A after": self.a_curve[-1],
            "B before": self.b_curve[0],
            "B after": self.b_curve[-1],
            "forgetting": forgetting,
            "BWT": -forgetting,
            "B gain": self.b_curve[0] - self.b_curve[-1],
            "promoted": self.promoted,
            "rejected": self.rejected,
            "seconds": self.seconds,
        }


def settings_for(data_dir: Path, base: str, overrides: dict[str, Any]) -> Any:
    common = {
        "data_dir": data_dir,
        "auth.admin_token": "bench",
        "model.name_or_path": base,
        "model.seed": SEED,
        "train.heldout_fraction": 0.0,  # seed_store marks A's held-out sentences itself
        "train.fill_wait_s": 0.0,
        "runtime.torch_threads": 1,
        "runtime.trainer": "thread",  # drain() drives the trainer's cycles in this process
    }
    return load_settings(None, **{**common, **overrides})


def drain(daemon: Daemon) -> None:
    while daemon.queue.depth() > 0:
        daemon.trainer.cycle()


def served_loss(daemon: Daemon, texts: list[str]) -> float:
    batch = eval_batch(texts, daemon.factory.tokenizer, PreprocessConfig(128, 8192, 0.0))
    return heldout_loss(daemon.engine.current().model, batch, daemon.engine.device, 8)


def learn_a(work: Path, a: list[list[str]]) -> Path:
    """Phase A through the trainer (no gate, no replay); returns A's weights as a model directory."""
    daemon = Daemon(settings_for(work / "phase-a", "builtin:tiny", {**WIDE_OPEN, "replay.enabled": False}))
    daemon.start(run_trainer=False)
    train = [s for fact in a for s in fact[:VARIANTS]]
    random.Random(SEED).shuffle(train)
    for _ in range(2):  # two rounds over the domain, as a base model would have seen it repeatedly
        daemon.ingest([NewSample(t) for t in train])
        drain(daemon)
    out = work / "base-A"
    model = daemon.engine.current().model
    model.save_pretrained(out)  # type: ignore[operator]
    daemon.factory.tokenizer.save_pretrained(out)
    daemon.stop()
    return out


def seed_store(daemon: Daemon, a: list[list[str]]) -> None:
    """A's samples as llmos holds them after learning A: trained ones in the replay pool, the
    held-out sentences in the anchor set."""
    train_ids = daemon.queue.enqueue([NewSample(s) for fact in a for s in fact[:VARIANTS]])
    probe_ids = daemon.queue.enqueue([NewSample(fact[VARIANTS]) for fact in a])
    claimed = daemon.queue.claim_batch(len(train_ids) + len(probe_ids), 10**9)
    assert len(claimed) == len(train_ids) + len(probe_ids)
    daemon.queue.ack(train_ids, 0)
    daemon.queue.mark_heldout(probe_ids)
    daemon.replay_pool.offer(train_ids)
    daemon.anchor_pool.offer(probe_ids)
    assert daemon.queue.get(probe_ids[0]).status is SampleStatus.heldout  # type: ignore[union-attr]


def run_strategy(name: str, work: Path, base: Path, a: list[list[str]], b: list[list[str]]) -> Run:
    torch.manual_seed(SEED)
    daemon = Daemon(settings_for(work / name, str(base), STRATEGIES[name]))
    seed_store(daemon, a)
    daemon.start(run_trainer=False)
    a_probe = [fact[VARIANTS + 1] for fact in a]  # never given to llmos
    b_probe = [fact[VARIANTS + 1] for fact in b]
    b_train = [s for fact in b for s in fact[:VARIANTS]]
    random.Random(SEED + 1).shuffle(b_train)
    run = Run(name)
    run.a_curve.append(served_loss(daemon, a_probe))
    run.b_curve.append(served_loss(daemon, b_probe))
    t0 = time.perf_counter()
    size = len(b_train) // B_BATCHES
    for i in range(B_BATCHES):
        # B's probes are never posted; the default row holds out a tenth of B's sentences by hash.
        chunk = b_train[i * size : (i + 1) * size]
        daemon.ingest([NewSample(t) for t in chunk])
        drain(daemon)
        run.a_curve.append(served_loss(daemon, a_probe))
        run.b_curve.append(served_loss(daemon, b_probe))
    run.seconds = time.perf_counter() - t0
    st = daemon.trainer.status()
    run.promoted, run.rejected = st.promotions, st.rejections
    if st.last_eval is not None and not st.last_eval.promote:
        print(f"  {name}: last gate decision: {st.last_eval.reason}", flush=True)
    daemon.stop()
    return run


def write_results(runs: list[Run], out: Path, elapsed: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = [r.row() for r in runs]
    naive = next(r for r in rows if r["strategy"] == "naive")
    from common import commit, cpu_model

    lines = [
        "# Forgetting: domain A learned, then domain B streamed through the trainer",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC at commit {commit()} on {cpu_model()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, CPU, seed {SEED}; whole run {elapsed:.0f} s.",
        "Command: `make bench-forgetting` (python bench/forgetting.py --out bench/results).",
        "",
        f"Losses are mean token cross-entropy on probe sentences llmos never saw ({A_FACTS} facts of A, "
        f"{B_FACTS} of B), measured on the served model; B streamed in {B_BATCHES} batches.",
        "",
        "| strategy | A before | A after | forgetting | BWT | B before | B after | B gain | forgetting vs naive "
        "| B gain vs naive | promoted | rejected | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f_ratio = r["forgetting"] / naive["forgetting"] if naive["forgetting"] else float("nan")  # type: ignore[operator]
        g_ratio = r["B gain"] / naive["B gain"] if naive["B gain"] else float("nan")  # type: ignore[operator]
        lines.append(
            f"| {r['strategy']} | {r['A before']:.3f} | {r['A after']:.3f} | {r['forgetting']:+.3f} | {r['BWT']:+.3f} "
            f"| {r['B before']:.3f} | {r['B after']:.3f} | {r['B gain']:.3f} | {f_ratio:.2f} | {g_ratio:.2f} "
            f"| {r['promoted']} | {r['rejected']} | {r['seconds']:.0f} |"
        )
    default = next(r for r in rows if r["strategy"] == "default")
    f_ratio = default["forgetting"] / naive["forgetting"]  # type: ignore[operator]
    g_ratio = default["B gain"] / naive["B gain"]  # type: ignore[operator]
    verdict = "met" if f_ratio <= 0.5 and g_ratio >= 0.9 else "NOT met"
    lines += [
        "",
        f"Goal (default strategy cuts forgetting of A by at least half against naive, keeping at least 90% of "
        f"naive's gain on B): **{verdict}** — forgetting {f_ratio:.2f}× naive's, B gain {g_ratio:.2f}× naive's.",
    ]
    (out / "forgetting.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "forgetting.json").write_text(
        json.dumps({"rows": rows, "curves": {r.name: {"A": r.a_curve, "B": r.b_curve} for r in runs}}, indent=1),
        encoding="utf-8",
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for r in runs:
        x = list(range(len(r.a_curve)))
        axes[0].plot(x, r.a_curve, marker="o", label=r.name)
        axes[1].plot(x, r.b_curve, marker="o", label=r.name)
    axes[0].set_title("Domain A held-out loss (retention)")
    axes[1].set_title("Domain B held-out loss (plasticity)")
    for ax in axes:
        ax.set_xlabel("B batches trained")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "forgetting.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--only", nargs="*", choices=list(STRATEGIES), help="run only these strategies (and naive)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(SEED)
    a, b = make_domains(rng)
    names = list(STRATEGIES) if not args.only else ["naive", *[n for n in args.only if n != "naive"]]
    if "default" not in names:
        names.append("default")
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="llmos-forgetting-"))
    try:
        base = learn_a(work, a)
        print(f"phase A learned in {time.perf_counter() - t0:.0f}s", flush=True)
        runs = []
        for name in names:
            runs.append(run_strategy(name, work, base, a, b))
            r = runs[-1].row()
            print(
                f"{name:8s} A {r['A before']:.3f}->{r['A after']:.3f}  B {r['B before']:.3f}->{r['B after']:.3f}"
                f"  ({r['seconds']:.0f}s)",
                flush=True,
            )
        write_results(runs, args.out, time.perf_counter() - t0)
        print((args.out / "forgetting.md").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
