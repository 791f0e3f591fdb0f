"""An API replica's handle on the trainer (serve --role api): it runs in another process
(llmos train), maybe on another machine, and shares only the store with this one. What the
replica knows of it comes from the store's trainer lease; nothing here can steer it."""

from __future__ import annotations

from dataclasses import dataclass

from llmos.store.lease import TrainerLease
from llmos.trainer.loop import TrainerPhase, TrainerStatus


class TrainerElsewhere(RuntimeError):
    """A control (pause, resume) that only the trainer's own process can carry out."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"this server is an API replica (serve --role api): the trainer runs in its own process "
            f"(llmos train); {what} it there (stop it, or start it again)"
        )


@dataclass(frozen=True)
class RemoteTrainer:
    """The trainer's control surface (start, stop, wake, pause, resume, request_reset, status,
    alive) for a process that runs none. A post is found by the trainer's own poll of the queue
    (train.poll_interval_s), a rollback by its own watch of the active version (llmos/trainer/alone.py;
    failing that, the store refuses its next promotion: llmos/trainer/swap.py)."""

    lease: TrainerLease
    device: str

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def request_reset(self) -> None:
        pass

    def pause(self) -> None:
        raise TrainerElsewhere("pause")

    def resume(self) -> None:
        raise TrainerElsewhere("resume")

    def status(self) -> TrainerStatus:
        """State "remote" while some trainer holds the store's trainer lease, with its name; an
        error when none does (no llmos train runs, or it died and its lease ran out)."""
        cur = self.lease.current()
        if cur.live:
            return TrainerStatus(TrainerPhase.remote, 0, None, self.device, None)
        why = "no trainer holds this store's trainer lease: start `llmos train` on this store"
        return TrainerStatus(TrainerPhase.error, 0, None, self.device, why)

    @property
    def alive(self) -> bool:
        return True  # a replica serves without a trainer; status() says when none runs
