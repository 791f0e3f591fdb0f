"""Token ids to text as they are generated: whole characters only, and stop strings honoured.

A byte-level token may end in the middle of a UTF-8 character, and a stop string may arrive
split over several tokens; so each delta is what the decoded text gained, minus an incomplete
character at its end and minus a tail that could still turn out to begin a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

REPLACEMENT = "\ufffd"  # what decode() makes of an incomplete UTF-8 sequence


class Decoder(Protocol):
    def decode(self, token_ids: list[int], /) -> Any: ...


class TextStream:
    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self.text = ""  # everything decoded so far, cut at a stop string once one is found
        self.sent = 0  # characters of self.text already handed out
        self.stopped = False

    @property
    def tokens(self) -> int:
        return len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text that may be shown now (possibly empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        text = str(self._tokenizer.decode(self._ids))
        if self._stop:
            start = max(0, self.sent - self._hold)
            hits = [i for s in self._stop if (i := text.find(s, start)) >= 0]
            if hits:
                self.text = text[: min(hits)]
                self.stopped = True
                return self._take(len(self.text))
        self.text = text
        if text.endswith(REPLACEMENT):
            return ""
        return self._take(len(text) - self._hold)

    def finish(self, final_text: str | None = None) -> str:
        """Generation ended: the rest of the text (including a held-back tail)."""
        if final_text is not None and not self.stopped:
            self.text = final_text
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = self.text[self.sent : upto]
        self.sent = upto
        return delta
