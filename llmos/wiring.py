"""Small constructors that build llmos's parts from the settings, one each, for every role to
assemble what it needs: the all-in-one server and the API replica (llmos/daemon.py), the trainer
process (llmos/trainer/process.py) and the trainer alone (llmos/trainer/alone.py). This module
imports downward only (settings, model, registry, store, trainer stages): nothing it imports
imports it back. Nothing below it reads settings."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmos.model.builtin import has_random_weights
from llmos.model.loader import BUILTIN_TINY, LoraSpec, ModelFactory, resolve_base, resolve_device
from llmos.registry.registry import Registry
from llmos.settings import Settings
from llmos.store.checkpoints import CheckpointIndex
from llmos.store.db import Database
from llmos.store.lease import TrainerLease
from llmos.store.preferences import PreferenceQueue
from llmos.store.queue import SampleQueue
from llmos.store.reservoir import Reservoir
from llmos.store.tables import SampleStatus
from llmos.threads import ThreadBudget
from llmos.trainer.collapse import CollapseConfig
from llmos.trainer.evaluate import EvalConfig
from llmos.trainer.loop import Serving, Trainer, TrainerConfig
from llmos.trainer.optimize import PreferenceConfig
from llmos.trainer.preprocess import PreprocessConfig
from llmos.trainer.regularize import RegularizationConfig
from llmos.trainer.rehearsal import RehearsalConfig
from llmos.trainer.state import OptimizerConfig


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
    pretrained = not has_random_weights(settings.model.name_or_path)
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


def open_registry(settings: Settings, db: Database, remove_leftovers: bool = False) -> Registry:
    """The checkpoint registry. Leftovers of interrupted writes are removed by the trainer when it
    takes the store's trainer lease (llmos/trainer/loop.py), or here where asked (a single box,
    before its trainer starts): an API replica or a standby must not, while a trainer writes."""
    registry = Registry(settings.data_dir / "checkpoints", CheckpointIndex(db), settings.registry.keep_last)
    registry.open(remove_leftovers)
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
