"""The OpenAI-compatible API: POST /v1/completions, POST /v1/chat/completions, GET /v1/models.

``model`` names a version: ``llmos`` (serving.model_name) is the active one, ``llmos@<v>`` pins
stored promoted version v. The response ``id`` is the generation id that POST /v1/feedback
takes; ``usage`` counts real tokens (the prompt as the model saw it, and every generated token).
Errors carry OpenAI's ``{"error": {...}}`` and this API's ``{"detail": ...}``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Tag

from llmos.api.deps import ApiKey, DaemonDep, SlotsDep
from llmos.api.relay import Busy, End, Relay, Slots, call
from llmos.api.schemas import NO_NUL, STR_OR_LIST, Text, clean_errors, clean_text, error_responses, json_int
from llmos.daemon import Daemon, GenerationResult
from llmos.registry.registry import CorruptCheckpoint, UnknownVersion
from llmos.serving.chat import ChatTemplateError, render_chat
from llmos.serving.engine import NotPinnable
from llmos.serving.types import CacheFull, Completion, PromptTooLong, SamplingParams


class _OpenAIRoute(APIRoute):
    """Validation errors in both shapes: OpenAI clients show ``error.message``, others read
    ``detail`` (one item per problem, as everywhere in this API)."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                items = clean_errors(exc.errors())
                message = "; ".join(f"{'.'.join(str(p) for p in i['loc'][1:]) or 'body'}: {i['msg']}" for i in items)
                error = {"type": "invalid_request_error", "message": message, "param": None, "code": None}
                return JSONResponse({"error": error, "detail": items}, status_code=422)

        return handle


router = APIRouter(tags=["openai"], dependencies=[ApiKey], route_class=_OpenAIRoute)
# The bodies follow OpenAI's API reference; errors add OpenAI's "error" object to "detail".
_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A completion (JSON), or with stream: true, server-sent events ending with data: [DONE]",
        "content": {"application/json": {}, "text/event-stream": {}},
    },
    **error_responses(400, 401, 404, 409, 413, 422, 429),
}
log = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ---- request bodies ----------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


Stop = Annotated[str, Field(max_length=200), AfterValidator(clean_text), NO_NUL]
# A string or a list: the JSON type picks the member (a 422 names that member's problem alone).
Stops = Annotated[Annotated[Stop, Tag("str")] | Annotated[list[Stop], Field(max_length=4), Tag("list")], STR_OR_LIST]
Prompt = Annotated[
    Annotated[Text, Tag("str")]
    | Annotated[list[Text], Field(min_length=1, max_length=1, description="One prompt."), Tag("list")],
    STR_OR_LIST,
]
_ONE = "llmos returns one choice per request"


def _number(value: Any) -> Any:
    if isinstance(value, bool):  # True == 1 in Python: a literal 1 would take it
        raise ValueError("must be a number, not true or false")
    return json_int(value)


# The literals 1 and 0, with 1.0 and 0.0 counting (JSON has one number type), as JsonInt.
One = Annotated[Literal[1], BeforeValidator(_number)]
# Integers with bounds: the bounds inside, so that the schema states them (as "minimum").
Count = Annotated[int, Field(ge=1), BeforeValidator(json_int)]
Seed = Annotated[int, Field(ge=0, le=2**53 - 1), BeforeValidator(json_int)]  # exact as a JSON number anywhere
Zero = Annotated[Literal[0], BeforeValidator(_number)]
_UNSUPPORTED = "not supported by llmos; leave it out"


