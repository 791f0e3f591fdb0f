"""Wiring: build every part once from the settings, start and stop them, and offer the service
functions that the HTTP routes call (one each). Nothing below this module reads settings."""

from __future__ import annotations

import gc
import hmac
import json
import logging
import os
import secrets
import threading
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmos.model.loader import BUILTIN_TINY, LoraSpec, ModelFactory, resolve_base, resolve_device
from llmos.registry.registry import CorruptCheckpoint, Registry
from llmos.serving.engine import ServingEngine
from llmos.serving.text import TextStream
from llmos.serving.types import Completion, SamplingParams
from llmos.settings import Settings
from llmos.store.audit import AuditEntry, AuditLog, AuditOutcome
from llmos.store.checkpoints import CheckpointIndex, CheckpointRecord
from llmos.store.db import Database
from llmos.store.generations import Feedback, GenerationLog
from llmos.store.lease import TrainerLease
from llmos.store.preferences import PreferenceQueue
from llmos.store.queue import NewSample, Sample, SampleQueue
from llmos.store.reservoir import Reservoir
from llmos.store.tables import SampleStatus
from llmos.threads import ThreadBudget
from llmos.trainer.collapse import CollapseConfig
from llmos.trainer.evaluate import EvalConfig
from llmos.trainer.loop import Serving, Trainer, TrainerConfig, TrainerStatus
from llmos.trainer.optimize import PreferenceConfig
from llmos.trainer.preprocess import FEEDBACK_SOURCE_PREFIX, PreprocessConfig
from llmos.trainer.process import TrainerProcess
from llmos.trainer.regularize import RegularizationConfig
from llmos.trainer.rehearsal import RehearsalConfig
from llmos.trainer.state import OptimizerConfig

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin_token"


class QueueFull(RuntimeError):
    def __init__(self, depth: int, limit: int) -> None:
        super().__init__(f"the queue holds {depth} texts waiting to be trained; the limit is {limit}")
        self.depth, self.limit = depth, limit


@dataclass(frozen=True)
class GenerationResult:
    generation_id: str
    completion: Completion


@dataclass(frozen=True)
class RollbackResult:
    active_version: int
    requeued: int


class ServiceCounters:
    """What the service functions did since this process started (read by GET /metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generations = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.rollbacks = 0

    def generation(self, c: Completion) -> None:
        with self._lock:
            self.generations += 1
            self.prompt_tokens += c.prompt_tokens
            self.generated_tokens += c.completion_tokens

    def rollback(self) -> None:
        with self._lock:
            self.rollbacks += 1


def admin_token(settings: Settings) -> tuple[str, Path | None]:
    """The configured admin token, or one kept in <data_dir>/admin_token (made on first start)."""
    if settings.auth.admin_token:
        return settings.auth.admin_token, None
    path = settings.data_dir / ADMIN_TOKEN_FILE
    if path.exists():
        return path.read_text(encoding="utf-8").strip(), path
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token, path


def read_anchor_file(path: Path | None) -> tuple[str, ...]:
    """Texts of the user's eval file (JSONL, one {"text": ...} per line)."""
    if path is None:
        return ()
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"eval.anchor_file {path}, line {n}: not JSON ({exc})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"eval.anchor_file {path}, line {n}: expected an object with a 'text' string")
        texts.append(obj["text"])
    return tuple(texts)


def auto_bf16(device: torch.device, lora: bool) -> bool:
    """What model.precision "auto" picks: bf16 autocast on CUDA, and on a CPU with bf16 instructions
    (AVX512-BF16 or AMX) when all weights train. Measured on such a CPU (bench/results/RESULTS.md,
    figure 3): full training at 1.5x the fp32 speed, loss curve within 2% of fp32's. Not for LoRA
    on a CPU: under bf16 autocast the LoRA end-to-end test (tests/test_learning.py) did not learn
    its fact within the time the fp32 run needed. Without bf16 instructions bf16 is emulated and
    slower than fp32."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or lora:
        return False
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def attention_kernels(settings: Settings, device: torch.device) -> str | None:
    """What model.attention "auto" picks: eager attention for the built-in model on a CPU, where
    PyTorch's SDPA kernels (flash attention's backward above all) made a training step of its
    8 x 128-token micro-batches 1.6x slower in bf16 (bench/results/RESULTS.md, before and after);
    otherwise None, the model's default."""
    choice = settings.model.attention
    if choice != "auto":
        return choice
    return "eager" if settings.model.name_or_path == BUILTIN_TINY and device.type == "cpu" else None


