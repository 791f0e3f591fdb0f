"""Stage 3 — evaluate: the candidate against the active version on the same data, and the gate.

What each candidate is measured on, next to the active version:
- **taught**: the texts it was trained on since the last checkpoint: their loss, and how many it
  recalls (greedy decoding from a text's prompt gives its answer; llmos/trainer/recall.py). What
  the user sent, learned or not.
- **held-out**: recent texts kept out of training (generalisation to unseen text of the stream).
- **retention**: the anchor set, a reservoir of every held-out text accepted so far plus the
  user's eval file, group by group (a source with enough anchors is a group of its own; the
  others form one group together).
- **preferences**: accuracy on held-out preference pairs (the chosen completion more likely than
  the rejected one).
- **collapse**: how it continues a fixed set of probe prompts (llmos/trainer/collapse.py).

The gate refuses a candidate that harms: a non-finite measure; a collapse (a probe measure past
its bound and worse than the active version's); held-out loss past ``heldout_budget`` times the
active's (more than doubled, by default: the model got worse at text like what it is taught);
any anchor group's loss past ``forgetting_budget``; preference accuracy below the active's by more
than ``preference_tolerance``. A rise in held-out loss within the budget is not harm: the
held-out texts of a stream of facts are other facts, which no training can predict, and learning
the trained ones raises the loss on them (interference). A gate that refused every rise, as
llmos's first did (2% tolerance), refused every version that learned a fact once the first few
were known.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from llmos.trainer.collapse import CollapseConfig, ProbeReport, Probes, collapse_reason, probe
from llmos.trainer.optimize import token_losses
from llmos.trainer.preference import PreferenceSet, preference_accuracy
from llmos.trainer.preprocess import Batch
from llmos.trainer.recall import TextSet, text_scores


@dataclass(frozen=True)
class EvalConfig:
    micro_batch: int
    forgetting_budget: float = 1.0
    heldout_budget: float = 1.0
    preference_tolerance: float = 0.0
    collapse: CollapseConfig | None = None


@dataclass(frozen=True)
class EvalSets:
    """What the candidate is measured on; an empty set is not measured."""

    heldout: Batch = field(default_factory=Batch)
    anchors: Mapping[str, Batch] = field(default_factory=dict)
    taught: TextSet | None = None
    preferences: PreferenceSet | None = None  # held-out preferences
    probes: Probes | None = None


@dataclass(frozen=True)
class Known:
    """Measures of the active version on the same sets, when the trainer has them from before
    (they do not change while the active version does not)."""

    heldout: float | None = None
    anchors: Mapping[str, float] = field(default_factory=dict)
    preference_accuracy: float | None = None
    probe: ProbeReport | None = None


@dataclass(frozen=True)
class EvalReport:
    candidate_loss: float | None  # recent held-out; None when there is no held-out data yet
    active_loss: float | None
    eval_tokens: int
    promote: bool
    reason: str
    anchor_loss: float | None = None  # over the whole anchor set (token-weighted across groups)
    active_anchor_loss: float | None = None
    active_anchor_by_source: dict[str, float] = field(default_factory=dict)
    anchor_by_source: dict[str, float] = field(default_factory=dict)  # the candidate's
    taught_texts: int = 0
    taught_loss: float | None = None
    active_taught_loss: float | None = None
    taught_recall: float | None = None  # fraction of the taught texts recalled
    active_taught_recall: float | None = None
    preference_pairs: int = 0
    preference_accuracy: float | None = None
    active_preference_accuracy: float | None = None
    probe: ProbeReport | None = None
    active_probe: ProbeReport | None = None

    def metrics(self) -> dict[str, float | int | None]:
        probes = self.probe.metrics() if self.probe else {}
        return {
            "heldout_loss": self.candidate_loss,
            "active_heldout_loss": self.active_loss,
            "anchor_loss": self.anchor_loss,
            "active_anchor_loss": self.active_anchor_loss,
            "eval_tokens": self.eval_tokens,
            "taught_texts": self.taught_texts,
            "taught_loss": self.taught_loss,
            "active_taught_loss": self.active_taught_loss,
            "taught_recall": self.taught_recall,
            "active_taught_recall": self.active_taught_recall,
            "preference_pairs": self.preference_pairs,
            "preference_accuracy": self.preference_accuracy,
            "active_preference_accuracy": self.active_preference_accuracy,
            **probes,
        }


@torch.inference_mode()
def heldout_loss(
    model: torch.nn.Module,
    batch: Batch,
    device: torch.device,
    micro_batch: int,
    between: Callable[[], None] | None = None,
) -> float:
    """Mean token loss over every target token of the batch; ``between`` runs before each
    micro-batch (the trainer passes its wait for generations in flight). Measured in fp32: the
    gate compares these, and bf16's rounding is of the size of the differences it judges."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for mb in batch.micro_batches(micro_batch):
            if between is not None:
                between()
            targets = mb.weights[:, 1:] > 0  # weight 0 is padding
            losses = token_losses(model, mb.ids.to(device), mb.positions)  # (B, T)
            total += (losses.double() * targets.to(device)).sum()
            count += int(targets.sum())
    finally:
        model.train(was_training)
    return float(total) / max(count, 1)


