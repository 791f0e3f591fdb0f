"""HTTP routes: validate, call one service function, shape the response."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse

from llmos.api.deps import AdminDep, DaemonDep
from llmos.api.schemas import (
    CheckpointOut,
    CheckpointsOut,
    FeedbackIn,
    GenerateIn,
    GenerateOut,
    IdOut,
    IdsOut,
    RollbackIn,
    RollbackOut,
    TextIn,
    TextOut,
    TextsIn,
    TrainerOut,
)
from llmos.registry.registry import CorruptCheckpoint, RejectedVersion, UnknownVersion
from llmos.serving.types import PromptTooLong, SamplingParams
from llmos.store.generations import UnknownGeneration
from llmos.store.queue import NewSample

router = APIRouter()


@router.post("/v1/texts", status_code=202, response_model=IdsOut, tags=["data"])
def post_texts(body: TextIn | TextsIn, daemon: DaemonDep) -> IdsOut:
    """Queue one text or a batch; the ids are returned only once the rows are committed."""
    items = body.items if isinstance(body, TextsIn) else [body]
    limit = daemon.settings.server.max_text_chars
    for i, it in enumerate(items):
        if len(it.text) > limit:
            where = f"items[{i}].text" if isinstance(body, TextsIn) else "text"
            raise HTTPException(
                422, f"{where} is {len(it.text)} characters; the limit is {limit} (server.max_text_chars)"
            )
    ids = daemon.ingest([NewSample(it.text, it.source, it.weight, it.idempotency_key) for it in items])
    return IdsOut(ids=ids)


@router.get("/v1/texts/{sample_id}", response_model=TextOut, tags=["data"])
def get_text(sample_id: str, daemon: DaemonDep) -> TextOut:
    s = daemon.sample(sample_id) if len(sample_id) <= 64 else None
    if s is None:
        raise HTTPException(404, f"no text with id '{sample_id[:64]}'")
    return TextOut(
        id=s.id,
        status=s.status.value,
        reason=s.reason,
        trained_in_version=s.trained_in_version,
        created_at=s.created_at,
    )


def _generate(req: GenerateIn, daemon: DaemonDep) -> GenerateOut:
    limit = daemon.settings.server.max_prompt_chars
    if len(req.prompt) > limit:
        raise HTTPException(
            422, f"prompt is {len(req.prompt)} characters; the limit is {limit} (server.max_prompt_chars)"
        )
    params = SamplingParams(req.max_new_tokens, req.temperature, req.top_p, req.seed)
    try:
        r = daemon.generate(req.prompt, params)
    except PromptTooLong as exc:
        raise HTTPException(422, str(exc)) from exc
    c = r.completion
    return GenerateOut(
        generation_id=r.generation_id,
        text=c.text,
        model_version=c.version,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        finish_reason=c.finish_reason,
    )  # type: ignore[arg-type]


@router.get("/generate", response_model=GenerateOut, tags=["generation"])
def get_generate(req: Annotated[GenerateIn, Query()], daemon: DaemonDep) -> GenerateOut:
    """Complete a prompt with the active model version (greedy at temperature 0)."""
    return _generate(req, daemon)


@router.post("/generate", response_model=GenerateOut, tags=["generation"])
def post_generate(req: GenerateIn, daemon: DaemonDep) -> GenerateOut:
    return _generate(req, daemon)


@router.post("/v1/feedback", status_code=202, response_model=IdOut, tags=["data"])
def post_feedback(body: FeedbackIn, daemon: DaemonDep) -> IdOut:
    """Rate or correct a generation; corrections and positive ratings become training samples."""
    try:
        fb = daemon.feedback(body.generation_id, body.rating, body.correction)
    except UnknownGeneration as exc:
        raise HTTPException(404, f"no generation with id '{body.generation_id}'") from exc
    return IdOut(id=fb.id)


@router.get("/v1/checkpoints", response_model=CheckpointsOut, tags=["checkpoints"])
def get_checkpoints(daemon: DaemonDep) -> CheckpointsOut:
    active, records = daemon.checkpoints()
    return CheckpointsOut(
        active_version=active,
        checkpoints=[
            CheckpointOut(
                version=r.version,
                parent_version=r.parent_version,
                status=r.status.value,
                created_at=r.created_at,
                step=r.step,
                samples_seen=r.samples_seen,
                metrics=r.metrics,
            )
            for r in records
        ],
    )


@router.post("/v1/admin/rollback", response_model=RollbackOut, dependencies=[AdminDep], tags=["admin"])
def post_rollback(body: RollbackIn, daemon: DaemonDep) -> RollbackOut:
    """Serve an earlier version now; the trainer continues from it."""
    try:
        r = daemon.rollback(body.version, body.requeue)
    except UnknownVersion as exc:
        raise HTTPException(404, f"no checkpoint with version {body.version}") from exc
    except RejectedVersion as exc:
        raise HTTPException(409, f"version {body.version} was rejected by evaluation and cannot be served") from exc
    except CorruptCheckpoint as exc:
        raise HTTPException(409, f"version {body.version} cannot be served: {exc}") from exc
    return RollbackOut(active_version=r.active_version, requeued=r.requeued)


@router.get("/v1/trainer", response_model=TrainerOut, tags=["trainer"])
def get_trainer(daemon: DaemonDep) -> TrainerOut:
    st, depth, active = daemon.trainer_status()
    return TrainerOut(
        state=st.state.value,
        step=st.step,
        queue_depth=depth,
        last_loss=st.last_loss,
        active_version=active,
        device=st.device,
        last_error=st.last_error,
    )


@router.post("/v1/admin/trainer/pause", response_model=TrainerOut, dependencies=[AdminDep], tags=["admin"])
def post_pause(daemon: DaemonDep) -> TrainerOut:
    daemon.trainer.pause()
    return get_trainer(daemon)


@router.post("/v1/admin/trainer/resume", response_model=TrainerOut, dependencies=[AdminDep], tags=["admin"])
def post_resume(daemon: DaemonDep) -> TrainerOut:
    daemon.trainer.resume()
    return get_trainer(daemon)


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["health"], responses={503: {"description": "not ready"}})
def readyz(daemon: DaemonDep) -> JSONResponse:
    ok, info = daemon.readiness()
    if ok:
        return JSONResponse({"status": "ready", **info})
    return JSONResponse({"status": "not ready", "detail": "; ".join(info["problems"]), **info}, status_code=503)