def trainer_config(settings: Settings, device: torch.device) -> TrainerConfig:
    t, o = settings.train, settings.optimizer
    lora = settings.train.mode == "lora"
    bf16 = settings.model.precision == "bf16" or (settings.model.precision == "auto" and auto_bf16(device, lora))
    r = settings.regularization
    threads = thread_budget(settings)
    return TrainerConfig(
        preprocess=PreprocessConfig(t.block_size, t.max_sample_tokens, t.heldout_fraction),
        optimizer=OptimizerConfig(
            name=o.name,
            lr=o.lr,
            betas=o.betas,
            eps=o.eps,
            weight_decay=o.weight_decay,
            momentum=o.momentum,
            nesterov=o.nesterov,
            warmup_steps=o.warmup_steps,
            schedule=o.schedule,
            grad_clip=t.grad_clip,
        ),
        eval=eval_config(settings),
        micro_batch=t.micro_batch,
        passes_per_batch=t.passes_per_batch,
        early_stop_patience=t.early_stop_patience,
        batch_tokens=t.batch_tokens,
        batch_max_samples=t.batch_max_samples,
        fill_wait_s=t.fill_wait_s,
        fill_quiet_s=t.fill_quiet_s,
        poll_interval_s=t.poll_interval_s,
        evaluate_every_steps=t.evaluate_every_steps,
        evaluate_every_s=t.evaluate_every_s,
        eval_max_samples=settings.eval.max_samples,
        error_backoff_s=t.error_backoff_s,
        bf16=bf16,
        seed=settings.model.seed,
        grad_accum_steps=t.grad_accum_steps,
        replay_ratio=settings.replay.ratio if settings.replay.enabled else 0.0,
        replay_min=settings.replay.min_samples,
        max_per_source=max(1, int(t.batch_max_samples * t.max_source_fraction)),
        lease_s=t.lease_s,
        trainer_lease_s=t.trainer_lease_s,
        yield_to_requests_s=t.yield_to_requests_s,
        threads_busy=threads.serving,
        threads_idle=threads.idle,
        threads_quiet_s=settings.runtime.torch_threads_quiet_s,
        nice=settings.runtime.trainer_nice,
        regularization=RegularizationConfig(r.method, r.strength, r.fisher_batches),
        anchor_texts=read_anchor_file(settings.eval.anchor_file),
        preference=preference_config(settings),
        preference_batch=settings.feedback.preference_batch,
        min_source_anchors=settings.eval.min_source_anchors,
        rehearsal=rehearsal_config(settings),
    )


def rehearsal_config(settings: Settings) -> RehearsalConfig | None:
    """Base rehearsal, when replay is on and the base is pretrained (or it is asked for)."""
    r = settings.replay
    pretrained = not settings.model.name_or_path.startswith("builtin:")
    if not r.enabled or r.base_rehearsal == "off" or (r.base_rehearsal == "auto" and not pretrained):
        return None
    path = settings.data_dir / "rehearsal" / "base-texts.json"
    return RehearsalConfig(
        path, settings.model.name_or_path, r.base_per_pass, r.base_pool, r.base_max_tokens, distill=r.base_loss == "kl"
    )


def eval_config(settings: Settings) -> EvalConfig:
    e, c = settings.eval, settings.eval.collapse
    collapse = CollapseConfig(tuple(c.probe_prompts), c.probe_tokens, c.min_entropy, c.min_distinct, c.max_kl)
    return EvalConfig(
        micro_batch=settings.train.micro_batch,
        forgetting_budget=e.forgetting_budget,
        heldout_budget=e.heldout_budget,
        preference_tolerance=e.preference_tolerance,
        collapse=collapse if c.probe_prompts else None,
    )


def preference_config(settings: Settings) -> PreferenceConfig | None:
    f = settings.feedback
    if f.preference == "none":
        return None
    return PreferenceConfig(f.preference, f.beta, f.preference_weight, settings.train.micro_batch)


