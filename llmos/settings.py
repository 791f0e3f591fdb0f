"""One settings tree, built once at start and passed down.

Precedence, highest first: explicit CLI values, ``LLMOS_...`` environment variables
(nested fields with ``__``, e.g. ``LLMOS_TRAIN__LR=1e-3``), the YAML file, the defaults below.
``configs/default.yaml`` mirrors these defaults; a test keeps the two equal.
An unknown key anywhere is an error that names the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerSettings(_Section):
    host: str = Field("127.0.0.1", description="Address to bind; loopback unless told otherwise.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 picks a free one).")
    max_text_chars: int = Field(32_768, gt=0, description="Longest text accepted by POST /v1/texts, in characters.")
    max_prompt_chars: int = Field(16_384, gt=0, description="Longest prompt accepted by /generate, in characters.")
    max_body_bytes: int = Field(
        1 << 20, gt=0, description="Largest request body, counted as it streams in (413 past it)."
    )
    shutdown_timeout_s: int = Field(
        20,
        ge=1,
        description="After SIGTERM, how long requests in flight may take to finish before they are cut; keep "
        "it under the service manager's kill timeout (Docker and Kubernetes: 30 s).",
    )
    head_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A request's head (request line and headers) must arrive within this; else "
        "the connection is closed.",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A request's body must arrive within this of its head; else the connection is closed.",
    )


class AuthSettings(_Section):
    admin_token: str | None = Field(
        None, description="Bearer token for /v1/admin/*; made and kept in <data_dir>/admin_token when unset."
    )
    api_keys: list[Annotated[str, Field(min_length=16)]] = Field(
        default_factory=list,
        description="Bearer keys for ingest, feedback and generation; empty = open (allowed on loopback only).",
    )

    @model_validator(mode="after")
    def _admin_token_is_not_an_api_key(self) -> AuthSettings:
        if self.admin_token is not None and self.admin_token in self.api_keys:
            raise ValueError("the admin token must not also be an API key")
        return self


class LimitsSettings(_Section):
    key_rate_per_s: float = Field(
        50.0, ge=0, description="Requests per second per API key or admin token; 0 = no limit (open API: none)."
    )
    key_burst: int = Field(1000, ge=1, description="Requests a key may make at once before its rate applies.")
    source_rate_per_s: float = Field(
        20.0, ge=0, description="Texts per second accepted per 'source' label; 0 = no limit."
    )
    source_burst: int = Field(1000, ge=1, description="Texts one source may send at once before its rate applies.")
    max_tracked: int = Field(
        10_000, ge=1, description="Keys and sources tracked at once; the least recently seen are forgotten."
    )
    max_queue_depth: int = Field(
        100_000, ge=1, description="Most texts waiting to be trained; ingest gets 429 past it."
    )
    queue_full_retry_after_s: int = Field(
        10, ge=1, description="Retry-After, in seconds, sent with a 429 for a full queue."
    )
    storage_url: str | None = Field(
        None,
        pattern=r"^(redis|rediss|redis\+unix|redis\+sentinel|redis\+cluster)://",
        description="Where the rate limits are counted: none = in memory, per process; a Redis URL "
        "(redis://host:6379/0) = shared, so that API replicas share each key's and each source's budget.",
    )


class StoreSettings(_Section):
    url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/llmos.db (WAL, synchronous=FULL)."
    )
    busy_timeout_s: float = Field(30.0, gt=0, description="How long a SQLite writer waits for the write lock.")
    idle_transaction_s: float = Field(
        60.0,
        ge=0,
        description="PostgreSQL: end a session left idle inside a transaction this long (a paused process), so "
        "that its row locks, the trainer lease's among them, do not hold every other writer (0 = never).",
    )
    keep_generations: int = Field(
        100_000,
        ge=1,
        description="Generations kept (the newest), besides those with feedback or preferences: feedback "
        "on an older one is 404.",
    )


class ModelSettings(_Section):
    name_or_path: str = Field(
        "builtin:tiny", description="'builtin:tiny', a local Hugging Face model directory, or a hub id."
    )
    device: str = Field("auto", description="'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Training arithmetic: bf16 autocast or fp32; auto = bf16 on CUDA, and on CPUs with bf16 "
        "instructions (AVX512-BF16, AMX) when all weights train (not LoRA); else fp32.",
    )
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto",
        description="Attention kernels: auto = eager for the built-in model on a CPU (its short blocks trained "
        "1.6x faster than with PyTorch's SDPA kernels there), else the model's default (sdpa).",
    )
    seed: int = Field(0, description="Seed for the built-in model's initialisation and the trainer's shuffling.")


class OptimizerSettings(_Section):
    name: Literal["adamw", "sgd", "momentum"] = Field(
        "adamw", description="adamw (default), sgd (plain), or momentum (SGD with momentum)."
    )
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (reached after warm-up).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (decoupled for AdamW, L2 for SGD).")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum factor of the momentum optimizer.")
    nesterov: bool = Field(False, description="Nesterov momentum (momentum optimizer only).")
    warmup_steps: int = Field(10, ge=0, description="Linear learning-rate warm-up from 0, in optimizer steps.")
    schedule: Literal["constant", "inverse_sqrt"] = Field(
        "constant", description="After warm-up: constant, or decay as sqrt(warmup / step)."
    )


class LoraSettings(_Section):
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: int = Field(32, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path.")
    targets: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear' (peft picks every linear layer)."
    )


class TrainSettings(_Section):
    mode: Literal["full", "lora"] = Field(
        "full", description="full: every weight trains; lora: the base stays frozen, checkpoints hold the adapter."
    )
    lora: LoraSettings = LoraSettings()
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp, each rank holds the whole training state; fsdp, the weights, gradients "
        "and optimizer moments are sharded over the ranks (FSDP2), and rank 0 keeps one full copy of the "
        "weights to evaluate and checkpoint (full mode, regularization none).",
    )
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 = off).")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches whose gradients add up to one optimizer step.")
    max_source_fraction: float = Field(
        0.5, gt=0, le=1, description="Most of one batch (in samples) that a single source may fill."
    )
    lease_s: float = Field(
        300.0, gt=0, description="A claimed sample whose lease is not renewed for this long returns to the queue."
    )
    trainer_lease_s: float = Field(
        30.0,
        gt=0,
        description="One trainer per store: a standby takes over once the trainer has not renewed its lease "
        "for this long (at once from a dead process on the standby's machine).",
    )
    block_size: int = Field(128, ge=8, description="Tokens per packed training block.")
    micro_batch: int = Field(8, ge=1, description="Blocks per optimizer step.")
    batch_tokens: int = Field(8192, ge=64, description="Most tokens (approximated by UTF-8 bytes) claimed per batch.")
    batch_max_samples: int = Field(512, ge=1, description="Most samples claimed per batch.")
    fill_wait_s: float = Field(0.5, ge=0, description="After the first sample arrives, wait this long for more.")
    fill_quiet_s: float = Field(
        0.1,
        ge=0,
        description="...but stop waiting once no sample arrived for this long (0 = wait all of fill_wait_s).",
    )
    passes_per_batch: int = Field(
        100,
        ge=1,
        description="Most passes over a claimed batch (a text needs tens of passes to be learned); the early "
        "stop ends them once the batch is learned.",
    )
    early_stop_patience: int = Field(
        20,
        ge=0,
        description="Passes over a batch end once it is learned (every text recalled, every preference "
        "pair right), or after this many passes in a row that lowered its loss by less than 1% "
        "(0 = always make every pass).",
    )
    max_sample_tokens: int = Field(8192, ge=1, description="Longer samples are rejected in preprocess.")
    heldout_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Fraction of texts (and preferences) kept out of training to measure generalisation, "
        "chosen by hash; never a correction, a rated completion or a text sent more than once.",
    )
    poll_interval_s: float = Field(1.0, gt=0, description="How often an idle trainer looks at the queue.")
    evaluate_every_steps: int = Field(
        0, ge=0, description="Evaluate and checkpoint after this many steps (0 = after every claimed batch)."
    )
    evaluate_every_s: float = Field(0, ge=0, description="...or once this many seconds have passed (0 = off).")
    error_backoff_s: float = Field(5.0, ge=0, description="Pause after an unexpected trainer error before retrying.")
    yield_to_requests_s: float = Field(
        0.2,
        ge=0,
        description="A trainer thread (runtime.trainer = thread): between steps (and evaluation "
        "micro-batches), wait up to this long while generations are in flight (0 = never). A trainer "
        "process does not wait.",
    )
    metrics_host: str = Field("127.0.0.1", description="The trainer alone (llmos train): address of its metrics port.")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="The trainer alone (llmos train): serve /metrics and /healthz here (0 = off)."
    )


class CollapseSettings(_Section):
    probe_prompts: list[str] = Field(
        default_factory=lambda: [
            "The",
            "Hello, my name is",
            "Q: What is",
            "1, 2, 3,",
            "Once upon a time",
            "It was",
            "Today I",
            "你好",
        ],
        description="Prompts every candidate continues greedily for the collapse guards (empty = no guards).",
    )
    probe_tokens: int = Field(32, ge=4, description="Tokens generated per probe prompt.")
    min_entropy: float = Field(
        0.01,
        ge=0,
        description="Refuse a candidate whose mean next-token entropy (nats) on the probes falls below "
        "this, and below the active version's (0 = off).",
    )
    min_distinct: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Refuse a candidate whose fraction of distinct 3-grams in its probe continuations falls "
        "below this, and below the active version's (0 = off).",
    )
    max_kl: float = Field(
        0.0,
        ge=0,
        description="Refuse a candidate whose mean KL divergence (nats per token) from the base model on "
        "its probe continuations exceeds this, and the active version's (0 = off: the built-in model "
        "starts from random weights, ~5 nats from anything learned; ~1-2 suits a pretrained base).",
    )


class EvalSettings(_Section):
    max_samples: int = Field(
        64,
        ge=1,
        description="Most texts in each measured set: recent held-out texts, texts taught since the last "
        "checkpoint (their recall), held-out preference pairs.",
    )
    heldout_budget: float = Field(
        1.0,
        ge=0,
        description="Gate: held-out loss may exceed the active version's by this fraction (1.0 = refuse a "
        "version that doubles it); a smaller rise is what learning new facts costs on unseen ones.",
    )
    forgetting_budget: float = Field(
        1.0,
        ge=0,
        description="Gate: anchor (retention) loss may exceed the active version's by this fraction "
        "(1.0 = refuse a version that doubles it; tighten for stricter retention).",
    )
    min_source_anchors: int = Field(
        8,
        ge=1,
        description="Anchors a source needs to be checked as a group of its own; sources with fewer are "
        "checked together, so no caller can veto versions with sources of one text each.",
    )
    preference_tolerance: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Gate: preference accuracy on held-out pairs may fall below the active version's by this much.",
    )
    anchor_capacity: int = Field(
        256, ge=0, description="Size of the anchor set: a reservoir sample of all held-out data ever seen."
    )
    anchor_file: Path | None = Field(
        None, description="Optional JSONL file of texts ({'text': ...}) always in the anchor set."
    )
    collapse: CollapseSettings = CollapseSettings()


class ReplaySettings(_Section):
    enabled: bool = Field(True, description="Mix earlier trained samples into each batch against forgetting.")
    ratio: float = Field(0.5, ge=0, lt=1, description="Fraction of each batch's samples drawn from the replay pool.")
    capacity: int = Field(4096, ge=1, description="Replay pool size: a reservoir sample of trained samples.")
    min_samples: int = Field(
        32, ge=0, description="Replay at least this many samples per batch, so a tiny batch cannot overwrite much."
    )
    base_rehearsal: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Also pack texts sampled from the base model into each pass, so that what the base knew "
        "is kept (see docs/learning.md); auto: on for a pretrained model, off for random weights llmos made (the "
        "built-in model, or a directory holding llmos-random-weights.json).",
    )
    base_per_pass: int = Field(
        128, ge=1, description="Base rehearsal: texts from the pool packed into each pass over a batch (drawn afresh)."
    )
    base_pool: int = Field(1024, ge=1, description="Base rehearsal: texts sampled from the base once, drawn from.")
    base_max_tokens: int = Field(64, ge=1, description="Base rehearsal: the longest text sampled, in tokens.")
    base_loss: Literal["kl", "lm"] = Field(
        "kl",
        description="Base rehearsal: train the texts toward the base's next-token distributions (kl: "
        "distillation) or their sampled tokens (lm).",
    )


class RegularizationSettings(_Section):
    method: Literal["none", "l2sp", "ewc"] = Field(
        "none", description="Pull toward the anchor weights: L2-SP, or EWC with a diagonal Fisher."
    )
    strength: float = Field(1.0, ge=0, description="Penalty weight (lambda); scale differs between methods.")
    fisher_batches: int = Field(8, ge=1, description="EWC: micro-batches of anchor data for the Fisher estimate.")


class RegistrySettings(_Section):
    keep_last: int = Field(5, ge=1, description="Checkpoints kept on disk besides version 0 and the active one.")


class ServingSettings(_Section):
    max_concurrency: int = Field(
        32,
        ge=1,
        description="Generations decoded at once, batched into one forward pass per token (per width class: "
        "see docs/operations.md); others wait for a place in the batch.",
    )
    max_new_tokens_cap: int = Field(
        1024, ge=1, description="Largest max_new_tokens a request may ask for (422 past it)."
    )
    kv_cache_tokens: int = Field(
        0,
        ge=0,
        description="KV cache the generations in progress may take, in token positions: each its prompt "
        "and max_new_tokens, decoding or waiting; past it a request gets 429 with Retry-After, and a batch "
        "admits a row only while its rows times its longest fit. 0 = 256 x max_requests.",
    )
    prefill_chunk_tokens: int = Field(
        64,
        ge=0,
        description="Prompts longer than this run at most this many tokens at a time, one chunk with each "
        "decoding step (in its forward pass where the model allows), each chunk sized (measured as it runs) to "
        "add no more than a decoding step, so that a long prompt does not stall the batch's tokens (0 = a prompt "
        "runs whole).",
    )
    max_requests: int = Field(
        256,
        ge=1,
        description="Generation requests the server holds at once, decoding or waiting for a place in the "
        "batch; past it a request gets 429 with Retry-After.",
    )
    model_name: str = Field(
        "llmos",
        min_length=1,
        max_length=64,
        pattern=r"^[^@\s]+$",
        description="Model name of the OpenAI-compatible API: '<name>' is the active version, '<name>@<v>' pins v.",
    )
    pinned_versions: int = Field(
        2, ge=1, description="Pinned versions ('<name>@<v>') kept loaded besides the active one (LRU)."
    )
    follow_interval_s: float = Field(
        0.5,
        gt=0,
        description="An API replica (serve --role api): how often it reads the store's active version, to serve "
        "what another process promoted or rolled back.",
    )


class RuntimeSettings(_Section):
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads of the decoding thread, and of the trainer while generations "
        "come (0 = half the cores, at least 1).",
    )
    torch_threads_idle: int = Field(
        0,
        ge=0,
        description="torch intra-op threads of the trainer once no generation has run for "
        "torch_threads_quiet_s (0 = torch_threads: off; never fewer). Opt-in: see docs/limits.md.",
    )
    torch_threads_quiet_s: float = Field(
        1.0,
        ge=0,
        description="Seconds without a generation before the trainer takes torch_threads_idle (a steady "
        "stream of requests keeps it at torch_threads).",
    )
    trainer: Literal["thread", "process"] = Field(
        "process",
        description="Where the trainer runs: a process of its own that the server starts and restarts "
        "(generation and training do not share an interpreter lock), or a thread of the server's "
        "process (it holds one copy of the weights less, and no fork server; see docs/limits.md).",
    )
    trainer_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Linux: nice value of the trainer's thread (higher = generations, and the "
        "machine's other work, get the CPU first; training slows when the machine is busy; "
        "0 = the same priority as serving).",
    )


class FeedbackSettings(_Section):
    correction_weight: float = Field(
        2.0, gt=0, description="Loss weight of a (prompt + correction) sample (plain text weighs 1)."
    )
    preference: Literal["dpo", "kto", "none"] = Field(
        "dpo",
        description="Preference loss against the served version: dpo trains pairs (a correction over the "
        "completion it corrects); kto trains those and lone thumbs up/down; none = only the texts train.",
    )
    beta: float = Field(0.1, gt=0, description="DPO/KTO beta: how far preferences may pull from the reference.")
    preference_weight: float = Field(1.0, gt=0, description="Scale of the preference loss in its optimizer step.")
    preference_batch: int = Field(32, ge=1, description="Most preferences claimed per batch.")
    max_per_generation: int = Field(
        8,
        ge=1,
        description="Feedback entries one generation takes (409 past it): each correction is a text to train, "
        "so one generation cannot be fed any number of them.",
    )


class Settings(BaseSettings):
    """The whole configuration of one llmos process."""

    model_config = SettingsConfigDict(
        env_prefix="LLMOS_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    data_dir: Path = Field(Path("./llmos-data"), description="Where the store, models and checkpoints live.")
    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitsSettings = LimitsSettings()
    store: StoreSettings = StoreSettings()
    model: ModelSettings = ModelSettings()
    optimizer: OptimizerSettings = OptimizerSettings()
    train: TrainSettings = TrainSettings()
    replay: ReplaySettings = ReplaySettings()
    regularization: RegularizationSettings = RegularizationSettings()
    eval: EvalSettings = EvalSettings()
    registry: RegistrySettings = RegistrySettings()
    serving: ServingSettings = ServingSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    feedback: FeedbackSettings = FeedbackSettings()

    @model_validator(mode="after")
    def _across_sections(self) -> Settings:
        self.check()
        return self

    def check(self) -> None:
        """Rules across sections (ValueError)."""
        if self.train.parallel == "fsdp" and self.train.mode != "full":
            raise ValueError("train.parallel fsdp trains every weight: it needs train.mode full")
        if self.train.parallel == "fsdp" and self.regularization.method != "none":
            raise ValueError("train.parallel fsdp has no regularization yet: it needs regularization.method none")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives through init kwargs (see load_settings), so env must outrank it:
        # env first, then init (YAML merged with CLI values, CLI already on top).
        return (env_settings, init_settings)

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{self.data_dir / 'llmos.db'}"


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and why."""


