"""Request and response bodies of the HTTP API (separate from the store's tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _clean(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode (it holds a lone surrogate)") from exc
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace only")
    return value


Text = Annotated[str, AfterValidator(_clean)]
NonBlankText = Annotated[str, AfterValidator(_clean), AfterValidator(_not_blank)]


class _Request(BaseModel):
    # Unknown fields are an error (a misspelt "weigth" must not pass silently); NaN/Infinity too.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextIn(_Request):
    text: NonBlankText
    source: Annotated[Text, Field(max_length=200)] | None = None
    weight: float = Field(1.0, gt=0, le=1e6)
    idempotency_key: Annotated[Text, Field(min_length=1, max_length=200)] | None = None


class TextsIn(_Request):
    items: list[TextIn] = Field(min_length=1, max_length=1000)


class IdsOut(BaseModel):
    ids: list[str]


class TextOut(BaseModel):
    id: str
    status: Literal["queued", "training", "trained", "heldout", "rejected"]
    reason: str | None
    trained_in_version: int | None
    created_at: datetime


class GenerateIn(_Request):
    prompt: Text
    max_new_tokens: int = Field(64, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class GenerateOut(BaseModel):
    generation_id: str
    text: str
    model_version: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


class FeedbackIn(_Request):
    generation_id: Annotated[Text, Field(max_length=64)]
    rating: float | None = Field(None, ge=-1, le=1)
    correction: NonBlankText | None = None

    @model_validator(mode="after")
    def _one_of(self) -> FeedbackIn:
        if self.rating is None and self.correction is None:
            raise ValueError("give a rating, a correction, or both")
        return self


class IdOut(BaseModel):
    id: str


class CheckpointOut(BaseModel):
    version: int
    parent_version: int | None
    status: Literal["candidate", "promoted", "rejected"]
    created_at: datetime | None
    step: int
    samples_seen: int
    metrics: dict[str, Any]


class CheckpointsOut(BaseModel):
    active_version: int
    checkpoints: list[CheckpointOut]


class RollbackIn(_Request):
    version: int = Field(ge=0, le=2**31 - 1)
    requeue: bool = False


class RollbackOut(BaseModel):
    active_version: int
    requeued: int


class TrainerOut(BaseModel):
    state: Literal["idle", "training", "paused", "error"]
    step: int
    queue_depth: int
    last_loss: float | None
    active_version: int
    device: str
    last_error: str | None = None