def thread_budget(settings: Settings) -> ThreadBudget:
    return ThreadBudget.of(settings.runtime.torch_threads, settings.runtime.torch_threads_idle)


def lora_spec(settings: Settings) -> LoraSpec | None:
    if settings.train.mode != "lora":
        return None
    lo = settings.train.lora
    return LoraSpec(lo.rank, lo.alpha, lo.dropout, lo.targets)


def model_factory(settings: Settings) -> ModelFactory:
    device = resolve_device(settings.model.device)
    base = resolve_base(settings.model.name_or_path, settings.data_dir, settings.model.seed)
    return ModelFactory(base, device, lora_spec(settings), attention_kernels(settings, device))


def open_registry(settings: Settings, db: Database) -> Registry:
    registry = Registry(settings.data_dir / "checkpoints", CheckpointIndex(db), settings.registry.keep_last)
    registry.open()
    return registry


def replay_pool(settings: Settings, db: Database) -> Reservoir:
    """Trained samples, mixed into new batches."""
    return Reservoir(db, "replay", settings.replay.capacity, SampleStatus.trained)


def anchor_pool(settings: Settings, db: Database) -> Reservoir:
    """Held-out samples: the retention measure."""
    return Reservoir(db, "anchor", settings.eval.anchor_capacity, SampleStatus.heldout)


def build_trainer(
    settings: Settings, db: Database, registry: Registry, factory: ModelFactory, serving: Serving
) -> Trainer:
    """The trainer, in this process (runtime.trainer "thread") or in its own (llmos/trainer/process.py)."""
    return Trainer(
        trainer_config(settings, factory.device),
        SampleQueue(db),
        registry,
        serving,
        factory,
        replay_pool(settings, db),
        anchor_pool(settings, db),
        TrainerLease(db),
        PreferenceQueue(db),
    )


