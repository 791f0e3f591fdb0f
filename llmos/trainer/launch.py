"""How a trainer process starts: forked from a fork server that has imported the trainer once.

A fresh interpreter (multiprocessing's spawn) spends seconds importing torch and transformers
before it can train: 7 s on a slow 2-core machine, as long again as the API process's own
imports, and again after every crash. The fork server imports them once, single-threaded and
before any torch operation has run (so a fork is safe), and each trainer process is then a fork
of it. `llmos serve` starts it first of all, so that its imports and the API process's run side
by side. It exits when the API process does (its pipe to the API process closes), and the
trainer process with it (llmos/trainer/process.py, die_with_parent).

This module imports nothing heavy: the CLI calls it before it imports the rest of llmos.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerContext, SpawnContext

# fork_server: it ignores SIGTERM; process: with it torch, transformers and the stages
PRELOAD = ["llmos.trainer.fork_server", "llmos.trainer.process"]


def context() -> ForkServerContext | SpawnContext:
    """Where trainer processes come from: the fork server where the platform has one, a fresh
    interpreter (spawn) elsewhere (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts: the first call, or warm_up()
    return ctx


def warm_up() -> None:
    """Start the fork server now (it imports in the background); a no-op once it runs."""
    if context().get_start_method() == "forkserver":
        forkserver.ensure_running()
