"""Wiring: build every part once from the settings, start and stop them, and offer the service
functions that the HTTP routes call (one each). Nothing below this module reads settings."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmos.model.loader import ModelFactory, resolve_base, resolve_device
from llmos.registry.registry import Registry
from llmos.serving.engine import ServingEngine
from llmos.serving.types import Completion, SamplingParams
from llmos.settings import Settings
from llmos.store.checkpoints import CheckpointIndex, CheckpointRecord
from llmos.store.db import Database
from llmos.store.generations import Feedback, GenerationLog
from llmos.store.queue import NewSample, Sample, SampleQueue
from llmos.trainer.evaluate import EvalConfig
from llmos.trainer.loop import Trainer, TrainerConfig, TrainerStatus
from llmos.trainer.preprocess import FEEDBACK_SOURCE_PREFIX, PreprocessConfig
from llmos.trainer.state import OptimizerConfig

log = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin_token"


@dataclass(frozen=True)
class GenerationResult:
    generation_id: str
    completion: Completion


@dataclass(frozen=True)
class RollbackResult:
    active_version: int
    requeued: int


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


def trainer_config(settings: Settings, device: torch.device) -> TrainerConfig:
    t = settings.train
    bf16 = settings.model.precision == "bf16" or (settings.model.precision == "auto" and device.type == "cuda")
    return TrainerConfig(
        preprocess=PreprocessConfig(t.block_size, t.max_sample_tokens, t.heldout_fraction),
        optimizer=OptimizerConfig(t.lr, t.betas, t.weight_decay, t.warmup_steps, t.grad_clip),
        eval=EvalConfig(settings.eval.tolerance, t.micro_batch),
        micro_batch=t.micro_batch,
        passes_per_batch=t.passes_per_batch,
        batch_tokens=t.batch_tokens,
        batch_max_samples=t.batch_max_samples,
        fill_wait_s=t.fill_wait_s,
        poll_interval_s=t.poll_interval_s,
        evaluate_every_steps=t.evaluate_every_steps,
        evaluate_every_s=t.evaluate_every_s,
        eval_max_samples=settings.eval.max_samples,
        error_backoff_s=t.error_backoff_s,
        bf16=bf16,
        seed=settings.model.seed,
    )


class Daemon:
    """Owns the parts of one llmos process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        threads = settings.runtime.torch_threads or max(1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(threads)
        self.admin_token, self.admin_token_path = admin_token(settings)
        self.db = Database(settings.store_url, settings.store.busy_timeout_s)
        self.db.create_schema()
        self.queue = SampleQueue(self.db)
        self.generations = GenerationLog(self.db)
        self.registry = Registry(
            settings.data_dir / "checkpoints", CheckpointIndex(self.db), settings.registry.keep_last
        )
        self.registry.open()
        device = resolve_device(settings.model.device)
        base = resolve_base(settings.model.name_or_path, settings.data_dir, settings.model.seed)
        self.factory = ModelFactory(base, device)
        self.engine = ServingEngine(self.factory, self.registry, settings.serving.max_concurrency)
        self.trainer = Trainer(trainer_config(settings, device), self.queue, self.registry, self.engine, self.factory)

    def start(self) -> None:
        requeued = self.queue.requeue_stale()  # a previous process died holding these
        if requeued:
            log.info("returned %d samples left in training to the queue", requeued)
        self.engine.sync()
        self.trainer.start()

    def stop(self) -> None:
        self.trainer.stop()
        self.db.dispose()

    # ---- service functions (one per route) ---------------------------------------------------
    def ingest(self, items: list[NewSample]) -> list[str]:
        ids = self.queue.enqueue(items)  # committed (durably) when this returns
        self.trainer.wake()
        return ids

    def sample(self, sample_id: str) -> Sample | None:
        return self.queue.get(sample_id)

    def generate(self, prompt: str, params: SamplingParams) -> GenerationResult:
        c = self.engine.generate(prompt, params)
        gid = self.generations.record(
            prompt=prompt,
            completion=c.text,
            model_version=c.version,
            params={
                "max_new_tokens": params.max_new_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "seed": params.seed,
            },
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
        )
        return GenerationResult(gid, c)

    def feedback(self, generation_id: str, rating: float | None, correction: str | None) -> Feedback:
        """A correction teaches (prompt + correction); a positive rating teaches (prompt + completion)
        weighted by the rating; a negative rating is only stored."""
        sample: NewSample | None = None
        gen = self.generations.get(generation_id)
        if gen is not None:
            if correction is not None:
                sample = NewSample(
                    gen.prompt + correction,
                    FEEDBACK_SOURCE_PREFIX + "correction",
                    self.settings.feedback.correction_weight,
                )
            elif rating is not None and rating > 0:
                sample = NewSample(gen.prompt + gen.completion, FEEDBACK_SOURCE_PREFIX + "rating", rating)
        fb = self.generations.add_feedback(generation_id, rating, correction, sample)  # raises if unknown
        if sample is not None:
            self.trainer.wake()
        return fb

    def checkpoints(self) -> tuple[int, list[CheckpointRecord]]:
        return self.registry.active_version(), self.registry.list()

    def rollback(self, version: int, requeue: bool) -> RollbackResult:
        self.registry.rollback(version)  # raises UnknownVersion / RejectedVersion / CorruptCheckpoint
        self.engine.sync()  # serving switches now
        self.trainer.request_reset()  # training continues from it
        n = self.queue.requeue_outside(self.registry.lineage(version)) if requeue else 0
        log.info("rolled back to version %d (requeued %d samples)", version, n)
        return RollbackResult(version, n)

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
        return not problems, {"problems": problems}

    def check_admin(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode("utf-8"), self.admin_token.encode("utf-8"))