class _OpenAIRequest(BaseModel):
    # The fields of OpenAI's API reference that llmos can honour, and those it can honour only at
    # their neutral value (the schema says which values; anything else is a 422 naming the field).
    # An unknown field is an error, as everywhere in this API.
    # Strict, as the other routes: "stream": "yes", "max_tokens": true or "temperature": true are
    # 422s, not coerced (a number still counts where a float is asked for).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    model: Annotated[str, Field(min_length=1, max_length=100, description="'llmos' or 'llmos@<version>'")]
    max_tokens: Count | None = Field(None, description="Lowered to serving.max_new_tokens_cap if larger.")
    temperature: float | None = Field(None, ge=0, le=2, description="Default 1; 0 is greedy.")
    top_p: float | None = Field(None, gt=0, le=1)
    n: One | None = Field(None, description=_ONE)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: Stops | None = None
    seed: Seed | None = None
    presence_penalty: float | None = Field(None, ge=0, le=0, description=_UNSUPPORTED)
    frequency_penalty: float | None = Field(None, ge=0, le=0, description=_UNSUPPORTED)
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description=_UNSUPPORTED)
    user: Annotated[str, Field(max_length=200)] | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self, max_tokens: int) -> SamplingParams:
        t = 1.0 if self.temperature is None else self.temperature  # OpenAI's default
        return SamplingParams(max_tokens, t, 1.0 if self.top_p is None else self.top_p, self.seed)


class CompletionIn(_OpenAIRequest):
    prompt: Prompt
    echo: Literal[False] | None = Field(None, description=_UNSUPPORTED)
    logprobs: Zero | None = Field(None, description=_UNSUPPORTED)
    suffix: Annotated[str, Field(max_length=0)] | None = Field(None, description=_UNSUPPORTED)
    best_of: One | None = Field(None, description=_ONE)

    def text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


