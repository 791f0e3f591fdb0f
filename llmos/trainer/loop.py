"""The online trainer: a background thread that drains the queue through five stages.

    claim -> preprocess -> optimize (passes over the batch) -> evaluate -> checkpoint -> hot-swap

Samples claimed since the last checkpoint are "pending": they stay in ``training`` until a
checkpoint settles them (trained in that version, or rejected by the gate). Whenever the trainer
stops, is reset by a rollback or fails, pending samples go back to the queue and the training
state is reloaded from the active version, so serving and training never drift apart.

One trainer per store: the trainer trains only while it holds the store's trainer lease
(llmos/trainer/leader.py); another waits as a standby. Every write it makes carries the lease's
token, so one that lost the lease (paused past it, say) claims, checkpoints and promotes nothing;
it drops its work in hand, which its successor returned to the queue, and waits as a standby.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import random
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from llmos.memory import trim
from llmos.model.loader import ModelFactory
from llmos.registry.registry import Registry
from llmos.serving.engine import Loaded
from llmos.store.lease import LeaseLost, TrainerLease
from llmos.store.lineage import TextKind
from llmos.store.preferences import Preference, PreferenceQueue
from llmos.store.queue import Sample, SampleQueue
from llmos.store.reservoir import Reservoir
from llmos.text import text_hash
from llmos.trainer.checkpoint import checkpoint
from llmos.trainer.collapse import ProbeReport, probes
from llmos.trainer.distributed import ShardedSender, StepSender
from llmos.trainer.evaluate import EarlyStop, EvalConfig, EvalReport, EvalSets, Known, evaluate
from llmos.trainer.leader import Leader
from llmos.trainer.optimize import Penalty, PreferenceConfig, optimize, optimize_preferences
from llmos.trainer.preference import PreferenceSet, preference_accuracy, preference_set, reference
from llmos.trainer.preprocess import (
    Batch,
    PreprocessConfig,
    eval_batch,
    heldout_by_hash,
    preprocess,
    preprocess_preferences,
)
from llmos.trainer.recall import TextSet, text_scores, text_set
from llmos.trainer.regularize import RegularizationConfig, make_penalty
from llmos.trainer.rehearsal import BasePool, RehearsalConfig
from llmos.trainer.state import Mark, OptimizerConfig, TrainingState, load_state
from llmos.trainer.swap import swap

log = logging.getLogger(__name__)


class Serving(Protocol):
    """What the trainer asks of serving: the engine, in one process (llmos/serving/engine.py), or
    the trainer process's view of the API process (llmos/trainer/process.py)."""

    @property
    def in_flight(self) -> int: ...  # generations in flight: the trainer yields to them

    def wait_idle(self, timeout_s: float) -> bool: ...

    def quiet(self, quiet_s: float) -> bool: ...

    def current(self) -> Loaded: ...  # the active version's model: what the gate compares with

    def sync(self) -> int: ...  # serve the registry's active version (stage 5)


class TrainerPhase(enum.StrEnum):
    idle = "idle"
    training = "training"
    paused = "paused"
    error = "error"
    standby = "standby"  # another trainer holds this store's trainer lease
    remote = "remote"  # an API replica's view: a trainer in another process holds the lease


@dataclass(frozen=True)
class TrainerConfig:
    preprocess: PreprocessConfig
    optimizer: OptimizerConfig
    eval: EvalConfig
    micro_batch: int
    passes_per_batch: int  # at most; fewer when the early stop says so
    batch_tokens: int
    batch_max_samples: int
    fill_wait_s: float  # the longest wait for a burst of posts to arrive before claiming
    poll_interval_s: float
    evaluate_every_steps: int
    evaluate_every_s: float
    eval_max_samples: int
    error_backoff_s: float
    bf16: bool
    seed: int
    grad_accum_steps: int = 1
    replay_ratio: float = 0.0  # 0 = no replay
    replay_min: int = 0  # at least this many replayed samples per batch (when replay is on)
    max_per_source: int | None = None  # most samples one source may fill in a batch
    lease_s: float = 300.0  # claims not renewed for this long go back to the queue
    trainer_lease_s: float = 30.0  # the trainer lease, not renewed for this long, passes to a standby
    yield_to_requests_s: float = 0.0  # longest wait between steps while generations run (0 = none)
    threads_busy: int = 0  # torch threads for steps while generations come (0: leave them be)
    threads_idle: int = 0  # ...and once none came for threads_quiet_s (see llmos/threads.py)
    threads_quiet_s: float = 1.0
    nice: int = 0  # CPU priority of the trainer thread below serving's (Linux; 0 = equal)
    regularization: RegularizationConfig = RegularizationConfig()
    anchor_texts: tuple[str, ...] = ()  # the user's eval file, always in the anchor set
    early_stop_patience: int = 0  # passes without the batch's loss falling 1% before stopping (0 = off)
    prequential_decay: float = 0.9  # running average: new = decay * old + (1 - decay) * batch
    fill_quiet_s: float = 0.0  # ...which ends once nothing arrived for this long (0: wait fill_wait_s)
    preference: PreferenceConfig | None = None  # None: preferences do not train
    preference_batch: int = 32  # most preferences claimed per batch
    min_source_anchors: int = 8  # a source with fewer anchors is checked in one group with the others
    rehearsal: RehearsalConfig | None = None  # texts sampled from the base, in every batch (None: off)


