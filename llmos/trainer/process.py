"""The trainer in its own process (runtime.trainer = "process").

In one process, the trainer's Python (its stages, the store's SQL) and the decoding thread take
turns on the interpreter lock, so each slows the other even on separate cores. Here the API
process starts a child (forked from a fork server that has the imports done: launch.py) that
runs the same Trainer on its own copy of the model. The store and the checkpoint registry are
shared, as another replica would share them; two pipes carry the rest:

    control  API -> trainer: wake, pause, resume, reset, stop; status (answered)
    events   trainer -> API: "promoted": the API process syncs its engine, then answers, so that
             stage 5 returns once serving follows, as it does in one process

The API process supervises the child: when it dies, a new one starts after ``train.error_backoff_s``,
takes the dead one's trainer lease at once (llmos/trainer/leader.py) and returns what it held to
the queue. A child whose API process is gone (its control pipe closes) stops. The child never
waits for the API process's generations (train.yield_to_requests_s is for a trainer thread, which
shares their interpreter lock); it reads how many are in flight, and when the last one ended, from
shared memory, for the opt-in idle thread budget (runtime.torch_threads_idle).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import threading
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import torch

from llmos import wiring  # the same constructors as in one process
from llmos.logs import LogFormat, configure, current_config
from llmos.memory import freeze_startup_objects
from llmos.serving.engine import Activity, Loaded, quiet
from llmos.store.db import Database
from llmos.trainer import launch
from llmos.trainer.active import ActiveModel
from llmos.trainer.loop import TrainerPhase, TrainerStatus

if TYPE_CHECKING:
    from llmos.model.loader import ModelFactory
    from llmos.registry.registry import Registry
    from llmos.serving.engine import ServingEngine
    from llmos.settings import Settings

log = logging.getLogger(__name__)

COMMANDS = ("wake", "pause", "resume", "request_reset")
STATUS_TIMEOUT_S = 5.0  # an answer takes a pipe round trip; longer means the child is stuck or gone
FOLLOW_TIMEOUT_S = 120.0  # the API process loads the promoted version before it answers
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_TIMEOUT_S = 20.0  # the child finishes its step (the trainer's own stop waits 10 s)
SIGNAL_GRACE_S = 2.0  # a child that stopped on SIGTERM: how long to wait for the server's own stop


class TrainerProcess:
    """The API process's handle on the trainer process: the Trainer's control surface (start,
    stop, wake, pause, resume, request_reset, status, alive) over the pipes."""

    def __init__(self, settings: Settings, engine: ServingEngine) -> None:
        self._settings = settings
        self._engine = engine
        self._backoff_s = settings.train.error_backoff_s
        self._ctx = launch.context()  # forked from the fork server: imported once, no threads yet
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._ctrl: Connection | None = None
        self._events: Connection | None = None
        self._ctrl_lock = threading.Lock()  # one request (and its answer) on the control pipe at a time
        self._seq = itertools.count(1)
        self._paused = False  # told again to a restarted child
        # wake() only sets this; the waker thread tells the child, one message for any number of
        # posts: an ingest never waits on the pipe (full while a child is still starting).
        self._wake_wanted = threading.Event()
        self._stopping = threading.Event()
        self._server_stopping = threading.Event()  # the server got a stop signal (see server_stopping)
        self._supervisor: threading.Thread | None = None
        self._last: TrainerStatus | None = None
        self._ready = False  # the child has loaded the active version and obeys its control pipe
        self._exit_error: str | None = None  # why the last child died, until a new one answers

    # ---- control (any thread) ---------------------------------------------------------------
    def start(self) -> None:
        spawned = threading.Event()
        self._supervisor = threading.Thread(
            target=self._supervise, args=(spawned,), name="llmos-trainer-supervisor", daemon=True
        )
        self._supervisor.start()
        spawned.wait()
        threading.Thread(target=self._waker, name="llmos-trainer-waker", daemon=True).start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Ask the child to finish its step, give back what it holds and exit; kill it if it does not."""
        self._stopping.set()
        self._wake_wanted.set()  # ends the waker
        while True:  # again if a restart was under way: the child it started stops too
            proc = self._proc
            self._send(("stop",))
            if proc is not None:
                proc.join(timeout)
                if proc.is_alive():
                    log.error("trainer process did not stop within %.0fs; killing it", timeout)
                    proc.kill()
                    proc.join(5)
            if self._supervisor is not None:
                self._supervisor.join(5)
            if self._proc is proc:
                return

    def wake(self) -> None:
        self._wake_wanted.set()

    def pause(self) -> None:
        self._paused = True
        self._send(("pause",))

    def resume(self) -> None:
        self._paused = False
        self._send(("resume",))

    def request_reset(self) -> None:
        self._send(("request_reset",))

    def server_stopping(self) -> None:
        """The server was told to stop (SIGTERM, SIGINT): a child that stops on the same signal (a
        service manager signals the whole process group) is not restarted, and no error is logged.
        The server's own stop() follows once its requests in flight are answered."""
        self._server_stopping.set()

    def status(self) -> TrainerStatus:
        seq = next(self._seq)
        with self._ctrl_lock:
            conn = self._ctrl
            try:
                if conn is None or not self._ready:
                    raise EOFError
                conn.send(("status", seq))
                while conn.poll(STATUS_TIMEOUT_S):
                    got, st = conn.recv()
                    if got == seq:  # an answer to an earlier request that timed out is dropped
                        self._last = st
                        return st  # type: ignore[no-any-return]
            except (EOFError, OSError):
                pass
        last = self._last or TrainerStatus(TrainerPhase.idle, 0, None, str(self._engine.device), None)
        running = self._proc is not None and self._proc.is_alive()
        if self._exit_error is None and not self._ready and running:
            return replace(last, state=TrainerPhase.idle, last_error="the trainer process is starting")
        why = self._exit_error or "the trainer process does not answer"
        return replace(last, state=TrainerPhase.error, last_error=why)

    @property
    def alive(self) -> bool:
        """Running, with the active version loaded (/readyz says "trainer not running" until then)."""
        return self._ready and self._proc is not None and self._proc.is_alive()

    # ---- the child's life -------------------------------------------------------------------
    def _send(self, msg: tuple[Any, ...]) -> None:
        with self._ctrl_lock:
            try:
                if self._ctrl is not None:
                    self._ctrl.send(msg)
            except (OSError, ValueError):
                pass  # the child is gone: the supervisor starts another, told what matters (pause)

    def _waker(self) -> None:
        while True:
            self._wake_wanted.wait()
            if self._stopping.is_set():
                return
            self._wake_wanted.clear()
            self._send(("wake",))

    def _spawn(self) -> None:
        ctrl, ctrl_child = self._ctx.Pipe()
        events, events_child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=child_main,
            args=(self._settings, current_config(), ctrl_child, events_child, os.getpid(), self._engine.activity),
            name="llmos-trainer",
            daemon=True,  # never outlives this process
        )
        proc.start()
        ctrl_child.close()  # the child's ends: closed here, so that the child's death reads as EOF
        events_child.close()
        with self._ctrl_lock:
            self._proc, self._ctrl, self._events, self._ready = proc, ctrl, events, False
        if self._paused:
            self._send(("pause",))
        log.info("trainer process %d started", proc.pid)

    def _supervise(self, spawned: threading.Event) -> None:
        """Start the child, follow its promotions, and when it dies (not asked to), start another."""
        try:
            self._spawn()
        except Exception:
            log.exception("could not start the trainer process")
        finally:
            spawned.set()
        while True:
            proc, events = self._proc, self._events
            if proc is None or events is None:  # the first start failed: try again below
                if self._stopping.wait(self._backoff_s):
                    return
                self._respawn()
                continue
            try:
                if events.poll(0.5):
                    kind, seq = events.recv()
                    if kind == "ready":
                        self._ready, self._exit_error = True, None
                    else:  # promoted: serving follows, then the child's stage 5 returns
                        events.send(self._follow(seq))
                    continue
            except (EOFError, OSError):
                proc.join(STOP_TIMEOUT_S)  # its end closed: it exited, or is exiting
            if proc.is_alive():
                continue
            # Exit code 0: it stopped on SIGTERM, most often the whole group's, which reaches the
            # server a moment later (or did already).
            if self._stopping.is_set() or self._server_stopping.wait(SIGNAL_GRACE_S if proc.exitcode == 0 else 0):
                log.info("the trainer process stopped with the server (code %s)", proc.exitcode)
                return
            self._exit_error = f"the trainer process exited (code {proc.exitcode}); restarting"
            log.error("%s in %.1fs", self._exit_error, self._backoff_s)
            if self._stopping.wait(self._backoff_s):
                return
            self._respawn()

    def _respawn(self) -> None:
        try:
            self._engine.sync()  # a promotion it made but could not announce
            self._spawn()
        except Exception:  # the store is down, say: try again after the back-off
            log.exception("could not restart the trainer process")

    def _follow(self, seq: int) -> tuple[int, int | None, str | None]:
        """Serve the version the child promoted: (seq, version, None), or (seq, None, why not)."""
        try:
            return seq, self._engine.sync(), None
        except Exception as exc:  # the child's stage 5 fails with it, as in one process
            log.exception("serving could not follow the trainer's promotion")
            return seq, None, f"{type(exc).__name__}: {exc}"