Content = Annotated[Annotated[Text, Tag("str")] | Annotated[list[TextPart], Tag("list")], STR_OR_LIST]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    name: Annotated[str, Field(max_length=100)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class ChatIn(_OpenAIRequest):
    messages: list[Message] = Field(min_length=1, max_length=1000)
    max_completion_tokens: Count | None = None
    logprobs: Literal[False] | None = Field(None, description=_UNSUPPORTED)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = Field(None, description=_UNSUPPORTED)
    tool_choice: Literal["none"] | None = Field(None, description=_UNSUPPORTED)


# ---- responses -----------------------------------------------------------------------------------
class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        body = {"type": self.type, "message": self.message, "param": self.param, "code": self.code}
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse({"error": body, "detail": self.message}, status_code=self.status, headers=headers)


def _usage(c: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    }


def _model_id(daemon: Daemon, version: int) -> str:
    return f"{daemon.settings.serving.model_name}@{version}"


# ---- the service call, with errors in OpenAI's words -----------------------------------------
def _resolve(daemon: Daemon, model: str) -> int | None:
    """'<name>' -> None (the active version); '<name>@<v>' -> v."""
    name = daemon.settings.serving.model_name
    if model == name:
        return None
    base, sep, version = model.partition("@")
    if base == name and sep and version.isascii() and version.isdigit() and len(version) < 10:
        return int(version)
    raise OpenAIError(
        404,
        f"model '{model[:100]}' does not exist; use '{name}' (the active version) or '{name}@<version>'",
        "invalid_request_error",
        "model_not_found",
        "model",
    )


def _translate(exc: Exception, model: str) -> OpenAIError:
    if isinstance(exc, UnknownVersion):
        return OpenAIError(
            404,
            f"model '{model}': no stored version {exc.args[0]}",
            "invalid_request_error",
            "model_not_found",
            "model",
        )
    if isinstance(exc, NotPinnable):
        return OpenAIError(409, f"model '{model}': {exc}", "invalid_request_error", "model_not_servable", "model")
    if isinstance(exc, CorruptCheckpoint):
        return OpenAIError(409, f"model '{model}': {exc}", "invalid_request_error", "model_not_servable", "model")
    if isinstance(exc, PromptTooLong):
        return OpenAIError(400, str(exc), "invalid_request_error", "context_length_exceeded", "messages")
    if isinstance(exc, Busy):
        return OpenAIError(429, f"{exc} (serving.max_requests); retry later", "rate_limit_error", "server_busy")
    if isinstance(exc, CacheFull):
        return OpenAIError(429, f"{exc} (serving.kv_cache_tokens); retry later", "rate_limit_error", "server_busy")
    raise exc


def _prepare(daemon: Daemon, req: _OpenAIRequest, prompt: str, default_max: int) -> tuple[SamplingParams, int | None]:
    limit = daemon.settings.server.max_prompt_chars
    if len(prompt) > limit:
        raise OpenAIError(
            400,
            f"prompt is {len(prompt)} characters; the limit is {limit} (server.max_prompt_chars)",
            "invalid_request_error",
            "context_length_exceeded",
        )
    # Clients often ask for more than they need (4096 is a common default): lowered, not refused;
    # finish_reason "length" tells when the cap cut a completion short.
    asked = getattr(req, "max_completion_tokens", None) or req.max_tokens or default_max
    max_tokens = min(asked, daemon.settings.serving.max_new_tokens_cap)
    return req.sampling(max_tokens), _resolve(daemon, req.model)


@dataclass(frozen=True)
class _Ask:
    """One generation asked for through this API: answered whole, or streamed."""

    daemon: Daemon
    slots: Slots
    model: str
    prompt: str
    params: SamplingParams
    version: int | None
    stop: tuple[str, ...]

    def _events(self, gid: str | None = None) -> Iterator[str | GenerationResult]:
        return self.daemon.generate_stream(self.prompt, self.params, self.version, self.stop, generation_id=gid)

    def _run(self) -> GenerationResult:
        try:
            for event in self._events():
                if isinstance(event, GenerationResult):
                    return event
        except (UnknownVersion, NotPinnable, CorruptCheckpoint, PromptTooLong, CacheFull) as exc:
            raise _translate(exc, self.model) from exc
        raise RuntimeError("generation ended without a result")

    async def complete(self) -> GenerationResult:
        try:
            return await call(self.slots, self._run, "llmos-openai")
        except Busy as exc:
            raise _translate(exc, self.model) from exc

    async def stream(
        self, chunks: Callable[[str, str | GenerationResult], Iterator[dict[str, Any]]]
    ) -> StreamingResponse | JSONResponse:
        """Server-sent events from a generation on a thread of its own (relay.py); the response
        starts only once the first event is in, so a bad version or prompt still gets a plain error
        response."""
        gid = str(uuid.uuid4())
        try:
            events: Relay[str | GenerationResult] = Relay(self.slots, lambda: self._events(gid), "llmos-stream")
        except Busy as exc:
            return _translate(exc, self.model).response()
        first = await events.next()
        if isinstance(first, Exception):
            return _translate(first, self.model).response()  # re-raises what it does not know (a 500)
        return _sse_response(gid, first, events, chunks)


def _sse_response(
    gid: str,
    first: str | GenerationResult | End,
    events: Relay[str | GenerationResult],
    chunks: Callable[[str, str | GenerationResult], Iterator[dict[str, Any]]],
) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        item: str | GenerationResult | Exception | End = first
        try:
            for chunk in chunks(gid, ""):  # the opening chunk (chat: the role)
                yield _sse(chunk)
            while not isinstance(item, End):
                if isinstance(item, Exception):
                    log.error("streamed generation failed", exc_info=item)
                    err = {"message": f"generation failed: {type(item).__name__}", "type": "server_error"}
                    yield _sse({"error": err})
                    break
                for chunk in chunks(gid, item):
                    yield _sse(chunk)
                item = await events.next()
            yield "data: [DONE]\n\n"
        finally:
            events.cancel()  # the client went away, or we are done: stop generating

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---- routes ----------------------------------------------------------------------------------
@router.post("/v1/completions", response_model=None, responses=_GENERATION_RESPONSES)
async def completions(req: CompletionIn, daemon: DaemonDep, slots: SlotsDep) -> Any:
    """OpenAI's text completion: continue ``prompt``."""
    created = int(time.time())
    prompt = req.text()
    try:
        params, version = _prepare(daemon, req, prompt, COMPLETION_DEFAULT_MAX_TOKENS)
        if not req.stream:
            r = await _Ask(daemon, slots, req.model, prompt, params, version, req.stops()).complete()
            return JSONResponse(
                {
                    "id": r.generation_id,
                    "object": "text_completion",
                    "created": created,
                    "model": _model_id(daemon, r.completion.version),
                    "choices": [
                        {
                            "index": 0,
                            "text": r.completion.text,
                            "logprobs": None,
                            "finish_reason": r.completion.finish_reason,
                        }
                    ],
                    "usage": _usage(r.completion),
                    "system_fingerprint": None,
                }
            )
    except OpenAIError as err:
        return err.response()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if version is None:
        version = daemon.engine.current().version  # every chunk names the version that answers
    model_at = _model_id(daemon, version)

    def chunks(gid: str, event: str | GenerationResult) -> Iterator[dict[str, Any]]:
        base = {"id": gid, "object": "text_completion", "created": created, "model": model_at}
        if isinstance(event, str):
            if event:
                yield {**base, "choices": [{"index": 0, "text": event, "logprobs": None, "finish_reason": None}]}
            return
        c = event.completion
        yield {**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": c.finish_reason}]}
        if include_usage:
            yield {**base, "choices": [], "usage": _usage(c)}

    return await _Ask(daemon, slots, req.model, prompt, params, version, req.stops()).stream(chunks)


@router.post("/v1/chat/completions", response_model=None, responses=_GENERATION_RESPONSES)
async def chat_completions(req: ChatIn, daemon: DaemonDep, slots: SlotsDep) -> Any:
    """OpenAI's chat completion: the messages are rendered with the model's chat template, or the
    plain template ('<role>: <content>' lines, then 'assistant:') when it has none."""
    created = int(time.time())
    try:
        try:
            chat = render_chat(daemon.engine.tokenizer, [(m.role, m.text()) for m in req.messages])
        except ChatTemplateError as exc:
            raise OpenAIError(400, str(exc), "invalid_request_error", None, "messages") from exc
        params, version = _prepare(daemon, req, chat.text, daemon.settings.serving.max_new_tokens_cap)
        stop = (*req.stops(), *chat.stop)
        if not req.stream:
            r = await _Ask(daemon, slots, req.model, chat.text, params, version, stop).complete()
            c = r.completion
            return JSONResponse(
                {
                    "id": r.generation_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": _model_id(daemon, c.version),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": c.text},
                            "logprobs": None,
                            "finish_reason": c.finish_reason,
                        }
                    ],
                    "usage": _usage(c),
                    "system_fingerprint": None,
                }
            )
    except OpenAIError as err:
        return err.response()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if version is None:
        version = daemon.engine.current().version  # every chunk names the version that answers
    model_at = _model_id(daemon, version)

    def chunks(gid: str, event: str | GenerationResult) -> Iterator[dict[str, Any]]:
        base = {"id": gid, "object": "chat.completion.chunk", "created": created, "model": model_at}

        def choice(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        if isinstance(event, str):
            if event:
                yield {**base, "choices": [choice({"content": event}, None)]}
            else:
                yield {**base, "choices": [choice({"role": "assistant", "content": ""}, None)]}
            return
        c = event.completion
        yield {**base, "choices": [choice({}, c.finish_reason)]}
        if include_usage:
            yield {**base, "choices": [], "usage": _usage(c)}

    return await _Ask(daemon, slots, req.model, chat.text, params, version, stop).stream(chunks)


def _models(daemon: Daemon) -> list[dict[str, Any]]:
    active, records = daemon.checkpoints()
    name = daemon.settings.serving.model_name
    created = {r.version: int(r.created_at.timestamp()) if r.created_at else 0 for r in records}
    out = [{"id": name, "object": "model", "created": created.get(active, 0), "owned_by": "llmos"}]
    for r in records:
        if r.status.value == "promoted":
            out.append(
                {"id": f"{name}@{r.version}", "object": "model", "created": created[r.version], "owned_by": "llmos"}
            )
    return out


@router.get("/v1/models", responses=error_responses(401, 429))
def list_models(daemon: DaemonDep) -> dict[str, Any]:
    """'<name>' (the active version) and '<name>@<v>' for every stored promoted version."""
    return {"object": "list", "data": _models(daemon)}


@router.get("/v1/models/{model_id}", response_model=None, responses=error_responses(401, 404, 429))
def get_model(model_id: str, daemon: DaemonDep) -> Any:
    for m in _models(daemon):
        if m["id"] == model_id:
            return m
    return OpenAIError(
        404, f"model '{model_id[:100]}' does not exist", "invalid_request_error", "model_not_found", "model"
    ).response()
