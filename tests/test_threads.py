"""The thread budget: between its steps the trainer sets its own torch thread count (see
llmos/threads.py), every core once generations have been quiet, the serving budget otherwise;
a trainer process reads the server's generations from shared memory."""

from __future__ import annotations

import multiprocessing
import threading
from multiprocessing.connection import Connection
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
            "runtime.trainer": "thread",  # the test drives the trainer's cycles itself
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


def _quiet_in_a_child(activity: object, conn: Connection) -> None:
    """The trainer process's side: answer quiet(s) for each s sent, until None."""
    from llmos.trainer.process import ApiServing

    serving = ApiServing(None, None, None, activity)  # type: ignore[arg-type]  # only quiet() is asked
    while (quiet_s := conn.recv()) is not None:
        conn.send(serving.quiet(quiet_s))


def test_a_trainer_process_sees_when_the_servers_generations_were_quiet(tmp_path: Path) -> None:
    """runtime.trainer = process: the idle budget's test, quiet(), read from another process."""
    daemon = Daemon(make_settings(tmp_path / "data"))
    daemon.start(run_trainer=False)
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_quiet_in_a_child, args=(daemon.engine.activity, child_conn), daemon=True)
    child.start()

    def quiet(s: float) -> bool:
        conn.send(s)
        return bool(conn.recv())

    try:
        assert quiet(30.0)  # nothing generated yet
        stream = daemon.engine.stream("Alice", SamplingParams(max_new_tokens=4))
        next(stream)
        assert not quiet(0.0)  # one in flight
        for _ in stream:
            pass
        assert quiet(0.0)
        assert not quiet(30.0)  # it ended under 30 s ago
    finally:
        conn.send(None)
        child.join(30)
        daemon.stop()
