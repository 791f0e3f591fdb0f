"""Chat messages to one prompt string.

With the tokenizer's own chat template when it has one. Otherwise with the plain template::

    system: You are terse.
    user: Hello
    assistant:

one ``<role>: <content>`` line per message, then ``assistant:`` for the model to continue. Under
the plain template a completion also ends where the model starts the next turn (``\\nuser:``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PLAIN_STOP = ("\nuser:",)


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    stop: tuple[str, ...]  # stop strings the template implies, added to the request's own


class ChatTemplateError(ValueError):
    pass


def render_chat(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> ChatPrompt:
    """``messages`` are (role, content) pairs, oldest first."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in messages], tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # a template may refuse a conversation (e.g. roles not alternating)
            raise ChatTemplateError(f"the model's chat template refused these messages: {exc}") from exc
        return ChatPrompt(str(text), ())
    return ChatPrompt("".join(f"{role}: {content}\n" for role, content in messages) + "assistant:", PLAIN_STOP)
