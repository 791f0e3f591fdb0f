"""The CPU thread budget between serving and training.

torch's intra-op thread count is one setting for the whole process: set from any thread, it holds
for every thread's next parallel region (measured: a thread that set 1 computes with 2 after
another set 2). So it is switched as a whole. While a generation is in flight it is the serving
budget (default half the cores): the decoding and the trainer's step each keep cores of their own,
and the trainer yields between steps anyway. While none is, the trainer's steps and evaluations
get every core (on the built-in model 1.8x the tokens/s of one thread, bench/speed.py)."""

from __future__ import annotations

import os

import torch


def cores() -> int:
    return os.cpu_count() or 2


class ThreadBudget:
    def __init__(self, serving: int = 0, idle: int = 0) -> None:
        self.serving = serving or max(1, cores() // 2)  # while generations are in flight
        self.idle = max(idle or cores(), self.serving)  # while none is

    def apply(self, generating: bool) -> None:
        torch.set_num_threads(self.serving if generating else self.idle)
