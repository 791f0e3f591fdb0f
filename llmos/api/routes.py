"""HTTP routes: validate, call one service function, shape the response."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import JSONResponse, StreamingResponse

from llmos.api.deps import (
    AdminDep,
    ApiKey,
    ApiKeyDep,
    AuditDep,
    DaemonDep,
    KeyringDep,
    SlotsDep,
    SourceLimiterDep,
    too_many,
)
from llmos.api.relay import Busy, End, Relay, Slots, call
from llmos.api.schemas import (
    URL_INT,
    AuditEntryOut,
    AuditOut,
    CheckpointOut,
    CheckpointsOut,
    FeedbackIn,
    FeedbackOut,
    ForgetIn,
    ForgetJobOut,
    GenerateIn,
    GenerateOut,
    GenerateQuery,
    IdsOut,
    MetricsHistoryOut,
    MetricsPoint,
    ReadyOut,
    RollbackIn,
    RollbackOut,
    TextLineageOut,
    TextOrTexts,
    TextOut,
    TextsIn,
    TrainedInOut,
    TrainerOut,
    VersionLineageOut,
    VersionTextOut,
    error_responses,
)
from llmos.daemon import Daemon, GenerationResult
from llmos.registry.registry import CorruptCheckpoint, RejectedVersion, UnknownVersion
from llmos.serving.types import CacheFull, PromptTooLong, SamplingParams
from llmos.store.forget import ForgetJob, ForgetRequest, Progress, UnknownTexts
from llmos.store.generations import FeedbackLimit, UnknownGeneration
from llmos.store.queue import IdempotencyConflict, NewSample, QueueFull
from llmos.trainer.elsewhere import TrainerElsewhere

log = logging.getLogger(__name__)
router = APIRouter()
GREEDY_BELOW = 1e-5  # a temperature under this is served greedily (as vLLM does)
TOP_P_FLOOR = 1e-6  # under the top probability of any vocabulary below a million tokens


_BODY_ERRORS = (400, 401, 413, 422, 429)
_ADMIN_ERRORS = (400, 401, 403, 413, 422)


def is_row_name(value: str) -> bool:
    """Whether a path parameter can name a stored row (an id): not longer than one, and no NUL,
    which PostgreSQL refuses in a query. Anything else is simply not found (404)."""
    return len(value) <= 64 and "\x00" not in value


@router.post(
    "/v1/texts",
    status_code=202,
    response_model=IdsOut,
    tags=["data"],
    responses=error_responses(409, *_BODY_ERRORS),
)
def post_texts(body: TextOrTexts, daemon: DaemonDep, sources: SourceLimiterDep, caller: ApiKeyDep) -> IdsOut:
    """Queue one text or a batch; the ids are returned only once the rows are committed.
    429 with Retry-After when a source sends faster than its rate or the queue is full. An
    idempotency key belongs to the credential that sent it; sent again with the same text it
    answers the first id, with another text 409."""
    items = body.items if isinstance(body, TextsIn) else [body]
    limit = daemon.settings.server.max_text_chars
    for i, it in enumerate(items):
        if len(it.text) > limit:
            where = f"items[{i}].text" if isinstance(body, TextsIn) else "text"
            raise HTTPException(
                422, f"{where} is {len(it.text)} characters; the limit is {limit} (server.max_text_chars)"
            )
    per_source: dict[str, float] = {}
    for it in items:
        if it.source is not None:
            per_source["source:" + it.source] = per_source.get("source:" + it.source, 0) + 1
    wait = sources.take(per_source)
    if wait == math.inf:
        raise HTTPException(
            422, f"one request holds more texts from one source than limits.source_burst ({sources.burst}) allows"
        )
    if wait:
        raise too_many(
            f"rate limit: {sources.rate_per_s:g} texts per second per source, bursts of {sources.burst} "
            "(limits.source_rate_per_s, limits.source_burst); retry later",
            wait,
        )
    try:
        ids = daemon.ingest(
            [NewSample(it.text, it.source, it.weight, _scoped(caller.id, it.idempotency_key)) for it in items]
        )
    except IdempotencyConflict as exc:
        raise HTTPException(409, f"{exc}: a retry sends the same text, a new text a new key") from exc
    except QueueFull as exc:
        raise _queue_full(exc, daemon) from exc
    return IdsOut(ids=ids)


def _queue_full(exc: QueueFull, daemon: Daemon) -> HTTPException:
    return too_many(f"{exc} (limits.max_queue_depth); retry later", daemon.settings.limits.queue_full_retry_after_s)


def _scoped(caller_id: str, key: str | None) -> str | None:
    """An idempotency key as stored: one namespace per credential (the same key from two callers
    is two texts, and one cannot find another's id by guessing its keys)."""
    return None if key is None else "k1:" + hashlib.sha256(f"{caller_id}\n{key}".encode()).hexdigest()


@router.get(
    "/v1/texts/{sample_id}",
    response_model=TextOut,
    dependencies=[ApiKey],
    tags=["data"],
    responses=error_responses(401, 404, 429),
)
def get_text(sample_id: str, daemon: DaemonDep) -> TextOut:
    s = daemon.sample(sample_id) if is_row_name(sample_id) else None
    if s is None:
        raise HTTPException(404, f"no text with id '{sample_id[:64]}'")
    return TextOut(
        id=s.id,
        status=s.status.value,
        reason=s.reason,
        trained_in_version=s.trained_in_version,
        created_at=s.created_at,
    )


async def _generate(req: GenerateIn, daemon: Daemon, slots: Slots) -> GenerateOut | StreamingResponse:
    limit = daemon.settings.server.max_prompt_chars
    if len(req.prompt) > limit:
        raise HTTPException(
            422, f"prompt is {len(req.prompt)} characters; the limit is {limit} (server.max_prompt_chars)"
        )
    cap = daemon.settings.serving.max_new_tokens_cap
    if req.max_new_tokens > cap:
        raise HTTPException(
            422, f"max_new_tokens is {req.max_new_tokens}; the limit is {cap} (serving.max_new_tokens_cap)"
        )
    # Below GREEDY_BELOW sampling is argmax in all but name, and logits / temperature overflows.
    temperature = req.temperature if req.temperature >= GREEDY_BELOW else 0.0
    # A top_p below TOP_P_FLOOR keeps only the most likely token, as TOP_P_FLOOR does; far below it,
    # it would round to 0 in float32 and keep nothing.
    top_p = max(req.top_p, TOP_P_FLOOR)
    params = SamplingParams(req.max_new_tokens, temperature, top_p, req.seed)
    try:
        if req.stream:
            return await _generate_events(daemon, slots, req.prompt, params)
        r = await call(slots, lambda: daemon.generate(req.prompt, params), "llmos-generate")
    except PromptTooLong as exc:
        raise HTTPException(422, str(exc)) from exc
    except Busy as exc:
        raise too_many(f"{exc} (serving.max_requests); retry later", 1.0) from exc
    except CacheFull as exc:
        raise too_many(f"{exc} (serving.kv_cache_tokens); retry later", 1.0) from exc
    c = r.completion
    return GenerateOut(
        generation_id=r.generation_id,
        text=c.text,
        model_version=c.version,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        finish_reason=c.finish_reason,
    )  # type: ignore[arg-type]


def _sse(data: dict[str, object], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _generate_events(daemon: Daemon, slots: Slots, prompt: str, params: SamplingParams) -> StreamingResponse:
    """Server-Sent Events: {"text": delta} per chunk, then event "done" with the result. The first
    chunk is made before the response starts, so a prompt too long still gets a plain 422.

    The generation runs on a thread of its own (relay.py). A client that goes away during the
    stream stops it at the next chunk; one whose response never starts cannot keep its place in
    the batch either: the generation then runs to its end (max_new_tokens at most) unread."""
    events: Relay[str | GenerationResult] = Relay(slots, lambda: daemon.generate_stream(prompt, params), "llmos-sse")
    first = await events.next()
    if isinstance(first, Exception):
        raise first

    async def body() -> AsyncIterator[str]:
        item: str | GenerationResult | Exception | End = first
        try:
            while not isinstance(item, End):
                if isinstance(item, Exception):  # the status line is gone: say so in the stream
                    log.error("streamed generation failed", exc_info=item)
                    yield _sse({"detail": f"generation failed: {type(item).__name__}"}, "error")
                    break
                if isinstance(item, GenerationResult):
                    c = item.completion
                    done = {
                        "generation_id": item.generation_id,
                        "model_version": c.version,
                        "prompt_tokens": c.prompt_tokens,
                        "completion_tokens": c.completion_tokens,
                        "finish_reason": c.finish_reason,
                    }
                    yield _sse(done, "done")
                else:
                    yield _sse({"text": item})
                item = await events.next()
        finally:
            events.cancel()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


# The JSON answer, or with stream=true an event stream (documented beside GenerateOut).
_GENERATE_200: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion; with stream=true, Server-Sent Events (text chunks, then 'done')",
        # Open API 3.1 reads an event stream's schema as the schema of one event.
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "event": {"type": "string", "enum": ["message", "done", "error"]},  # message: text
                        "data": {"type": "string", "contentMediaType": "application/json"},
                    },
                    "required": ["data"],
                }
            }
        },
    }
}


