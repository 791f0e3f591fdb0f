"""The CPU thread budget between serving and training.

torch's intra-op thread count belongs to each thread: a thread takes the process-wide value
(the last one any thread set) at its first parallel operation, and from then on changes only
when it calls torch.set_num_threads itself. So each side sets its own. The decoding thread runs
with the serving budget (default half the cores; on the built-in model two threads decode a
16-token answer in 15 ms against 8 ms for one: small operations gain nothing from threads). The
trainer, between its steps, may take more (runtime.torch_threads_idle) once no generation has run
for a quiet time (default 1 s), and the serving budget otherwise, so that a steady stream of
requests never meets a step that holds every core.

That is opt-in. Measured on 2 cores (make bench), with every core for the trainer once quiet:
figure 2's samples/s 1.31x and 1.21x the default in two runs; figure 5's p99 busy/paused 1.67
against 1.38 with one thread in the first run, 1.40 against 1.25 in the second."""

from __future__ import annotations

import os
from dataclasses import dataclass


def cores() -> int:
    return os.cpu_count() or 2


@dataclass(frozen=True)
class ThreadBudget:
    serving: int  # the decoding thread's, and the trainer's while generations come
    idle: int  # the trainer's once none has come for a while

    @classmethod
    def of(cls, serving: int = 0, idle: int = 0) -> ThreadBudget:
        """0 means the default: half the cores for serving, and the same when idle (off)."""
        s = serving or max(1, cores() // 2)
        return cls(s, max(idle, s))