class ApiServing:
    """The trainer process's view of serving (the Serving protocol of llmos/trainer/loop.py): the
    active version read from the registry into this process's own model, and promotions announced
    to the API process, which loads them and answers."""

    in_flight = 0  # generations run in the API process: the trainer does not yield to them

    def __init__(self, registry: Registry, factory: ModelFactory, events: Connection, activity: Activity) -> None:
        self._active = ActiveModel(registry, factory)
        self._events = events
        self._activity = activity  # the API process's ServingEngine.activity
        self._seq = itertools.count(1)

    def wait_idle(self, timeout_s: float) -> bool:
        return True

    def quiet(self, quiet_s: float) -> bool:
        return quiet(self._activity, quiet_s)  # no lock: a torn read only picks one step's thread count

    def current(self) -> Loaded:
        return self._active.current()

    def sync(self) -> int:
        seq = next(self._seq)
        self._events.send(("promoted", seq))
        while self._events.poll(FOLLOW_TIMEOUT_S):
            got, version, error = self._events.recv()
            if got != seq:
                continue  # the answer to a sync that timed out
            if version is None:
                raise RuntimeError(f"serving could not follow the promotion: {error}")
            return int(version)
        raise TimeoutError(f"the API process did not follow the promotion within {FOLLOW_TIMEOUT_S:.0f}s")


