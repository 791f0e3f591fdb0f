"""The HTTP roles' parts: build them once from the settings (with the constructors of
llmos/wiring.py), start and stop them, and offer the service functions that the HTTP routes call
(one each). Two roles: "all" (llmos serve: the API and its trainer, in a process of its own or a
thread) and "api" (serve --role api: a replica with no trainer, following the store's active
version; the trainer runs alone, llmos train). Nothing below this module reads settings."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from llmos.memory import freeze_startup_objects
from llmos.registry.registry import CorruptCheckpoint
from llmos.serving.engine import ServingEngine
from llmos.serving.follow import Follower
from llmos.serving.text import TextStream
from llmos.serving.types import Completion, SamplingParams
from llmos.settings import Settings
from llmos.store import notify
from llmos.store.audit import AuditEntry, AuditLog, AuditOutcome
from llmos.store.checkpoints import CheckpointRecord
from llmos.store.db import Database
from llmos.store.forget import ForgetJob, ForgetJobs, ForgetRequest, Progress
from llmos.store.generations import Feedback, GenerationLog
from llmos.store.lease import TrainerLease
from llmos.store.lineage import Lineage, TextKind, VersionTexts, influenced
from llmos.store.preferences import PreferenceQueue
from llmos.store.queue import MIN_WEIGHT, NewSample, Sample, SampleQueue
from llmos.store.tables import CheckpointStatus
from llmos.trainer.elsewhere import RemoteTrainer
from llmos.trainer.loop import Trainer, TrainerStatus
from llmos.trainer.preprocess import FEEDBACK_SOURCE_PREFIX
from llmos.trainer.process import TrainerProcess
from llmos.wiring import (
    anchor_pool,
    build_trainer,
    model_factory,
    open_registry,
    replay_pool,
    thread_budget,
    trainer_config,
)

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin_token"


SCRUB_RETRY_S = 10.0  # after a scrub that failed
SCRUB_WARN_S = 60.0  # a compaction waits for readers of an older snapshot: say so past this
# The tables a forget job changes: where the database may still hold the old bytes.
SCRUBBED_TABLES = ("samples", "feedback", "preferences", "generations")


@dataclass(frozen=True)
class GenerationResult:
    generation_id: str
    completion: Completion


@dataclass(frozen=True)
class RollbackResult:
    active_version: int
    requeued: int


@dataclass(frozen=True)
class TextLineage:
    sample: Sample
    trained: list[tuple[int, TextKind, CheckpointStatus | None]]  # (version, how, its status), oldest first
    influenced: list[int]  # those versions and every descendant: what carries the text in its weights


@dataclass(frozen=True)
class VersionLineage:
    record: CheckpointRecord  # pruned ones too: lineage outlives the files
    texts: VersionTexts


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


Role = Literal["all", "api"]


class Daemon:
    """Owns the parts of one llmos process (the API process, when the trainer runs in its own)."""

    def __init__(self, settings: Settings, role: Role = "all") -> None:
        self.settings = settings
        self.role = role
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        threads = thread_budget(settings)
        torch.set_num_threads(threads.serving)  # for threads that start later; trainer and decoder set their own
        self.admin_token, self.admin_token_path = admin_token(settings)
        self.db = Database(settings.store_url, settings.store.busy_timeout_s, settings.store.idle_transaction_s)
        self.db.check_durable()  # raises StoreNotDurable: never acknowledge what a crash could lose
        self.db.create_schema()
        self.audit_log = AuditLog(self.db)
        self.queue = SampleQueue(self.db)
        self.preferences = PreferenceQueue(self.db)
        self.generations = GenerationLog(self.db, settings.store.keep_generations)
        self.lineage = Lineage(self.db)
        self.forget_jobs = ForgetJobs(self.db)
        self._scrub_lock = threading.Lock()
        self._scrub_stop = threading.Event()
        self.registry = open_registry(settings, self.db, remove_leftovers=role == "all")
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
        self.trainer: Trainer | TrainerProcess | RemoteTrainer
        # An API replica serves what other processes promote and roll back (all-in-one: its trainer tells it).
        self.follower = None
        if role == "api":
            listen = None if self.db.is_sqlite else partial(notify.listen, self.db, notify.ACTIVE_CHANNEL)
            self.follower = Follower(self.engine, settings.serving.follow_interval_s, listen)
        if role == "api":
            self.trainer = RemoteTrainer(TrainerLease(self.db), "unknown")
        elif settings.runtime.trainer == "process":
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
        if self.follower is not None:
            self.follower.start()
        self._scrub_in_background(self.forget_jobs.unscrubbed())  # a process stopped before it could
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
        self._scrub_stop.set()
        if self.follower is not None:
            self.follower.stop()
        self.trainer.stop()
        self.db.dispose()

    # ---- service functions (one per route) ---------------------------------------------------
    def ingest(self, items: list[NewSample]) -> list[str]:
        # backpressure (QueueFull): the sender waits, memory and disk do not grow
        with self.queue.room(len(items), self.settings.limits.max_queue_depth, max_age_s=0.25):
            ids = self.queue.enqueue(items)  # committed (durably) when this returns
        self.trainer.wake()
        return ids

    def sample(self, sample_id: str) -> Sample | None:
        return self.queue.get(sample_id)

    def text_lineage(self, sample_id: str) -> TextLineage | None:
        """The versions a text trained (its batch's, and those it was replayed into) and every
        version descended from them; None for an unknown id."""
        sample = self.queue.get(sample_id)
        if sample is None:
            return None
        trained = self.lineage.of_text(sample_id)
        status = self.registry.index.statuses([v for v, _ in trained])
        rows = [(v, kind, status.get(v)) for v, kind in trained]
        return TextLineage(sample, rows, influenced({v for v, _ in trained}, self.registry.index.parents()))

    def version_lineage(self, version: int, limit: int, offset: int) -> VersionLineage | None:
        """A version's record and a page of the texts that trained it; None for an unknown version."""
        record = self.registry.index.get(version, include_pruned=True)
        if record is None:
            return None
        return VersionLineage(record, self.lineage.of_version(version, limit, offset))

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
            elif rating is not None and rating >= MIN_WEIGHT:  # (a smaller one is a neutral rating)
                sample = NewSample(
                    gen.prompt + gen.completion, FEEDBACK_SOURCE_PREFIX + "rating", rating, prompt_chars=cut
                )
        # a text to train: the queue's bound holds, as for ingest
        with self.queue.room(int(sample is not None), self.settings.limits.max_queue_depth, max_age_s=0.25):
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

    def forget(self, request: ForgetRequest) -> ForgetJob:
        """Erase the texts ``request`` names and every version they trained (llmos/store/forget.py):
        when this returns, serving no longer uses them (it serves the newest version they did not
        influence), the trainer continues from there, and what those versions were taught is back
        in the queue. The scrub (files, the database's old bytes) follows in a thread. Raises
        UnknownTexts."""
        job, _texts = self.forget_jobs.start(request)
        try:
            self.engine.sync()  # serving switches now, if the active version was erased
        except CorruptCheckpoint:  # the version it fell back to fails verification: its newest ancestor that passes
            self._leave_corrupt_active()
            self.engine.sync()
        self.trainer.request_reset()  # the trainer drops what it held and goes on from the active version
        log.info(
            "forget job %s: %d texts erased, versions %s erased, %d texts to train again, serving version %s",
            job.id,
            job.forgotten,
            job.erased_versions,
            len(job.retrain),
            job.rolled_back_to if job.rolled_back_to is not None else "unchanged",
        )
        self._scrub_in_background([job])
        return job

    def forget_job(self, job_id: str) -> tuple[ForgetJob, Progress] | None:
        job = self.forget_jobs.get(job_id)
        if job is None:
            return None
        progress = self.forget_jobs.progress(job)
        if progress.done and job.finished_at is None:  # this read found it done and recorded when
            job = self.forget_jobs.get(job_id) or job
        return job, progress

    def _scrub_in_background(self, jobs: list[ForgetJob]) -> None:
        if jobs:
            threading.Thread(target=self._scrub, args=(jobs,), name="llmos-forget-scrub", daemon=True).start()

    def _scrub(self, jobs: list[ForgetJob]) -> None:
        """Delete the erased versions' files and make the database drop the old bytes; then the
        jobs are scrubbed. Until then they stay open: a failure (the store down) is tried again
        after a while, and a process stopped meanwhile does it at its next start."""
        while True:
            try:
                with self._scrub_lock:
                    self.registry.remove_erased()
                    started, wait, warned = time.monotonic(), 0.05, False
                    while not self.db.compact(SCRUBBED_TABLES):  # a reader holds an old snapshot
                        if not warned and time.monotonic() - started > SCRUB_WARN_S:
                            log.warning("forget: a reader of the database keeps it from dropping old bytes; retrying")
                            warned = True
                        if self._scrub_stop.wait(wait):
                            return  # stopping: the next start scrubs again
                        wait = min(wait * 2, 5.0)
                    for job in jobs:
                        self.forget_jobs.mark_scrubbed(job.id)
                    return
            except Exception:
                log.exception("forget: the scrub failed; trying again in %.0f s", SCRUB_RETRY_S)
            if self._scrub_stop.wait(SCRUB_RETRY_S):
                return

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