@dataclass(frozen=True)
class TrainerStatus:
    state: TrainerPhase
    step: int
    last_loss: float | None
    device: str
    last_error: str | None
    prequential_loss: float | None = None
    tokens_trained: int = 0  # since this process started
    promotions: int = 0
    rejections: int = 0
    last_eval: EvalReport | None = None
    reloading: bool = False  # a rollback was asked for and the trainer has not yet reloaded


class _Interrupted(Exception):
    """Raised between steps when the trainer must stop or go back to the active version."""


class Trainer:
    def __init__(
        self,
        cfg: TrainerConfig,
        queue: SampleQueue,
        registry: Registry,
        serving: Serving,
        factory: ModelFactory,
        replay_pool: Reservoir,
        anchor_pool: Reservoir,
        lease: TrainerLease,
        preferences: PreferenceQueue | None = None,
    ) -> None:
        self.cfg = cfg
        self.queue = queue
        self.registry = registry
        self.serving = serving
        self.factory = factory
        self.replay_pool = replay_pool  # trained samples, mixed into new batches
        self.anchor_pool = anchor_pool  # held-out samples, the retention measure
        self._base_pool = BasePool(cfg.rehearsal) if cfg.rehearsal is not None else None  # what the base knew
        self.preferences = preferences if cfg.preference is not None else None
        self._preference_rows = preferences  # trained or not: a new term returns those left in training
        self._leader = Leader(lease, cfg.trainer_lease_s)
        self.sender: StepSender | ShardedSender | None = None  # under torchrun: steps taken with the other ranks
        self.device = factory.device
        self._stop = threading.Event()
        self._wake = threading.Event()
        # Set by wake() as posts arrive, and by stop, pause and reset: what the fill wait watches.
        self._arrived = threading.Event()
        self._resume = threading.Event()
        self._resume.set()
        self._reset = threading.Event()
        # Rollbacks asked for, and how many of them the state now reflects (see status().reloading).
        self._resets_asked = self._resets_done = 0
        self._thread: threading.Thread | None = None
        self._phase = TrainerPhase.idle
        self._last_error: str | None = None
        self._state: TrainingState | None = None
        self._penalty: Penalty | None = None
        # Work in hand. Pending: trained since the last checkpoint, still in `training` until a
        # checkpoint settles them (trained in that version, or rejected by the gate).
        self._pending: list[str] = []
        self._claimed: list[str] = []  # the batch in hand
        self._pending_heldout: list[str] = []  # held out from pending batches, not yet anchors
        self._taught: dict[str, Sample] = {}  # pending texts by text hash: what the gate's recall reads
        self._replayed: dict[str, None] = {}  # ids replayed into pending batches, in order (lineage)
        self._pending_prefs: list[str] = []
        self._claimed_prefs: list[str] = []
        self._pending_pref_heldout: list[str] = []
        self._steps_since_eval = self._passes_since_eval = 0
        self._last_eval_t = time.monotonic()
        self._sets: dict[str, tuple[tuple[str, ...], Batch]] = {}  # eval sets by name, keyed by member ids
        self._pref_set: tuple[tuple[str, ...], PreferenceSet] | None = None  # held-out preferences
        self._known: dict[tuple[str, int, tuple[str, ...]], float] = {}  # the active version's measures
        self._known_probe: tuple[int, ProbeReport] | None = None
        # The ids of the held-out, anchor (by group) and preference sets the last evaluation read.
        self._measured: tuple[tuple[str, ...], dict[str, tuple[str, ...]], tuple[str, ...]] = ((), {}, ())
        collapse = cfg.eval.collapse
        self._probes = probes(collapse.prompts, factory.tokenizer) if collapse and collapse.prompts else None
        self._tokens_trained = 0
        self._last_renew = time.monotonic()
        self._promotions = 0
        self._rejections = 0
        self._last_eval: EvalReport | None = None

    # ---- control (any thread) ---------------------------------------------------------------
    def load_active(self) -> None:
        """Load the training state of the active version (start does this; so may a caller that
        drives ``cycle()`` itself, as the benchmarks do)."""
        self._load(self.registry.active_version())

    def start(self) -> None:
        self.load_active()
        self._thread = threading.Thread(target=self._run, name="llmos-trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to finish its step, release what it claimed and exit."""
        self._stop.set()
        self._resume.set()
        self._wake.set()
        self._arrived.set()  # ends a fill wait
        if self._thread is not None:
            self._thread.join(timeout)
        else:  # driven by cycle(): what it claimed goes back when the next trainer takes the lease
            self._leader.release()

    def wake(self) -> None:
        """New data arrived: look at the queue now instead of at the next poll."""
        self._arrived.set()
        self._wake.set()

    def pause(self) -> None:
        self._resume.clear()
        self._arrived.set()  # ends a fill wait

    def resume(self) -> None:
        self._resume.set()
        self._wake.set()

    def request_reset(self) -> None:
        """The active version changed under us (rollback): drop the work in hand and reload."""
        self._resets_asked += 1
        self._reset.set()
        self._wake.set()
        self._arrived.set()  # ends a fill wait

    def status(self) -> TrainerStatus:
        st = self._state
        phase = TrainerPhase.paused if not self._resume.is_set() else self._phase
        return TrainerStatus(
            state=phase,
            step=st.step if st else 0,
            last_loss=st.last_loss if st else None,
            device=str(self.device),
            last_error=self._last_error,
            prequential_loss=st.prequential_loss if st else None,
            tokens_trained=self._tokens_trained,
            promotions=self._promotions,
            rejections=self._rejections,
            last_eval=self._last_eval,
            reloading=self._resets_done < self._resets_asked,
        )

    @property
    def base_version(self) -> int | None:
        """The version the training state's weights descend from (None before it is loaded)."""
        st = self._state
        return st.base_version if st is not None else None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        if self.cfg.nice > 0 and sys.platform == "linux":
            # Linux nices threads one by one: this lowers the trainer alone, so that a generation
            # competing with it for a core (or with a neighbour's process) gets the larger share.
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.cfg.nice)
            except OSError as exc:
                log.warning("could not lower the trainer's CPU priority: %s", exc)
        while not self._stop.is_set():
            try:
                if not self._lead():  # a standby: another trainer has the store
                    self._stop.wait(min(1.0, self.cfg.trainer_lease_s / 3))
                    continue
                self._step_boundary()
                worked = self.cycle()
                self._phase = TrainerPhase.idle if self._leader.held else TrainerPhase.standby
                self._last_error = None
                if worked:
                    trim()  # a cycle's tensors are gone: give their pages back (llmos/memory.py)
                if not worked:
                    self._wake.wait(self.cfg.poll_interval_s)
                    self._wake.clear()
            except LeaseLost:  # (from a step boundary; cycle() stands down itself)
                self._stand_down()
            except _Interrupted:
                if self._stop.is_set():
                    break
                self._recover()
            except Exception as exc:  # a daemon keeps going: report, go back, retry later
                log.exception("trainer cycle failed")
                self._phase = TrainerPhase.error
                self._last_error = f"{type(exc).__name__}: {exc}"
                if self._recover():  # (a failed go-back has waited already)
                    self._stop.wait(self.cfg.error_backoff_s)
        self._release()
        self._leader.release()  # a standby takes over now, not once the lease runs out

    def cycle(self) -> bool:
        """One unit of work. Returns False when there was nothing to do, or when another trainer
        holds the store (a standby does nothing)."""
        try:
            if not self._lead():
                return False
            return self._cycle()
        except LeaseLost:
            self._stand_down()
            return True

    def _cycle(self) -> bool:
        fence = self._leader.token
        samples, prefs = self._claim()
        if not samples and not prefs:
            self._renew_lease()  # idle: work pending a later evaluation keeps its lease
            if (self._pending or self._pending_prefs) and self._due():
                self._settle()
            return False
        self._phase = TrainerPhase.training
        replay = self._draw_replay(len(samples) + len(prefs))
        # Texts sent more than once train, whatever their hash says: find the repeats.
        maybe_held = [d for d in (s.text_hash or text_hash(s.text) for s in samples) if self._held(d)]
        repeated = self.queue.repeated(maybe_held) if maybe_held else set()
        pre = preprocess(
            samples, self.factory.tokenizer, self.cfg.preprocess, replay, repeated
        )  # 1. clean, hold out, pack
        self.queue.mark_heldout(pre.heldout, fence)
        self._pending_heldout += pre.heldout  # joins the anchor set once its batch is accepted
        self.queue.reject(pre.rejected, fence)
        if pre.rescued:  # their text trains now: earlier held-out copies of it train too
            self.queue.requeue_heldout(pre.rescued, fence)
        pp = preprocess_preferences(prefs, self.factory.tokenizer, self.cfg.preprocess, self.factory.context_length)
        if self.preferences is not None:
            self.preferences.mark_heldout(pp.heldout, fence)
        self._pending_pref_heldout += pp.heldout
        self._claimed = list(pre.batch.sample_ids)
        self._claimed_prefs = list(pp.prefs.ids) if pp.prefs is not None else []
        if pre.batch.n_new_blocks == 0 and pp.prefs is None:
            return True
        kept = set(self._claimed)
        new = [s for s in samples if s.id in kept]
        skipped = self._fit(
            pre.batch, new, replay, pp.prefs
        )  # 2. optimizer steps, passes over the batch (test, then train)
        if skipped is not None:
            self.queue.reject({sid: f"optimizer: {skipped}" for sid in self._claimed}, fence)
            if self.preferences is not None:
                self.preferences.reject({pid: f"optimizer: {skipped}" for pid in self._claimed_prefs}, fence)
            self._claimed, self._claimed_prefs = [], []
            self._go_back()
            return True
        self._pending += self._claimed
        self._pending_prefs += self._claimed_prefs
        self._replayed.update(dict.fromkeys(s.id for s in replay))
        for sample in new:
            self._taught[sample.text_hash or text_hash(sample.text)] = sample
        self._claimed, self._claimed_prefs = [], []
        if self._due():
            self._settle()  # 3-5. evaluate, checkpoint, hot-swap
        return True

    def _settle(self) -> None:
        state, fence = self._require_state(), self._leader.token
        report = self._evaluate(state)  # 3. what it learned, held-out, anchors, preferences, probes
        self._last_eval = report
        extra = {
            "samples": len(self._pending),
            "preferences": len(self._pending_prefs),
            "steps": self._steps_since_eval,
            "passes": self._passes_since_eval,
            "prequential_loss": state.prequential_loss,
        }
        texts = {
            **dict.fromkeys(self._replayed, TextKind.replay),
            **dict.fromkeys(self._pending, TextKind.batch),
            **dict.fromkeys(self._pending_prefs, TextKind.pref),
        }
        record = checkpoint(state, report, self.registry, extra, self.factory.save_weights, fence, texts)  # 4. durable
        prefs = self.preferences
        if not report.promote:
            log.info("version %d rejected: %s", record.version, report.reason)
            self._rejections += 1
            # The refused batch's held-out part goes too: it must not become part of what later
            # versions are measured against.
            why = f"gate: {report.reason}"
            self.queue.reject({sid: why for sid in self._pending + self._pending_heldout}, fence)
            if prefs is not None:
                prefs.reject({pid: why for pid in self._pending_prefs + self._pending_pref_heldout}, fence)
            self._clear_pending()
            self._go_back()
        else:
            if swap(record, self.registry, self.serving, fence, self._ack):  # 5. promote, trained, serving follows
                log.info("version %d promoted: %s", record.version, report.reason)
                self._promotions += 1
                state.base_version = record.version
                self.replay_pool.offer(self._pending)
                self.anchor_pool.offer(self._pending_heldout)
                self._clear_pending()
                self._penalty = self._make_penalty(state.model)  # the pull is toward what is served now
                # The candidate's measures are those of the version now served: the next gate reuses them.
                self._remember(
                    record.version, report.candidate_loss, report.anchor_by_source, report.preference_accuracy
                )
                if report.probe is not None:
                    self._known_probe = (record.version, report.probe)
            else:
                self._leader.keep(force=True)  # refused for a lost lease? (then this raises LeaseLost)
                log.info("version %d not promoted: the active version changed (rollback)", record.version)
                self.queue.requeue(self._pending, fence)
                if prefs is not None:
                    prefs.requeue(self._pending_prefs, fence)
                self.anchor_pool.offer(self._pending_heldout)
                self._clear_pending()
                self._go_back()
        self._steps_since_eval = self._passes_since_eval = 0
        self._last_eval_t = time.monotonic()
        self.registry.prune()

    def _ack(self, version: int) -> None:
        """What ``version`` (promoted) holds is trained."""
        self.queue.ack(self._pending, version, self._leader.token)
        if self.preferences is not None:
            self.preferences.ack(self._pending_prefs, version, self._leader.token)

    def _clear_pending(self) -> None:
        self._pending, self._pending_heldout, self._taught, self._replayed = [], [], {}, {}
        self._pending_prefs, self._pending_pref_heldout = [], []

    # ---- stage helpers ----------------------------------------------------------------------
    def _claim(self) -> tuple[list[Sample], list[Preference]]:
        prefs, pairs_only = self.preferences, self._pairs_only()
        if self.queue.depth() == 0 and (prefs is None or prefs.depth(pairs_only) == 0):
            return [], []
        self._fill_wait()
        self._step_boundary()  # nothing claimed yet: stop or reset leave nothing to give back
        # Our own pending work may have waited longer than a lease: it must not look expired below.
        self._renew_lease(force=True)
        fence = self._leader.token  # each write below is refused if another trainer took the store since
        self.queue.requeue_expired(self.cfg.lease_s, fence)  # claims of a trainer that died or hung
        if prefs is not None:
            prefs.requeue_expired(self.cfg.lease_s, fence)
        cfg = self.cfg
        samples = self.queue.claim_batch(cfg.batch_max_samples, cfg.batch_tokens, cfg.max_per_source, fence)
        claimed = prefs.claim(cfg.preference_batch, pairs_only, fence) if prefs is not None else []
        return samples, claimed

    def _pairs_only(self) -> bool:
        """DPO trains on pairs; KTO on every preference, one side at a time."""
        return self.cfg.preference is None or self.cfg.preference.loss == "dpo"

    def _held(self, digest: str) -> bool:
        return heldout_by_hash(digest, self.cfg.preprocess.heldout_fraction)

    def _fill_wait(self) -> None:
        """Give a burst of posts a moment to arrive, so that one batch carries them all: wait
        ``fill_wait_s`` at most, and no longer than ``fill_quiet_s`` past the last arrival, so that
        a lone post is not held the whole time. Stop, pause and reset end it at once."""
        deadline = time.monotonic() + self.cfg.fill_wait_s
        quiet = self.cfg.fill_quiet_s or self.cfg.fill_wait_s
        self._arrived.clear()
        while not (self._stop.is_set() or self._reset.is_set() or not self._resume.is_set()):
            left = deadline - time.monotonic()
            if left <= 0 or not self._arrived.wait(min(quiet, left)):
                return
            self._arrived.clear()

    def _draw_replay(self, n_new: int) -> list[Sample]:
        """Enough earlier samples that they make up ``replay_ratio`` of the batch (``replay_min`` at least)."""
        r = self.cfg.replay_ratio
        if r <= 0:
            return []
        # Seeded by the step, so a resumed trainer draws what an uninterrupted one would have.
        rng = random.Random(self.cfg.seed * 1_000_003 + self._require_state().step)
        n = max(round(n_new * r / (1 - r)), self.cfg.replay_min)
        drawn = self.replay_pool.draw(n, rng)
        return [drawn[i % len(drawn)] for i in range(n)] if drawn else []

    def _teacher(self) -> torch.nn.Module | None:
        """The base model, whose distribution the rehearsed texts are trained toward (when asked)."""
        r = self.cfg.rehearsal
        return self.factory.base_model() if r is not None and r.distill else None

    def _with_rehearsal(self, batch: Batch) -> Batch:
        """The batch and, for this pass, texts sampled from the base (llmos/trainer/rehearsal.py):
        a fresh draw each pass, seeded by the step as replay is, so a resumed trainer draws the same."""
        if self._base_pool is None:
            return batch
        rng = random.Random(f"rehearsal:{self.cfg.seed}:{self._require_state().step}")
        model, tok = self.factory.base_model(), self.factory.tokenizer
        blocks, weights = self._base_pool.blocks(rng, model, tok, self.device, self.cfg.preprocess.block_size)
        return batch.with_blocks(blocks, weights)

    def _record_prequential(self, loss_sum: float, tokens: int) -> None:
        """The loss on new data before any update on it: the canonical online-learning metric.
        Each new row's loss is the one its first-pass step measured just before training on it
        (test-then-train per step), in the training precision and mode; no forward pass of its own."""
        state = self._require_state()
        if tokens and math.isfinite(loss_sum):
            loss, d, prev = loss_sum / tokens, self.cfg.prequential_decay, state.prequential_loss
            state.prequential_loss = loss if prev is None else d * prev + (1 - d) * loss

    def _fit(
        self, batch: Batch, new: Sequence[Sample], replay: Sequence[Sample], prefs: PreferenceSet | None
    ) -> str | None:
        """Passes over the batch (its texts, then its preferences in a step of their own) until
        it is learned, the early stop says it will not be, or ``passes_per_batch`` are done.
        Returns why a step was skipped (a non-finite loss), or None."""
        state = self._require_state()
        k = self.cfg.grad_accum_steps
        pref_cfg = self.cfg.preference
        ref = None
        if prefs is not None and pref_cfg is not None:  # the served version is the reference
            ref = reference(self.serving.current().model, prefs, self.device, pref_cfg.micro_batch)
        watch = EarlyStop(self.cfg.early_stop_patience) if self._early_stop_on() else None
        taught = self._text_set(new) if watch is not None and new else None
        kept = self._text_set(replay) if watch is not None and replay else None
        held = self._recalled(kept)  # what the replayed texts hold before: learning must keep it
        passes = self.cfg.passes_per_batch
        preq_sum, preq_tokens = 0.0, 0  # the first pass's losses on new rows, before each step
        best: tuple[int, Mark] | None = None  # the best pass so far, when it is not the last
        done = 0
        for done in range(1, passes + 1):
            shuffle = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + state.step)
            micro = list(self._with_rehearsal(batch).micro_batches(self.cfg.micro_batch, shuffle))
            for start in range(0, len(micro), k):
                self._step_boundary()
                self._yield_to_requests()
                report = (optimize if self.sender is None else self.sender.step)(
                    state,
                    micro[start : start + k],
                    self.cfg.optimizer,
                    self.device,
                    self.cfg.bf16,
                    self._penalty,
                    self._teacher(),
                )
                if report.skipped is not None:
                    return report.skipped
                self._steps_since_eval += 1
                self._tokens_trained += report.tokens
                if done == 1 and report.new_tokens:
                    preq_sum += report.new_loss * report.new_tokens
                    preq_tokens += report.new_tokens
            if prefs is not None and ref is not None and pref_cfg is not None:
                self._step_boundary()
                report = (optimize_preferences if self.sender is None else self.sender.preference_step)(
                    state, prefs, ref, self.cfg.optimizer, pref_cfg, self.device, self.cfg.bf16, self._penalty
                )
                if report.skipped is not None:
                    return report.skipped
                self._steps_since_eval += 1
            if done == 1:
                self._record_prequential(preq_sum, preq_tokens)
            self._renew_lease()
            if watch is None:
                continue
            verdict = watch.after_pass(*self._learned(taught, kept, held, prefs))
            if verdict == "learned":
                best = None
                break
            if watch.is_best:
                best = None  # drop the old mark first: one copy of the state at a time
                if done < passes:  # the last pass needs no copy
                    best = (done, state.mark())
            if verdict == "stop":
                break
        if best is not None:  # not learned, and an earlier pass had more right than the last
            done, mark = best
            self._steps_since_eval -= state.step - mark.step  # steps undone do not count
            state.restore(mark)
        self._passes_since_eval += done
        state.samples_seen += len(batch.sample_ids)
        return None

    def _learned(
        self, taught: TextSet | None, kept: TextSet | None, held: list[bool], prefs: PreferenceSet | None
    ) -> tuple[bool, float, int]:
        """Whether the training state has learned the batch: it recalls every new text firmly
        (llmos/trainer/recall.py), still recalls every replayed text it recalled before the batch
        (``held``), and prefers every chosen completion; the loss the early stop watches (the new
        texts', or 1 - accuracy); and how many of those it has right."""
        model, mb = self._require_state().model, self.cfg.micro_batch
        scores = text_scores(model, taught, self.device, mb, self._between_micro_batches) if taught else None
        recalled = scores.firmly if scores is not None else []
        still = [now for now, before in zip(self._recalled(kept), held, strict=True) if before]
        accuracy = None
        if prefs is not None:
            accuracy = preference_accuracy(model, prefs, self.device, mb, self._between_micro_batches)
        pairs_right = round((accuracy or 0.0) * len(prefs.chosen)) if prefs is not None else 0
        learned = all(recalled) and all(still) and (accuracy is None or accuracy == 1.0)
        loss = scores.loss if scores is not None else 1.0 - (accuracy if accuracy is not None else 1.0)
        return learned, loss, sum(recalled) + sum(still) + pairs_right

    def _recalled(self, ts: TextSet | None) -> list[bool]:
        if ts is None:
            return []
        model = self._require_state().model
        return text_scores(model, ts, self.device, self.cfg.micro_batch, self._between_micro_batches).recalled

    def _text_set(self, samples: Sequence[Sample]) -> TextSet:
        """Recall rows for up to eval_max_samples of ``samples``, one per distinct text (the last ones)."""
        unique = {s.text_hash or text_hash(s.text): s for s in samples}
        chosen = list(unique.values())[-self.cfg.eval_max_samples :]
        return text_set(
            [s.text for s in chosen],
            [s.prompt_chars for s in chosen],
            self.factory.tokenizer,
            self.factory.context_length,
        )

    def _between_micro_batches(self) -> None:
        """Inside an evaluation, as between optimizer steps: honour stop, reset and pause, and let
        generations in flight go first."""
        self._step_boundary()
        self._yield_to_requests()

    def _yield_to_requests(self) -> None:
        """Serving first: while generations are in flight, hold the next step back, for
        ``yield_to_requests_s`` at most so that a steady stream of requests cannot starve training."""
        wait = self.cfg.yield_to_requests_s
        if wait > 0 and self.serving.in_flight:
            self.serving.wait_idle(wait)
        if self.cfg.threads_idle > self.cfg.threads_busy:  # opt-in: this thread's own count, for the next step
            quiet = self.serving.quiet(self.cfg.threads_quiet_s)
            torch.set_num_threads(self.cfg.threads_idle if quiet else self.cfg.threads_busy)

    def _renew_lease(self, force: bool = False) -> None:
        """Keep the trainer lease, every third of it (LeaseLost once another trainer took it), and
        extend the lease on the samples and preferences in hand and pending an evaluation, every
        third of their lease (at once if ``force``): the trainer holds them as long as it lives,
        idle or paused in between; once it dies or hangs, the leases run out, and a standby takes
        over or they go back to the queue."""
        self._leader.keep()
        if not force and time.monotonic() - self._last_renew <= self.cfg.lease_s / 3:
            return
        self._last_renew = time.monotonic()
        fence = self._leader.token
        if self._claimed or self._pending:
            self.queue.renew(self._claimed + self._pending, fence)
        if self.preferences is not None and (self._claimed_prefs or self._pending_prefs):
            self.preferences.renew(self._claimed_prefs + self._pending_prefs, fence)

    def _eval_set(
        self, name: str, samples: list[Sample], extra_texts: tuple[str, ...] = ()
    ) -> tuple[tuple[str, ...], Batch]:
        key = tuple(s.id for s in samples)
        cached = self._sets.get(name)
        if cached is None or cached[0] != key:
            texts = [s.text for s in samples] + list(extra_texts)
            cached = (key, eval_batch(texts, self.factory.tokenizer, self.cfg.preprocess))
            self._sets[name] = cached
        return cached

    def _early_stop_on(self) -> bool:
        return self.cfg.early_stop_patience > 0 and self.cfg.passes_per_batch > 1

    def _anchor_sets(self) -> dict[str, tuple[tuple[str, ...], Batch]]:
        """The anchor set in groups: a source with at least ``min_source_anchors`` anchors is a
        group of its own; the others make one group together, so that nobody can invent sources
        with an anchor text each and have each one's loss veto a version on its own. The user's
        eval file is a group of its own."""
        by_source: dict[str, list[Sample]] = {}
        for sample in self.anchor_pool.members():
            by_source.setdefault(sample.source or "(no source)", []).append(sample)
        small = [
            s for name, members in by_source.items() if len(members) < self.cfg.min_source_anchors for s in members
        ]
        big = {name: m for name, m in by_source.items() if len(m) >= self.cfg.min_source_anchors}
        if small:
            big["(other sources)"] = sorted(small, key=lambda s: s.seq)
        groups = {name: self._eval_set(f"anchor:{name}", members) for name, members in big.items()}
        if self.cfg.anchor_texts:
            groups["(eval file)"] = self._eval_set("anchor:(eval file)", [], self.cfg.anchor_texts)
        return groups

    def _heldout_preferences(self) -> PreferenceSet | None:
        """The most recent held-out preference pairs (eval_max_samples at most): the gate's
        preference accuracy."""
        if self.preferences is None:
            return None
        held = self.preferences.heldout(self.cfg.eval_max_samples, pairs_only=True)
        if not held:
            return None
        key = tuple(p.id for p in held)
        if self._pref_set is None or self._pref_set[0] != key:
            self._pref_set = (key, preference_set(held, self.factory.tokenizer, self.factory.context_length))
        return self._pref_set[1]

    def _evaluate(self, state: TrainingState) -> EvalReport:
        heldout_key, heldout = self._eval_set("recent", self.queue.heldout(self.cfg.eval_max_samples))
        anchors = self._anchor_sets()
        # Only the sets in use stay cached: a source that left the anchor set leaves the cache.
        keep = {"recent", "penalty", *(f"anchor:{name}" for name in anchors)}
        self._sets = {name: v for name, v in self._sets.items() if name in keep}
        prefs = self._heldout_preferences()
        pref_key = prefs.ids if prefs is not None else []
        active = self.serving.current()
        v, known = active.version, self._known
        probe_known = self._known_probe[1] if self._known_probe and self._known_probe[0] == v else None
        report = evaluate(
            state.model,
            active.model,
            self.factory.base_model(),
            EvalSets(
                heldout,
                {name: b for name, (_key, b) in anchors.items()},
                self._text_set(list(self._taught.values())) if self._taught else None,
                prefs,
                self._probes,
            ),
            self.cfg.eval,
            self.device,
            state.last_loss,
            Known(
                known.get(("recent", v, heldout_key)),
                {
                    name: known[(f"anchor:{name}", v, key)]
                    for name, (key, _b) in anchors.items()
                    if (f"anchor:{name}", v, key) in known
                },
                known.get(("preferences", v, tuple(pref_key))),
                probe_known,
            ),
            self._between_micro_batches,
        )
        self._measured = (heldout_key, {name: key for name, (key, _b) in anchors.items()}, tuple(pref_key))
        self._remember(v, report.active_loss, report.active_anchor_by_source, report.active_preference_accuracy)
        if report.active_probe is not None:
            self._known_probe = (v, report.active_probe)
        return report

    def _remember(
        self, version: int, heldout: float | None, anchors: dict[str, float], preference_accuracy: float | None
    ) -> None:
        """Keep what ``version`` measured on the sets of the last evaluation (and nothing else):
        the active version's measures, or a promoted candidate's, which are the same weights'."""
        heldout_key, anchor_keys, pref_key = self._measured
        known = self._known
        known.clear()
        if heldout is not None:
            known[("recent", version, heldout_key)] = heldout
        for name, loss in anchors.items():
            known[(f"anchor:{name}", version, anchor_keys[name])] = loss
        if preference_accuracy is not None:
            known[("preferences", version, pref_key)] = preference_accuracy

    def _due(self) -> bool:
        every_steps, every_s = self.cfg.evaluate_every_steps, self.cfg.evaluate_every_s
        if every_steps == 0 and every_s == 0:
            return True
        if every_steps and self._steps_since_eval >= every_steps:
            return True
        return bool(every_s) and time.monotonic() - self._last_eval_t >= every_s

    def _step_boundary(self) -> None:
        """Between steps (and idle cycles): keep the lease on the work in hand, honour stop, reset
        and pause."""
        self._renew_lease()
        if self._stop.is_set() or self._reset.is_set():
            raise _Interrupted
        while not self._resume.wait(0.2):
            self._renew_lease()  # paused is alive: the work in hand stays ours
            if self._reset.is_set():  # a rollback while paused: reload now, stay paused
                raise _Interrupted
        if self._stop.is_set() or self._reset.is_set():
            raise _Interrupted

    # ---- state management -------------------------------------------------------------------
    def _require_state(self) -> TrainingState:
        if self._state is None:
            raise RuntimeError("trainer state not loaded")
        return self._state

    def _release(self) -> None:
        """Give every sample and preference in hand back to their queues (once the lease is lost,
        its next holder did)."""
        fence = self._leader.token
        try:
            if self._leader.held and (self._claimed or self._pending):
                self.queue.release(self._claimed + self._pending, fence)
            if self._leader.held and self.preferences is not None and (self._claimed_prefs or self._pending_prefs):
                self.preferences.release(self._claimed_prefs + self._pending_prefs, fence)
        except LeaseLost:
            self._leader.lost()
        self._drop_work()

    def _drop_work(self) -> None:
        """Forget the work in hand (it is in the store's hands: given back, or taken over)."""
        self._claimed, self._pending, self._taught, self._replayed = [], [], {}, {}
        self._claimed_prefs, self._pending_prefs = [], []
        self._steps_since_eval = self._passes_since_eval = 0

    def _recover(self) -> bool:
        """Go back to the active version (True); if even that fails (its files went missing),
        report it and wait the back-off before the next try (False), instead of letting the
        trainer's thread die."""
        try:
            self._go_back()
            return True
        except Exception as exc:
            log.exception("trainer could not load the active version")
            self._phase = TrainerPhase.error
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._stop.wait(self.cfg.error_backoff_s)
            self._reset.set()  # the next step boundary goes back again
            return False

    def _lead(self) -> bool:
        """Whether this trainer holds the store's trainer lease, taking it if it can. Taking it
        starts a term: what an earlier holder left in training goes back to the queue (its
        claims end with its term), and training continues from the active version, which another
        trainer may have moved meanwhile."""
        if self._leader.held:
            return True
        if not self._leader.acquire():
            self._phase = TrainerPhase.standby
            return False
        self._drop_work()  # an earlier term's, if any: given back just below
        self._clear_pending()
        self.registry.remove_leftovers()  # the writer now: what an earlier holder left half-written
        fence = self._leader.token
        n = self.queue.requeue_stale(fence)
        n_prefs = self._preference_rows.requeue_stale(fence) if self._preference_rows is not None else 0
        if n or n_prefs:
            log.info("returned %d samples and %d preferences left in training to their queues", n, n_prefs)
        state = self._state
        if state is None or state.base_version != self.registry.active_version():
            self._go_back()
        self._phase = TrainerPhase.idle
        return True

    def _stand_down(self) -> None:
        """The lease is another trainer's (it took over while this one was paused past the lease,
        or cut off from the store): drop the work in hand without a write, since the store refuses
        them and the next holder gave it back to the queue, and wait as a standby."""
        log.warning(
            "lost the trainer lease (token %d): dropping the work in hand, waiting as a standby", self._leader.token
        )
        self._leader.lost()
        self._drop_work()
        self._clear_pending()
        self._state, self._penalty = None, None  # trained past the active version: the next term reloads
        self._phase = TrainerPhase.standby

    def _go_back(self) -> None:
        """Drop work in hand and continue from the active version's weights and optimizer state."""
        self._reset.clear()
        # Every rollback counted here was committed before it was asked: the read below sees it.
        # (One asked after the clear sets the flag again: the trainer goes back once more.)
        asked = self._resets_asked
        self._release()
        self._load(self.registry.active_version())
        self._resets_done = asked

    def _load(self, version: int) -> None:
        model = self.factory.instance(self.registry.weights_path(version))
        optimizer = self.sender.optimizer_for(model, self.cfg.optimizer) if self.sender is not None else None
        self._state = load_state(version, self.registry, model, self.cfg.optimizer, optimizer)
        self._penalty = self._make_penalty(model)
        log.info("trainer continues from version %d (step %d)", version, self._state.step)

    def _make_penalty(self, model: torch.nn.Module) -> Penalty | None:
        """The pull toward ``model``'s weights (the version served: loaded, or just promoted), or None."""
        if self.cfg.regularization.method == "none":
            return None
        _key, anchor = self._eval_set("penalty", self.anchor_pool.members(), self.cfg.anchor_texts)
        return make_penalty(self.cfg.regularization, model, anchor, self.device)
