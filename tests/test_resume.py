"""Exact resume: training, a restart, then more training gives the same weights as training
straight through (CPU, fixed seeds): the checkpoint holds everything the trainer's future
depends on (weights, optimizer state, step, RNG), and every random choice after it (shuffles,
replay draws, reservoir updates) is seeded from saved state."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import make_settings

from llmos.daemon import Daemon
from llmos.store.queue import NewSample

FIRST = [f"Order {i} ships from the Lyon depot on Tuesday." for i in range(30)]
SECOND = [f"Invoice {i} is paid by bank transfer within 30 days." for i in range(30)]


def open_daemon(data: Path) -> Daemon:
    overrides = {"train.passes_per_batch": 3, "runtime.torch_threads": 1, "runtime.trainer": "thread"}
    settings = make_settings(data, **overrides)
    daemon = Daemon(settings)
    daemon.start(run_trainer=False)  # the test drives the trainer's cycles itself
    return daemon


def train(daemon: Daemon, texts: list[str]) -> None:
    daemon.ingest([NewSample(t) for t in texts])
    while daemon.queue.depth() > 0:
        daemon.trainer.cycle()


def weights(daemon: Daemon) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in daemon.engine.current().model.state_dict().items()}


def test_restart_between_batches_changes_nothing(tmp_path: Path) -> None:
    straight = open_daemon(tmp_path / "straight")
    train(straight, FIRST)
    train(straight, SECOND)
    want, want_version = weights(straight), straight.registry.active_version()
    want_step = straight.trainer.status().step
    straight.stop()

    first = open_daemon(tmp_path / "restarted")
    train(first, FIRST)
    mid_version = first.registry.active_version()
    first.stop()  # the process ends here; everything after comes from disk
    second = open_daemon(tmp_path / "restarted")
    assert second.registry.active_version() == mid_version
    train(second, SECOND)
    got, got_version = weights(second), second.registry.active_version()
    assert second.trainer.status().step == want_step
    second.stop()

    assert got_version == want_version
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6), name
    # And the training moved the weights at all (the comparison is not between two base models).
    assert mid_version > 0 and want_step > 0