def _format_error(err: ValidationError, source: str, prefix: tuple[str, ...] = ()) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in (*prefix, *e["loc"]))
        if e["type"] in ("extra_forbidden", "no_such_attribute"):
            lines.append(f"unknown key '{key}'")
        else:
            lines.append(f"'{key}': {e['msg']}")
    return f"invalid configuration ({source}): " + "; ".join(lines)


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings: defaults < YAML file < LLMOS_* environment < explicit overrides.

    ``config_file`` falls back to ``$LLMOS_CONFIG``. Overrides use dotted keys
    (``{"server.port": 9000}``); a value of None means "not given".
    """
    path = config_file or os.environ.get("LLMOS_CONFIG")
    data: dict[str, Any] = {}
    source = "defaults and environment"
    if path:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    admin_token = os.environ.get("LLMOS_ADMIN_TOKEN")
    if admin_token:
        overrides = {"auth.admin_token": admin_token, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from exc
    except SettingsError as exc:  # an LLMOS_* value that is not valid JSON for a section or list
        raise ConfigError(f"invalid configuration (environment): {exc}") from exc
    # CLI values outrank the environment, so they are applied after construction.
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        target: Any = settings
        try:
            for p in parents:
                target = getattr(target, p)
            setattr(target, leaf, value)
        except AttributeError as exc:
            raise ConfigError(f"invalid configuration (overrides): unknown key '{dotted}'") from exc
        except ValidationError as exc:
            # Assignment errors are located relative to the section; name the full key.
            raise ConfigError(_format_error(exc, "overrides", tuple(parents))) from exc
    try:
        settings.check()  # rules across sections, with the overrides too
    except ValueError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    return settings
