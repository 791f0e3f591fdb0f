"""Stage 5 — hot-swap: promote the candidate in the registry, then let serving follow.

Promotion is a compare-and-set on the active version: if an admin rolled back while this
candidate was being trained, the rollback wins and the candidate is not served.
"""

from __future__ import annotations

from typing import Protocol

from llmos.registry.registry import Registry
from llmos.store.checkpoints import CheckpointRecord


class Follower(Protocol):
    """Anything that serves the registry's active version (the serving engine)."""

    def sync(self) -> int: ...


def swap(record: CheckpointRecord, registry: Registry, serving: Follower) -> bool:
    """Returns False when the active version moved meanwhile and the candidate was not promoted."""
    assert record.parent_version is not None
    if not registry.promote(record.version, expected_active=record.parent_version):
        return False
    serving.sync()
    return True