@router.get(
    "/generate",
    response_model=GenerateOut,
    dependencies=[ApiKey],
    tags=["generation"],
    responses={**_GENERATE_200, **error_responses(401, 422, 429)},
)
async def get_generate(
    req: Annotated[GenerateQuery, Query()], daemon: DaemonDep, slots: SlotsDep
) -> GenerateOut | StreamingResponse:
    """Complete a prompt with the active model version (greedy at temperature 0)."""
    return await _generate(req, daemon, slots)


@router.post(
    "/generate",
    response_model=GenerateOut,
    dependencies=[ApiKey],
    tags=["generation"],
    responses={**_GENERATE_200, **error_responses(*_BODY_ERRORS)},
)
async def post_generate(req: GenerateIn, daemon: DaemonDep, slots: SlotsDep) -> GenerateOut | StreamingResponse:
    return await _generate(req, daemon, slots)


@router.post(
    "/v1/feedback",
    status_code=202,
    response_model=FeedbackOut,
    tags=["data"],
    responses=error_responses(404, 409, *_BODY_ERRORS),
)
def post_feedback(body: FeedbackIn, daemon: DaemonDep, caller: ApiKeyDep, sources: SourceLimiterDep) -> FeedbackOut:
    """Rate or correct a generation; corrections and positive ratings become training samples.
    The limits of ingest hold: a correction is at most server.max_text_chars; each caller sends at
    most limits.source_rate_per_s texts a second; past limits.max_queue_depth, 429; and one
    generation takes feedback.max_per_generation entries (409 past it)."""
    limit = daemon.settings.server.max_text_chars
    if body.correction is not None and len(body.correction) > limit:
        raise HTTPException(
            422, f"correction is {len(body.correction)} characters; the limit is {limit} (server.max_text_chars)"
        )
    if body.correction is not None or (body.rating or 0) > 0:  # it becomes a text to train
        wait = sources.take({"feedback:" + caller.id: 1})
        if wait:
            raise too_many(
                f"rate limit: {sources.rate_per_s:g} texts per second per caller, bursts of {sources.burst} "
                "(limits.source_rate_per_s, limits.source_burst); retry later",
                wait,
            )
    try:
        fb = daemon.feedback(body.generation_id, body.rating, body.correction)
    except UnknownGeneration as exc:
        raise HTTPException(404, f"no generation with id '{body.generation_id}'") from exc
    except FeedbackLimit as exc:
        raise HTTPException(409, f"{exc} (feedback.max_per_generation)") from exc
    except QueueFull as exc:
        raise _queue_full(exc, daemon) from exc
    return FeedbackOut(id=fb.id, sample_id=fb.sample_id)


