"""The cyclic garbage collector after start: a full collection walks what the process created
since, not the ~450k objects of the modules and models loaded at start, so it cannot stop every
request and the trainer for a quarter of a second (llmos/daemon.py, freeze_startup_objects)."""

from __future__ import annotations

import gc
from pathlib import Path

from conftest import make_settings

from llmos.daemon import Daemon


def test_a_full_collection_after_start_does_not_walk_the_startup_objects(tmp_path: Path) -> None:
    daemon = Daemon(make_settings(tmp_path / "data"))
    gc.unfreeze()  # whatever an earlier test froze: this test's start must do it
    gc.collect()  # and what earlier tests left as garbage is not what start holds
    try:
        held = len(gc.get_objects())
        daemon.start(run_trainer=False)
        assert held > 100_000, held  # torch, transformers and the models: what a full collection would walk
        assert gc.get_freeze_count() > held * 0.9  # all of it but the garbage collected first
        assert len(gc.get_objects()) < held / 10
        # The model the engine serves is among them.
        model = daemon.engine.current().model
        assert not any(o is model for o in gc.get_objects())
    finally:
        daemon.stop()
