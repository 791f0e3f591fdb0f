"""The thread budget: between its steps the trainer sets its own torch thread count (see
llmos/threads.py), every core once generations have been quiet, the serving budget otherwise."""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from conftest import make_settings

from llmos.daemon import Daemon
from llmos.serving.types import SamplingParams
from llmos.store.queue import NewSample


def test_the_trainer_takes_every_core_only_once_generations_have_been_quiet(tmp_path: Path) -> None:
    """Between its steps the trainer sets its own torch thread count: the idle budget when no
    generation has come for runtime.torch_threads_quiet_s, the serving budget otherwise."""
    settings = make_settings(
        tmp_path / "data",
        **{
            "train.passes_per_batch": 2,
            "runtime.torch_threads": 1,
            "runtime.torch_threads_idle": 2,
            "runtime.torch_threads_quiet_s": 30,
        },
    )
    daemon = Daemon(settings)
    daemon.start(run_trainer=False)
    before = torch.get_num_threads()
    seen: list[int] = []

    model = daemon.trainer._require_state().model
    model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))

    def cycle() -> None:  # on a thread of its own, as the trainer runs
        assert daemon.trainer._require_state().model is model  # the hook sees every forward pass
        daemon.trainer.cycle()

    try:
        daemon.ingest([NewSample(f"quiet text number {i}.") for i in range(4)])
        t = threading.Thread(target=cycle)
        t.start()
        t.join()
        assert seen and set(seen) == {2}, seen  # nothing was generated: every core

        daemon.generate("Alice", SamplingParams(max_new_tokens=2))
        seen.clear()
        daemon.ingest([NewSample(f"busy text number {i}.") for i in range(4)])
        t = threading.Thread(target=cycle)
        t.start()
        t.join()
        assert seen and set(seen) == {1}, seen  # a generation ended under 30 s ago: the serving budget
    finally:
        daemon.stop()
        torch.set_num_threads(before)