@router.get(
    "/v1/checkpoints",
    response_model=CheckpointsOut,
    dependencies=[ApiKey],
    tags=["checkpoints"],
    responses=error_responses(401, 429),
)
def get_checkpoints(daemon: DaemonDep) -> CheckpointsOut:
    active, records = daemon.checkpoints()
    texts = daemon.lineage.counts([r.version for r in records])
    return CheckpointsOut(
        active_version=active,
        served_version=daemon.engine.current().version,
        checkpoints=[
            CheckpointOut(
                version=r.version,
                parent_version=r.parent_version,
                status=r.status.value,
                created_at=r.created_at,
                step=r.step,
                samples_seen=r.samples_seen,
                metrics=r.metrics,
                corrupt=r.corrupt is not None,
                corrupt_reason=r.corrupt,
                texts_batch=texts[r.version][0],
                texts_replay=texts[r.version][1],
            )
            for r in records
        ],
    )


@router.post(
    "/v1/admin/rollback",
    response_model=RollbackOut,
    tags=["admin"],
    responses=error_responses(404, 409, *_ADMIN_ERRORS),
)
def post_rollback(body: RollbackIn, daemon: DaemonDep, audit: AuditDep) -> RollbackOut:
    """Serve an earlier version now; the trainer continues from it. Takes a registry version
    number only (never a path); recorded in the audit log."""
    with audit("rollback", version=body.version, requeue=body.requeue):
        try:
            r = daemon.rollback(body.version, body.requeue)
        except UnknownVersion as exc:
            raise HTTPException(404, f"no checkpoint with version {body.version}") from exc
        except RejectedVersion as exc:
            raise HTTPException(409, f"version {body.version} was rejected by evaluation and cannot be served") from exc
        except CorruptCheckpoint as exc:
            raise HTTPException(409, f"version {body.version} cannot be served: {exc}") from exc
    return RollbackOut(active_version=r.active_version, requeued=r.requeued)


