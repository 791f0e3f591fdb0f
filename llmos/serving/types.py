"""What a generation request asks for and gets back (no torch here: the API imports these)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    version: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]  # EOS, or the token budget ran out


class PromptTooLong(ValueError):
    pass


class CacheFull(Exception):
    """The generations in progress hold the whole KV-cache budget (serving.kv_cache_tokens)."""
