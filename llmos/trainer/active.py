"""The active version's model, for a trainer whose process serves nothing (the trainer process,
the trainer alone): what the gate compares a candidate with, read from the registry."""

from __future__ import annotations

from llmos.model.loader import ModelFactory
from llmos.registry.registry import Registry
from llmos.serving.engine import Loaded


class ActiveModel:
    def __init__(self, registry: Registry, factory: ModelFactory) -> None:
        self._registry = registry
        self._factory = factory
        self._current: Loaded | None = None

    def current(self) -> Loaded:
        """The active version. Nothing else here holds its model, so a newer version is loaded
        into it in place (no new model per promotion)."""
        version = self._registry.active_version()
        cur, self._current = self._current, None  # if a load below fails, the next call starts afresh
        if cur is None or cur.version != version:
            path = self._registry.weights_path(version)  # verified
            if cur is None or path is None:
                cur = Loaded(version, self._factory.instance(path))
            else:
                self._factory.load_weights(cur.model, path)
                cur = Loaded(version, cur.model)
        self._current = cur
        return cur