@router.get(
    "/v1/trainer",
    response_model=TrainerOut,
    dependencies=[ApiKey],
    tags=["trainer"],
    responses=error_responses(401, 429),
)
def get_trainer(daemon: DaemonDep) -> TrainerOut:
    st, depth, active = daemon.trainer_status()
    return TrainerOut(
        prequential_loss=st.prequential_loss,
        state=st.state.value,
        step=st.step,
        queue_depth=depth,
        last_loss=st.last_loss,
        active_version=active,
        device=st.device,
        last_error=st.last_error,
        reloading=st.reloading,
    )


@router.get(
    "/v1/metrics/history",
    response_model=MetricsHistoryOut,
    dependencies=[ApiKey],
    tags=["trainer"],
    responses=error_responses(401, 422, 429),
)
def get_metrics_history(
    daemon: DaemonDep, last: Annotated[int, Query(ge=1, le=10_000, description="How many checkpoints"), URL_INT] = 100
) -> MetricsHistoryOut:
    """Per checkpoint, oldest first: prequential, held-out (plasticity) and anchor (retention) loss."""

    def num(m: dict[str, object], key: str) -> float | None:
        v = m.get(key)
        return float(v) if isinstance(v, int | float) else None

    return MetricsHistoryOut(
        points=[
            MetricsPoint(
                version=r.version,
                created_at=r.created_at,
                status=r.status.value,
                step=r.step,
                samples_seen=r.samples_seen,
                prequential_loss=num(r.metrics, "prequential_loss"),
                heldout_loss=num(r.metrics, "heldout_loss"),
                anchor_loss=num(r.metrics, "anchor_loss"),
                train_loss=num(r.metrics, "train_loss"),
            )
            for r in daemon.metrics_history(last)
        ]
    )


