"""Request and response bodies of the HTTP API (separate from the store's tables)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

from llmos.store.queue import MIN_WEIGHT
from llmos.text import normalise


def clean_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode (it holds a lone surrogate)") from exc
    return value


def _not_blank(value: str) -> str:
    if not normalise(value):  # what the trainer would train on (control characters go)
        raise ValueError("must not be empty, whitespace or control characters only")
    return value


# The same rules as the validators, for the published schema (clients and fuzzers read it). Only in
# the schema: the validators above check them in linear time.
NO_NUL = Field(json_schema_extra={"pattern": r"^[^\x00]*$"})
# Whitespace spelled out as str.strip() sees it (regex engines disagree on \s, e.g. about U+0085).
_SPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Control characters normalise() drops (tab and newline are whitespace above): a text of only
# these and whitespace is empty to the trainer.
_CONTROL = r"\x01-\x08\x0e-\x1b\x7f-\x9f"
_NOT_BLANK = Field(json_schema_extra={"pattern": rf"^[^\x00]*[^\x00{_SPACE}{_CONTROL}][^\x00]*$"})

Text = Annotated[str, AfterValidator(clean_text), NO_NUL]
# Text of bounded length: the bounds come before the validator, so that a 422 counts characters.
Label = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(clean_text), NO_NUL]  # a source, a key
Id = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(clean_text), NO_NUL]


def json_int(value: Any) -> Any:
    """JSON has one number type: 5.0 is the integer 5 (as JSON Schema says); true is not 1."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer in a JSON body: strict (no "5", no true), but 5.0 counts.
JsonInt = Annotated[int, BeforeValidator(json_int)]

# Numbers in a URL (query string or path) arrive as text, and pydantic's lax parsing reads more
# than a number there: " 5", "\t5", "+5", "1_000" and "5.0" are all 5 to it. A URL's number is
# written as JSON writes one, so that what the schema calls an integer is all that is accepted.
_URL_INT = re.compile(r"-?[0-9]+")
_URL_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def _written_as(pattern: re.Pattern[str], what: str) -> Any:
    def check(value: Any) -> Any:
        if isinstance(value, str) and not pattern.fullmatch(value):
            raise ValueError(f"must be {what}")
        return value

    return check


url_int = _written_as(_URL_INT, "an integer written in digits (an optional '-', then 0-9 only)")
url_number = _written_as(_URL_NUMBER, "a number written as JSON writes one (e.g. 0.7, 1e-3)")
# Put last in an integer query or path parameter: Annotated[int, Query(ge=1), URL_INT]. (Nested
# as Annotated[Annotated[int, URL_INT], Query(ge=1)], FastAPI publishes "ge" for "minimum".)
URL_INT = BeforeValidator(url_int)


def _not_null(value: Any) -> Any:
    if value is None:
        raise ValueError("must not be null: leave the field out instead")
    return value


class _LeftOut:
    """For an optional field ``X | None = None``: validated as X alone, an explicit null refused.

    Optional fields are left out, not sent as null: one way to say "none", and a schema that says
    exactly what is accepted (the default None is never validated). Without None among the members
    validated, a bad value's 422 names its problem alone, not also "Input should be None"."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        (inner,) = (a for a in get_args(source) if a is not type(None))
        return core_schema.no_info_before_validator_function(_not_null, handler.generate_schema(inner))


NoNull = _LeftOut()
NonBlankText = Annotated[str, AfterValidator(clean_text), AfterValidator(_not_blank), _NOT_BLANK]


class _Request(BaseModel):
    # Unknown fields are an error (a misspelt "weigth" must not pass silently); NaN/Infinity too.
    # Strict: a JSON body must hold the types the schema names (no "1" for 1, no 0 for false).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class TextIn(_Request):
    text: NonBlankText
    source: Annotated[Label | None, NoNull] = None
    weight: float = Field(1.0, ge=MIN_WEIGHT, le=1e6)
    idempotency_key: Annotated[Label | None, NoNull] = None


class TextsIn(_Request):
    items: list[TextIn] = Field(min_length=1, max_length=1000)


def _text_shape(value: Any) -> str | None:
    if isinstance(value, dict):
        return "TextsIn" if "items" in value else "TextIn"
    return type(value).__name__ if isinstance(value, TextIn | TextsIn) else None


# One text or a batch, told apart by "items": a 422 lists the problems of the shape the client sent,
# not also those of the other (an empty text is not also "TextsIn.items: Field required").
TextOrTexts = Annotated[
    Annotated[TextIn, Tag("TextIn")] | Annotated[TextsIn, Tag("TextsIn")],
    Discriminator(
        _text_shape,
        custom_error_type="text_body_type",
        custom_error_message='Input should be an object with "text" (one text) or "items" (a batch)',
    ),
]


def _str_or_list(value: Any) -> str | None:
    return "str" if isinstance(value, str) else "list" if isinstance(value, list) else None


# For a union of a string and a list (tag its members Tag("str") and Tag("list")): the JSON type
# picks the member, so a string's problem is not also "Input should be a valid list".
STR_OR_LIST = Discriminator(
    _str_or_list, custom_error_type="str_or_list_type", custom_error_message="Input should be a string or a list"
)


class IdsOut(BaseModel):
    ids: list[str]


SampleStatusName = Literal["queued", "training", "trained", "heldout", "rejected", "erased"]
CheckpointStatusName = Literal["candidate", "promoted", "rejected", "erased"]
TextKindName = Literal["batch", "replay"]


class TextOut(BaseModel):
    id: str
    status: SampleStatusName
    reason: str | None
    trained_in_version: int | None
    created_at: datetime


class GenerateIn(_Request):
    prompt: Text
    max_new_tokens: JsonInt = Field(64, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    # 2**53 - 1: the largest integer every JSON parser reads exactly (a bound that a double cannot
    # hold would let clients see values past it as "within").
    seed: Annotated[Annotated[int, Field(ge=0, le=2**53 - 1), BeforeValidator(json_int)] | None, NoNull] = None
    stream: bool = Field(
        False,
        description="Answer with Server-Sent Events: one event per text chunk ({'text': ...}), then an event "
        "'done' carrying generation_id, model_version, token counts and finish_reason.",
    )


class GenerateQuery(GenerateIn):
    """GenerateIn from a query string, where every value arrives as text."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=False)

    _ints = field_validator("max_new_tokens", "seed", mode="before")(url_int)
    _numbers = field_validator("temperature", "top_p", mode="before")(url_number)