class _Stop(Exception):
    pass


def _stop_on_signal(_signum: int, _frame: object) -> None:
    raise _Stop


def die_with_parent(api: int) -> None:
    """Linux: the kernel kills this process as soon as its parent ends, however the API process
    dies (kill -9 included), so that a new server never meets the old one's trainer still at work.
    The parent is the fork server, which exits when the API process is gone (with spawn, the API
    process itself). Elsewhere the closed control pipe stops it, after its step."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    orphaned = os.getppid() == 1 and api != 1  # the parent died before the line above
    if orphaned or not _alive(api):
        os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's: the pid was reused, but a process is there
    return True


def child_main(
    settings: Settings,
    log_config: tuple[str, LogFormat],
    ctrl: Connection,
    events: Connection,
    api: int,
    activity: Activity,
) -> None:
    """The trainer process: build the trainer from the settings, run it, obey the control pipe
    until told to stop or until the API process is gone."""
    die_with_parent(api)
    # Ctrl-C reaches the whole process group: the API process decides when the trainer stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM (a service manager stopping the group, multiprocessing at the API process's exit):
    # stop as when told to, after the step in hand.
    signal.signal(signal.SIGTERM, _stop_on_signal)
    configure(*log_config)
    torch.set_num_threads(wiring.thread_budget(settings).serving)
    db = Database(settings.store_url, settings.store.busy_timeout_s, settings.store.idle_transaction_s)
    registry = wiring.open_registry(settings, db)
    factory = wiring.model_factory(settings)
    trainer = wiring.build_trainer(settings, db, registry, factory, ApiServing(registry, factory, events, activity))
    trainer.start()
    freeze_startup_objects()
    events.send(("ready", 0))
    try:
        while True:
            msg = ctrl.recv()
            if msg[0] == "status":
                ctrl.send((msg[1], trainer.status()))
            elif msg[0] == "stop":
                break
            elif msg[0] in COMMANDS:
                getattr(trainer, msg[0])()
    except (EOFError, OSError):
        log.warning("the API process is gone; the trainer stops")
    except _Stop:
        log.info("trainer process: SIGTERM; stopping")
    finally:
        trainer.stop()
        db.dispose()