@router.post(
    "/v1/admin/trainer/pause", response_model=TrainerOut, tags=["admin"], responses=error_responses(401, 403, 409)
)
def post_pause(daemon: DaemonDep, audit: AuditDep) -> TrainerOut:
    """409 on an API replica (serve --role api): its trainer runs in another process."""
    with audit("trainer.pause"):
        try:
            daemon.trainer.pause()
        except TrainerElsewhere as exc:
            raise HTTPException(409, str(exc)) from exc
    return get_trainer(daemon)


@router.post(
    "/v1/admin/trainer/resume", response_model=TrainerOut, tags=["admin"], responses=error_responses(401, 403, 409)
)
def post_resume(daemon: DaemonDep, audit: AuditDep) -> TrainerOut:
    """409 on an API replica (serve --role api): its trainer runs in another process."""
    with audit("trainer.resume"):
        try:
            daemon.trainer.resume()
        except TrainerElsewhere as exc:
            raise HTTPException(409, str(exc)) from exc
    return get_trainer(daemon)


@router.get(
    "/v1/admin/lineage/texts/{sample_id}",
    response_model=TextLineageOut,
    dependencies=[AdminDep],
    tags=["admin"],
    responses=error_responses(401, 403, 404),
)
def get_text_lineage(sample_id: str, daemon: DaemonDep) -> TextLineageOut:
    """The versions a text trained (in its own batch, or replayed into a later one) and every
    version descended from them: the versions whose weights carry it."""
    found = daemon.text_lineage(sample_id) if is_row_name(sample_id) else None
    if found is None:
        raise HTTPException(404, f"no text with id '{sample_id[:64]}'")
    return TextLineageOut(
        id=found.sample.id,
        status=found.sample.status.value,
        source=found.sample.source,
        trained=[
            TrainedInOut(version=v, kind=kind.value, status=None if st is None else st.value)
            for v, kind, st in found.trained
        ],
        influenced=found.influenced,
    )


@router.get(
    "/v1/admin/lineage/versions/{version}",
    response_model=VersionLineageOut,
    dependencies=[AdminDep],
    tags=["admin"],
    responses=error_responses(401, 403, 404, 422),
)
def get_version_lineage(
    version: Annotated[int, Path(ge=0, le=2**31 - 1), URL_INT],
    daemon: DaemonDep,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Most text ids to return"), URL_INT] = 1000,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1, description="Skip this many first"), URL_INT] = 0,
) -> VersionLineageOut:
    """A version's parent and the texts that trained it: its own batch, then those replayed into
    it. Known for pruned versions too (their files are gone, their lineage is not)."""
    found = daemon.version_lineage(version, limit, offset)
    if found is None:
        raise HTTPException(404, f"no checkpoint with version {version}")
    t, r = found.texts, found.record
    end = offset + len(t.texts)
    return VersionLineageOut(
        version=r.version,
        parent_version=r.parent_version,
        status=r.status.value,
        texts_batch=t.batch,
        texts_replay=t.replay,
        texts=[VersionTextOut(id=sid, kind=kind.value) for sid, kind in t.texts],
        next_offset=end if end < t.batch + t.replay else None,
    )


def _forget_job_out(job: ForgetJob, progress: Progress) -> ForgetJobOut:
    state = "done" if progress.done else "retraining" if job.scrubbed_at is not None else "erasing"
    return ForgetJobOut(
        id=job.id,
        state=state,
        created_at=job.created_at,
        finished_at=job.finished_at,
        forgotten=job.forgotten,
        rolled_back_to=job.rolled_back_to,
        erased_versions=job.erased_versions,
        retrain_total=progress.retrain_total,
        retrained=progress.retrained,
    )