class GenerateOut(BaseModel):
    generation_id: str
    text: str
    model_version: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


class FeedbackIn(_Request):
    # The rule of _one_of below, for the published schema.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["rating"], "properties": {"rating": {"type": "number"}}},
                {"required": ["correction"], "properties": {"correction": {"type": "string"}}},
            ]
        }
    )

    generation_id: Annotated[str, Field(max_length=64), AfterValidator(clean_text), NO_NUL]
    rating: Annotated[Annotated[float, Field(ge=-1, le=1)] | None, NoNull] = None
    correction: Annotated[NonBlankText | None, NoNull] = None

    @model_validator(mode="after")
    def _one_of(self) -> FeedbackIn:
        if self.rating is None and self.correction is None:
            raise ValueError("give a rating, a correction, or both")
        return self


class IdOut(BaseModel):
    id: str


class FeedbackOut(BaseModel):
    id: str
    sample_id: str | None = None  # the training sample it created (follow it at /v1/texts/{id}), if any


class CheckpointOut(BaseModel):
    version: int
    parent_version: int | None
    status: CheckpointStatusName
    created_at: datetime | None
    step: int
    samples_seen: int
    metrics: dict[str, Any]
    corrupt: bool = False  # its files fail verification against the manifest: never served
    corrupt_reason: str | None = None
    texts_batch: int = 0  # texts of its own batch (lineage: GET /v1/admin/lineage/versions/{version})
    texts_replay: int = 0  # texts replayed into it


class TrainedInOut(BaseModel):
    version: int
    kind: TextKindName  # batch: taught in that version; replay: replayed into it
    status: CheckpointStatusName | None  # the version's


class TextLineageOut(BaseModel):
    id: str
    status: SampleStatusName
    source: str | None
    trained: list[TrainedInOut]  # the versions it trained, oldest first
    # Those versions and every version descended from them: each one's weights carry the text.
    influenced: list[int]


class VersionTextOut(BaseModel):
    id: str
    kind: TextKindName


class VersionLineageOut(BaseModel):
    version: int
    parent_version: int | None
    status: CheckpointStatusName
    texts_batch: int  # texts of its own batch
    texts_replay: int  # texts replayed into it
    texts: list[VersionTextOut]  # this page of them, its batch first
    next_offset: int | None  # the offset of the next page, if there is one


class CheckpointsOut(BaseModel):
    active_version: int  # the registry's: what every server is to serve
    # What this server serves now: it follows active_version within a swap (a text reads "trained"
    # from just before its version is served; a replica follows the registry when it syncs).
    served_version: int
    checkpoints: list[CheckpointOut]


