"""Stage 5 — hot-swap: promote the candidate in the registry, then let serving follow.

Promotion is a compare-and-set on the active version: if an admin rolled back while this
candidate was being trained, the rollback wins and the candidate is not served. It carries the
trainer lease's token too: a trainer that lost the lease (paused past it, say) promotes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from llmos.registry.registry import Registry
from llmos.store.checkpoints import CheckpointRecord


class Follower(Protocol):
    """Anything that serves the registry's active version (the serving engine)."""

    def sync(self) -> int: ...


def swap(
    record: CheckpointRecord,
    registry: Registry,
    serving: Follower,
    fence: int | None = None,
    trained: Callable[[int], None] | None = None,
) -> bool:
    """Returns False when the candidate was not promoted: the active version moved meanwhile, or
    ``fence`` is no longer the trainer lease's token. ``trained(version)`` marks what the version
    holds trained, once it is promoted: a trainer stopped between the two leaves its samples in
    training, for its successor to train again, never marked trained in a version nobody serves."""
    assert record.parent_version is not None
    if not registry.promote(record.version, expected_active=record.parent_version, fence=fence):
        return False
    try:
        if trained is not None:
            trained(record.version)
    finally:
        serving.sync()  # the version is active in the store whatever became of the marking
    return True