@router.post(
    "/v1/admin/forget",
    response_model=ForgetJobOut,
    status_code=202,
    tags=["admin"],
    responses=error_responses(404, *_ADMIN_ERRORS),
)
def post_forget(body: ForgetIn, daemon: DaemonDep, audit: AuditDep, keyring: KeyringDep) -> ForgetJobOut:
    """Forget texts: erase them (a tombstone keeps the id and a hash), stop serving every version
    they trained (serving the newest one they did not influence) and train again, on top of it,
    what those versions were taught. Returns once serving has switched; follow the job at GET
    /v1/admin/forget/{id}. 404 if an id or key names no text."""
    keys = body.idempotency_keys or []
    params = {"ids": len(body.ids or []), "idempotency_keys": len(keys), "source": body.source}
    with audit("forget", ok_code=202, **params) as entry:
        callers = [body.caller] if body.caller is not None else keyring.caller_ids()
        ids = list(body.ids or [])
        for key in dict.fromkeys(keys):
            posted = daemon.queue.ids_by_key([str(_scoped(c, key)) for c in callers])
            if not posted:
                whose = f" from {body.caller}" if body.caller is not None else ""
                raise HTTPException(404, f"no text with idempotency key '{key[:64]}'{whose}")
            ids += posted
        try:
            job = daemon.forget(ForgetRequest(tuple(ids), body.source))
        except UnknownTexts as exc:
            raise HTTPException(404, str(exc)) from exc
        entry["job"] = job.id
    state = daemon.forget_job(job.id)
    assert state is not None
    return _forget_job_out(*state)


@router.get(
    "/v1/admin/forget/{job_id}",
    response_model=ForgetJobOut,
    dependencies=[AdminDep],
    tags=["admin"],
    responses=error_responses(401, 403, 404),
)
def get_forget_job(job_id: str, daemon: DaemonDep) -> ForgetJobOut:
    """A forget job's state: erasing (files and the database's old bytes go), retraining (what the
    erased versions learned trains again), done."""
    found = daemon.forget_job(job_id) if is_row_name(job_id) else None
    if found is None:
        raise HTTPException(404, f"no forget job with id '{job_id[:64]}'")
    return _forget_job_out(*found)


@router.get(
    "/v1/admin/audit",
    response_model=AuditOut,
    dependencies=[AdminDep],
    tags=["admin"],
    responses=error_responses(401, 403, 422),
)
def get_audit(
    daemon: DaemonDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most entries to return"), URL_INT] = 100,
    before: Annotated[
        int | None, Query(ge=1, le=2**63 - 1, description="Only entries older than this id"), URL_INT
    ] = None,
) -> AuditOut:
    """Admin actions, newest first: who (a credential fingerprint), what, when, outcome."""
    entries = daemon.audit_entries(limit, before)
    return AuditOut(
        entries=[
            AuditEntryOut(
                id=e.id,
                at=e.at,
                actor=e.actor,
                action=e.action,
                params=e.params,
                outcome=e.outcome.value,
                status_code=e.status_code,
                detail=e.detail,
            )
            for e in entries
        ],
        next_before=entries[-1].id if len(entries) == limit else None,
    )


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    tags=["health"],
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "not ready"}},
)
def readyz(daemon: DaemonDep) -> JSONResponse:
    """503 "not ready" when requests cannot be served (no model, store unreachable, trainer dead).
    200 "degraded" when serving works but something needs an operator: the trainer's last error
    (e.g. a checkpoint that could not be written: disk full, fsync failed) or a corrupt checkpoint;
    the detail names it. A degraded server stays in rotation: it still serves the active version."""
    ok, info = daemon.readiness()
    if not ok:
        body = ReadyOut(status="not ready", detail="; ".join(info["problems"]), **info)
        return JSONResponse(body.model_dump(), status_code=503)
    if info.get("degraded"):
        return JSONResponse(ReadyOut(status="degraded", detail="; ".join(info["degraded"]), **info).model_dump())
    return JSONResponse(ReadyOut(status="ready", **info).model_dump())


# HEAD as GET (load balancers and uptime checks often probe with it); one operation in the schema.
router.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)