class ForgetIn(_Request):
    """What to forget: texts by id, by the idempotency key they were posted with, and every text
    of a source; at least one of them."""

    # The schema says "at least one" too, so that a client (or a fuzzer) reading it sends one.
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [{"required": ["ids"]}, {"required": ["idempotency_keys"]}, {"required": ["source"]}]
        }
    )

    # At most 500 ids and 100 keys a request: any body the schema allows fits server.max_body_bytes
    # (1 MiB) even written as JSON escapes. More: several requests, or a source.
    ids: Annotated[Annotated[list[Id], Field(min_length=1, max_length=500)] | None, NoNull] = None
    idempotency_keys: Annotated[
        Annotated[list[Label], Field(min_length=1, max_length=100)] | None,
        NoNull,
    ] = None
    source: Annotated[Label | None, NoNull] = None
    # Idempotency keys belong to the credential that sent them: whose, as the audit log names it
    # ("key:<fingerprint>", "admin:<fingerprint>", "addr:127.0.0.1"); left out, every credential's.
    caller: Annotated[
        Annotated[str, Field(min_length=1, max_length=80), AfterValidator(clean_text), NO_NUL] | None, NoNull
    ] = None

    @model_validator(mode="after")
    def _names_something(self) -> ForgetIn:
        if self.ids is None and self.idempotency_keys is None and self.source is None:
            raise ValueError("name what to forget: ids, idempotency_keys or source")
        return self


class ForgetJobOut(BaseModel):
    id: str
    # erasing: the texts and versions are erased, files and the database's old bytes not yet;
    # retraining: they are too, and texts that erased versions had learned are training again; done.
    state: Literal["erasing", "retraining", "done"]
    created_at: datetime
    finished_at: datetime | None
    forgotten: int  # texts erased
    rolled_back_to: int | None  # the version served instead of an erased one, if the active one was
    erased_versions: list[int]
    retrain_total: int  # texts the erased versions had learned, back in the queue
    retrained: int  # of them, trained again (or settled otherwise)


class RollbackIn(_Request):
    version: JsonInt = Field(ge=0, le=2**31 - 1)
    requeue: bool = False


class RollbackOut(BaseModel):
    active_version: int
    requeued: int


class TrainerOut(BaseModel):
    state: Literal["idle", "training", "paused", "error", "standby", "remote"]
    step: int
    queue_depth: int
    last_loss: float | None
    active_version: int
    device: str
    last_error: str | None = None
    prequential_loss: float | None = None  # running average of loss on new data before training on it
    reloading: bool = False  # after a rollback, until the trainer continues from the active version


class MetricsPoint(BaseModel):
    version: int
    created_at: datetime | None
    status: CheckpointStatusName
    step: int
    samples_seen: int
    prequential_loss: float | None
    heldout_loss: float | None  # plasticity: recent held-out data
    anchor_loss: float | None  # retention: the anchor set
    train_loss: float | None


class MetricsHistoryOut(BaseModel):
    points: list[MetricsPoint]


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorOut(BaseModel):
    """Every error: a message, or for a request that fails validation, one item per problem."""

    detail: str | list[ErrorItem]


class ReadyOut(BaseModel):
    status: Literal["ready", "degraded", "not ready"]
    problems: list[str]  # why it is not ready (503)
    degraded: list[str] = []  # ready, but something needs an operator (e.g. checkpoints failing)
    detail: str | None = None


class AuditEntryOut(BaseModel):
    id: int
    at: datetime
    actor: str  # which credential: a fingerprint ("admin:<12 hex>"), never the secret; or "system"
    action: str
    params: dict[str, Any]
    outcome: Literal["ok", "refused", "error"]
    status_code: int
    detail: str | None


class AuditOut(BaseModel):
    entries: list[AuditEntryOut]  # newest first
    next_before: int | None  # pass as ?before= for older entries; null at the end


_ERROR_WHY = {
    400: "The body is not parseable JSON (not UTF-8, or nested too deeply).",
    401: "Missing or unknown credential.",
    403: "An API key on an admin route.",
    404: "Not found.",
    409: "The version cannot be served (rejected or corrupt); or, on an API replica, the trainer runs elsewhere.",
    413: "The body is larger than server.max_body_bytes.",
    422: "The request is invalid; the detail says which field and why.",
    429: "Rate limit or full queue; retry after Retry-After seconds.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the errors a route can answer with (all shaped as ErrorOut)."""
    return {c: {"model": ErrorOut, "description": _ERROR_WHY[c]} for c in codes}


_TYPE_NAMES = ("list", "dict", "str", "int", "float", "bool")


def _loc_part(part: Any) -> Any:
    """A field name or index as is; a union member's label (pydantic writes its validators there,
    memory addresses included) as the type it checks: "str", "list"."""
    if not isinstance(part, str) or part.isidentifier() or part.isdigit():
        return part
    for name in _TYPE_NAMES[:2]:
        if part.startswith(name + "["):
            return name
    found = re.findall(r"\b(" + "|".join(_TYPE_NAMES) + r")\b", re.sub(r"<[^>]*>", "", part))
    return found[-1] if found else "value"


def clean_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors as a client reads them: where, what, which kind; without the echoed input
    (which may be huge or binary) and without validator names and addresses in the location."""
    return [
        {
            "loc": [_loc_part(p) for p in e.get("loc", ())],
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in errors
    ]