class EarlyStop:
    """When to stop passing over a batch: once it is learned (every new text recalled, every
    replayed text that was recalled still recalled, every preference pair's chosen completion the
    more likely), or once ``patience`` passes in a row have neither lowered the batch's loss by
    ``min_gain`` (1%) of the best so far nor raised the count of what it has right: what remains
    cannot be learned from it (noise), or not at this rate. A learned batch keeps its last pass;
    one that is not keeps its best (most items right, then the lowest loss): passes at a constant
    learning rate wander, and the last one can be far from the best (2 of 8 facts recalled after
    a pass that had all 8).

    The first early stop read held-out loss instead, and stopped as soon as learning a batch of
    facts raised the loss on other, unseen facts: at pass 1 or 2, before any fact was learned.
    Watching the loss alone stopped too soon as well: eight corrections on the built-in model sat
    near a loss of 0.13 for five passes while the number recalled still rose (3 of 8 when it stopped)."""

    def __init__(self, patience: int, min_gain: float = 0.01) -> None:
        self.patience = patience
        self.min_gain = min_gain
        self.best_loss = math.inf
        self.best_right = -1
        self.since_best = 0
        self.best: tuple[int, float] = (-1, math.inf)  # the best pass so far: (items right, loss)
        self.is_best = False  # the last pass is the best so far

    def after_pass(self, learned: bool, loss: float, right: int) -> Literal["learned", "stop", "continue"]:
        """After a pass: whether the batch is learned now, its loss, and how many of its items
        (texts recalled, pairs right) it has right."""
        if learned:
            return "learned"
        self.is_best = right > self.best[0] or (right == self.best[0] and loss < self.best[1])
        if self.is_best:
            self.best = (right, loss)
        better = False
        if loss < self.best_loss * (1 - self.min_gain):  # False for nan: no improvement
            self.best_loss, better = loss, True
        if right > self.best_right:
            self.best_right, better = right, True
        self.since_best = 0 if better else self.since_best + 1
        return "stop" if self.patience and self.since_best >= self.patience else "continue"


def _check(name: str, cand: float, act: float, budget: float, knob: str) -> str | None:
    """None when within budget, else the reason."""
    if not math.isfinite(cand):
        return f"{name} loss is {cand}"
    if cand > act * (1 + budget):
        return f"{name} loss {cand:.4f} > active {act:.4f} * (1 + {knob} {budget})"
    return None


def _worse(cand: ProbeReport, act: ProbeReport) -> ProbeReport:
    """The candidate's probe measures, with each one that is no worse than the active version's
    replaced by a value that passes any bound: only a collapse this version causes refuses it."""
    return ProbeReport(
        cand.entropy if cand.entropy < act.entropy else math.inf,
        cand.distinct if cand.distinct < act.distinct else math.inf,
        cand.kl_from_base if cand.kl_from_base > act.kl_from_base else -math.inf,
    )