class Daemon:
    """Owns the parts of one llmos process (the API process, when the trainer runs in its own)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        threads = thread_budget(settings)
        torch.set_num_threads(threads.serving)  # for threads that start later; trainer and decoder set their own
        self.admin_token, self.admin_token_path = admin_token(settings)
        self.db = Database(settings.store_url, settings.store.busy_timeout_s)
        self.db.check_durable()  # raises StoreNotDurable: never acknowledge what a crash could lose
        self.db.create_schema()
        self.audit_log = AuditLog(self.db)
        self.queue = SampleQueue(self.db)
        self.preferences = PreferenceQueue(self.db)
        self.generations = GenerationLog(self.db, settings.store.keep_generations)
        self.registry = open_registry(settings, self.db)
        self.factory = model_factory(settings)
        self.engine = ServingEngine(
            self.factory,
            self.registry,
            settings.serving.max_concurrency,
            settings.serving.pinned_versions,
            threads.serving,
            settings.serving.kv_cache_tokens,
            settings.serving.prefill_chunk_tokens,
            settings.serving.max_requests,
        )
        self.counters = ServiceCounters()
        self.replay_pool = replay_pool(settings, self.db)
        self.anchor_pool = anchor_pool(settings, self.db)
        self.trainer: Trainer | TrainerProcess
        if settings.runtime.trainer == "process":
            # Built here too, unused: what it reads (eval.anchor_file) fails this start, not each child's.
            trainer_config(settings, self.factory.device)
            self.trainer = TrainerProcess(settings, self.engine)
        else:
            self.trainer = build_trainer(settings, self.db, self.registry, self.factory, self.engine)

    def start(self, run_trainer: bool = True) -> None:
        """Recover, load the active version and start the trainer, thread or process (without it, a
        caller such as a benchmark drives ``trainer.cycle()`` of the thread's Trainer itself). What
        a previous process left in training goes back to the queue when the trainer takes the
        trainer lease (llmos/trainer/loop.py), not here: on a store shared with another trainer,
        it may be that trainer's work in hand."""
        self._leave_corrupt_active()
        self.engine.sync()
        if run_trainer:
            self.trainer.start()
        elif isinstance(self.trainer, Trainer):
            self.trainer.load_active()
        freeze_startup_objects()

    def _leave_corrupt_active(self) -> None:
        """A corrupt checkpoint is never served: if the active version's files fail verification,
        serve its newest ancestor that verifies (version 0 at worst), and say so in the audit log."""
        active = self.registry.active_version()
        corrupt = self.registry.corrupt_versions()
        if active not in corrupt:
            return
        live = {r.version: r for r in self.registry.list()}
        for v in sorted(self.registry.lineage(active), reverse=True):
            rec = live.get(v)
            if rec is None or rec.corrupt or rec.status.value == "rejected":
                continue
            try:
                self.registry.rollback(v)
            except CorruptCheckpoint:
                continue
            log.error("active version %d is corrupt (%s); serving version %d instead", active, corrupt[active], v)
            self.audit(
                "system", "fallback", {"from_version": active, "to_version": v}, AuditOutcome.ok, 200, corrupt[active]
            )
            return

    def stopping(self) -> None:
        """The server was told to stop and answers its requests in flight first: the trainer
        process, signalled with it, is not restarted meanwhile."""
        if isinstance(self.trainer, TrainerProcess):
            self.trainer.server_stopping()

    def stop(self) -> None:
        self.trainer.stop()
        self.db.dispose()

    # ---- service functions (one per route) ---------------------------------------------------
    def ingest(self, items: list[NewSample]) -> list[str]:
        depth, limit = self.queue.depth_estimate(max_age_s=0.25), self.settings.limits.max_queue_depth
        if depth + len(items) > limit:  # backpressure: the sender waits, memory and disk do not grow
            raise QueueFull(depth, limit)
        ids = self.queue.enqueue(items)  # committed (durably) when this returns
        self.trainer.wake()
        return ids

    def sample(self, sample_id: str) -> Sample | None:
        return self.queue.get(sample_id)

    def generate(self, prompt: str, params: SamplingParams) -> GenerationResult:
        c = self.engine.generate(prompt, params)
        gid = self._record(None, prompt, params, c, ())
        self.counters.generation(c)
        return GenerationResult(gid, c)

    def generate_stream(
        self,
        prompt: str,
        params: SamplingParams,
        version: int | None = None,
        stop: Sequence[str] = (),
        generation_id: str | None = None,
    ) -> Generator[str | GenerationResult]:
        """Complete a prompt with the active version, or the stored promoted ``version``, yielding
        text as it is made (whole characters) and finally the recorded result. Generation ends at
        the first of ``stop`` (which is not part of the text). The id is chosen up front so that a
        stream can name it before the completion exists. The iteration may move between threads
        (one at a time): nothing thread-local is held between chunks."""
        gid = generation_id or str(uuid.uuid4())
        if version is None:
            version = self.engine.current().version  # fixed now: a stop string ends the stream early
        prompt_tokens = len(self.engine.encode_prompt(prompt, params.max_new_tokens))
        text = TextStream(self.engine.tokenizer, stop)
        events = self.engine.stream(prompt, params, version)
        c: Completion | None = None
        try:
            for tok, done in events:
                if done is not None:
                    c = done
                    break
                delta = text.push(tok)
                if delta:
                    yield delta
                if text.stopped:
                    c = Completion(text.text, version, prompt_tokens, text.tokens, "stop")
                    break
        finally:
            events.close()  # frees the generation slot at once, also when the caller gave up
        if c is None:
            raise RuntimeError("generation ended without a result")
        rest = text.finish(c.text)
        if rest:
            yield rest
        self._record(gid, prompt, params, c, stop)
        self.counters.generation(c)
        yield GenerationResult(gid, c)

    def _record(self, gid: str | None, prompt: str, params: SamplingParams, c: Completion, stop: Sequence[str]) -> str:
        """Every generation is kept (prompt, completion, version, parameters) so feedback can refer to it."""
        recorded: dict[str, Any] = {
            "max_new_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
        }
        if stop:
            recorded["stop"] = list(stop)
        return self.generations.record(
            prompt, c.text, c.version, recorded, c.prompt_tokens, c.completion_tokens, generation_id=gid
        )

    def feedback(self, generation_id: str, rating: float | None, correction: str | None) -> Feedback:
        """A correction teaches (prompt + correction); a positive rating teaches (prompt + completion)
        weighted by the rating; each also becomes a preference (llmos/store/generations.py), as does
        a negative rating, which teaches nothing else."""
        sample: NewSample | None = None
        gen = self.generations.get(generation_id)
        if gen is not None:
            cut = len(gen.prompt)  # recall reads the answer given the prompt
            if correction is not None:
                sample = NewSample(
                    gen.prompt + correction,
                    FEEDBACK_SOURCE_PREFIX + "correction",
                    self.settings.feedback.correction_weight,
                    prompt_chars=cut,
                )
            elif rating is not None and rating > 0:
                sample = NewSample(
                    gen.prompt + gen.completion, FEEDBACK_SOURCE_PREFIX + "rating", rating, prompt_chars=cut
                )
        if sample is not None:  # a text to train: the queue's bound holds, as for ingest
            depth, limit = self.queue.depth_estimate(max_age_s=0.25), self.settings.limits.max_queue_depth
            if depth + 1 > limit:
                raise QueueFull(depth, limit)
        fb = self.generations.add_feedback(  # raises if unknown, or past feedback.max_per_generation
            generation_id, rating, correction, sample, self.settings.feedback.max_per_generation
        )
        if sample is not None or rating is not None:
            self.trainer.wake()
        return fb

    def checkpoints(self) -> tuple[int, list[CheckpointRecord]]:
        return self.registry.active_version(), self.registry.list()

    def metrics_history(self, last: int) -> list[CheckpointRecord]:
        return self.registry.index.history(last)

    def rollback(self, version: int, requeue: bool) -> RollbackResult:
        self.registry.rollback(version)  # raises UnknownVersion / RejectedVersion / CorruptCheckpoint
        self.engine.sync()  # serving switches now
        self.trainer.request_reset()  # training continues from it
        lineage = self.registry.lineage(version)
        n = self.queue.requeue_outside(lineage) if requeue else 0
        if requeue:
            self.preferences.requeue_outside(lineage)
        self.counters.rollback()
        log.info("rolled back to version %d (requeued %d samples)", version, n)
        return RollbackResult(version, n)

    def device_memory(self) -> dict[str, int]:
        """Bytes of accelerator memory (allocated by tensors, reserved by the caching allocator,
        total); empty on a CPU."""
        dev = self.factory.device
        if dev.type != "cuda":
            return {}
        return {
            "allocated": torch.cuda.memory_allocated(dev),
            "reserved": torch.cuda.memory_reserved(dev),
            "total": torch.cuda.get_device_properties(dev).total_memory,
        }

    def trainer_status(self) -> tuple[TrainerStatus, int, int]:
        return self.trainer.status(), self.queue.depth(), self.engine.current().version

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        problems = []
        if not self.engine.ready:
            problems.append("model not loaded")
        try:
            self.db.ping()
        except Exception as exc:  # the store is down: say so, do not crash
            problems.append(f"store unreachable: {type(exc).__name__}")
        if not self.trainer.alive:
            problems.append("trainer not running")
        # Degraded: serving works, but something needs an operator (e.g. checkpoints cannot be written).
        degraded = []
        last_error = self.trainer.status().last_error
        if last_error:
            degraded.append(f"trainer: {last_error}")
        degraded += [f"checkpoint {r.version} is corrupt: {r.corrupt}" for r in self.registry.list() if r.corrupt]
        return not problems, {"problems": problems, "degraded": degraded}

    def audit(
        self, actor: str, action: str, params: dict[str, Any], outcome: AuditOutcome, status: int, detail: str | None
    ) -> None:
        self.audit_log.record(actor, action, outcome, status, params, detail)

    def audit_entries(self, limit: int, before: int | None) -> list[AuditEntry]:
        return self.audit_log.list(limit, before)

    def check_admin(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode("utf-8"), self.admin_token.encode("utf-8"))


def freeze_startup_objects() -> None:
    """Move what the process holds now (modules, models, tokenizer: about 450k objects with the
    built-in model) out of the cyclic garbage collector's reach. A full collection walks every
    tracked object while holding the GIL: 250 ms here, a stall of every request and the trainer
    (the likely cause of a 282 ms gap between two tokens in a swap benchmark). Refcounting still
    frees these objects: a model and its training state (optimizer included) hold no reference
    cycles, so version 0's go when later versions replace them; only garbage in cycles stays."""
    gc.collect()
    gc.freeze()
