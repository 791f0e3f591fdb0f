"""What makes two texts the same text: Unicode normalisation and a hash of the result.

The store records each sample's hash when it is posted (repeats are found by it) and the trainer
trains on the normalised text; both come from here, so they agree. No torch: the API imports it.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

# Control characters (Unicode category Cc: U+0000-001F and U+007F-009F) except tab and newline,
# and lone surrogates (Cs).
_DROP = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def normalise(text: str) -> str:
    """Unicode NFC, control characters removed (newline and tab kept), outer whitespace stripped.

    Only controls (Cc) and lone surrogates (Cs) go: format characters (Cf) such as the zero-width
    joiner of an emoji sequence or the ZWNJ of Persian spelling are part of the text."""
    return _DROP.sub("", unicodedata.normalize("NFC", text)).strip()


def text_hash(text: str) -> str:
    """sha256 (hex) of the normalised text: equal for texts that train as the same text."""
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()