def evaluate(
    candidate: torch.nn.Module,
    active: torch.nn.Module,
    base: torch.nn.Module | None,
    sets: EvalSets,
    cfg: EvalConfig,
    device: torch.device,
    train_loss: float | None,
    known: Known | None = None,
    between: Callable[[], None] | None = None,
) -> EvalReport:
    """Measure the candidate and the active version, and decide. ``between`` runs before each
    micro-batch of every measure; ``base`` is the model llmos started from (for the KL probe)."""
    known = known or Known()

    def loss(model: torch.nn.Module, batch: Batch) -> float:
        return heldout_loss(model, batch, device, cfg.micro_batch, between)

    cand = act = None
    if len(sets.heldout):
        cand = loss(candidate, sets.heldout)
        act = known.heldout if known.heldout is not None else loss(active, sets.heldout)
    groups = {name: b for name, b in sets.anchors.items() if len(b)}
    per_group = {
        name: (loss(candidate, b), known.anchors[name] if name in known.anchors else loss(active, b))
        for name, b in groups.items()
    }
    a_cand = a_act = None
    if per_group:
        weights = {name: groups[name].n_tokens for name in per_group}
        total = sum(weights.values()) or 1
        a_cand = sum(per_group[n][0] * w for n, w in weights.items()) / total
        a_act = sum(per_group[n][1] * w for n, w in weights.items()) / total
    taught = active_taught = None
    if sets.taught is not None and len(sets.taught):
        taught = text_scores(candidate, sets.taught, device, cfg.micro_batch, between)
        active_taught = text_scores(active, sets.taught, device, cfg.micro_batch, between)
    pref = act_pref = None
    n_pairs = len(sets.preferences.chosen) if sets.preferences is not None else 0
    if sets.preferences is not None and n_pairs:
        pref = preference_accuracy(candidate, sets.preferences, device, cfg.micro_batch, between)
        act_pref = known.preference_accuracy
        if act_pref is None:
            act_pref = preference_accuracy(active, sets.preferences, device, cfg.micro_batch, between)
    cand_probe = act_probe = None
    if sets.probes is not None and cfg.collapse is not None and base is not None:
        n = cfg.collapse.new_tokens
        if between is not None:
            between()
        cand_probe = probe(candidate, base, sets.probes, n, device)
        act_probe = known.probe or probe(active, base, sets.probes, n, device)

    def report(promote: bool, reason: str) -> EvalReport:
        return EvalReport(
            cand,
            act,
            sets.heldout.n_tokens,
            promote,
            reason,
            a_cand,
            a_act,
            {n: v[1] for n, v in per_group.items()},
            {n: v[0] for n, v in per_group.items()},
            len(sets.taught) if sets.taught is not None else 0,
            taught.loss if taught else None,
            active_taught.loss if active_taught else None,
            taught.recall if taught else None,
            active_taught.recall if active_taught else None,
            n_pairs,
            pref,
            act_pref,
            cand_probe,
            act_probe,
        )

    for name, value in (("training", train_loss), ("taught", taught.loss if taught else None)):
        if value is not None and not math.isfinite(value):
            return report(False, f"{name} loss is {value}")
    if cand_probe is not None and act_probe is not None and cfg.collapse is not None:
        why = collapse_reason(_worse(cand_probe, act_probe), cfg.collapse)
        if why:
            return report(False, f"collapse: {why} (active: {_probe_text(act_probe)})")
    if cand is not None and act is not None:
        why = _check("held-out", cand, act, cfg.heldout_budget, "eval.heldout_budget")
        if why:
            return report(False, why)
    for name, (g_cand, g_act) in per_group.items():
        label = "anchor" if len(per_group) == 1 else f"anchor ({name})"
        why = _check(label, g_cand, g_act, cfg.forgetting_budget, "eval.forgetting_budget")
        if why:
            return report(False, why)
    if pref is not None and act_pref is not None and pref < act_pref - cfg.preference_tolerance:
        return report(
            False,
            f"preference accuracy {pref:.3f} < active {act_pref:.3f} - eval.preference_tolerance "
            f"{cfg.preference_tolerance} on {n_pairs} held-out pair(s)",
        )
    parts = []
    if taught is not None and active_taught is not None:
        n = len(taught.recalled)
        parts.append(
            f"recalls {sum(taught.recalled)}/{n} taught texts (active {sum(active_taught.recalled)}/{n}), "
            f"their loss {taught.loss:.4f} (active {active_taught.loss:.4f})"
        )
    if cand is not None:
        parts.append(f"held-out {cand:.4f} (active {act:.4f})")
    if a_cand is not None:
        parts.append(f"anchor {a_cand:.4f} (active {a_act:.4f}) over {len(per_group)} group(s)")
    if pref is not None:
        parts.append(f"preference accuracy {pref:.3f} (active {act_pref:.3f})")
    return report(True, ", ".join(parts) if parts else "training loss finite")


def _probe_text(p: ProbeReport) -> str:
    return f"entropy {p.entropy:.3f}, distinct {p.distinct:.3f}, KL {p.kl_from_base:.3f}"
