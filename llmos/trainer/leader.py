"""The trainer's hold on the store's trainer lease (llmos/store/lease.py): one trainer trains on a
store; any other waits as a standby until the lease is free or runs out.

A holder is named by its host, process id and a random part. A standby that finds the lease held
by a process of its own machine that is gone (killed with -9, say) takes it at once instead of
waiting for it to run out: a restarted server, or a trainer process its server replaced, starts
training in a second, whatever ``train.trainer_lease_s`` is. "Its own machine" is the same boot
and the same process-id namespace (Linux), so a container's pid 1 is never taken for another's.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import uuid

from llmos.store.lease import LeaseLost, TrainerLease

log = logging.getLogger(__name__)


def pid_space() -> str | None:
    """Where a process id names one process: this boot of the kernel and this pid namespace (Linux);
    None where that cannot be told (then a holder's death is found by its lease running out)."""
    if sys.platform != "linux":
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return f"{boot}.{ns}"


def holder_id() -> str:
    """host:pid:pid-space:random (a host name has no colon)."""
    return f"{socket.gethostname()}:{os.getpid()}:{pid_space() or '-'}:{uuid.uuid4().hex[:8]}"


def gone(holder: str) -> bool:
    """Whether ``holder`` names a process of this machine that no longer runs. False when that
    cannot be told (another machine, another namespace, a name not made by holder_id)."""
    parts = holder.split(":")
    here = pid_space()
    if len(parts) != 4 or here is None or parts[2] != here or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # someone else's process has that id: alive
    return False


class Leader:
    """Takes, renews and gives back the trainer lease for one trainer. ``token`` is the fencing
    token of the lease it holds or last held (0: never held): the trainer passes it with each write,
    and the store refuses it once another trainer took over."""

    def __init__(self, lease: TrainerLease, lease_s: float, holder: str | None = None) -> None:
        self._lease = lease
        self.lease_s = lease_s
        self.holder = holder or holder_id()
        self.token = 0
        self.held = False
        self._renewed = 0.0  # time.monotonic() of the last renewal
        self._told_waiting = False  # a standby says once that it waits, not every poll

    def acquire(self) -> bool:
        """Take the lease if it is free, ran out, or its holder is a dead process of this machine."""
        if self.held:
            return True
        token = self._lease.acquire(self.holder, self.lease_s)
        if token is None:
            cur = self._lease.current()
            if cur.holder is not None and gone(cur.holder):
                token = self._lease.acquire(self.holder, self.lease_s, dead=cur.holder)
                if token is not None:
                    log.info("the trainer lease's holder %s is gone: taking over", cur.holder)
            elif not self._told_waiting:
                self._told_waiting = True
                log.info(
                    "standby: trainer %s holds this store's trainer lease (until %s, if it stops renewing)",
                    cur.holder,
                    cur.expires_at,
                )
        if token is None:
            return False
        self.token, self.held, self._renewed, self._told_waiting = token, True, time.monotonic(), False
        log.info("trainer %s holds the trainer lease (token %d)", self.holder, token)
        return True

    def keep(self, force: bool = False) -> None:
        """Renew the lease every third of it (at once if ``force``); raise LeaseLost if it was lost."""
        if not self.held:
            raise LeaseLost(self.token)
        if not force and time.monotonic() - self._renewed <= self.lease_s / 3:
            return
        if not self._lease.renew(self.holder, self.token, self.lease_s):
            self.held = False
            raise LeaseLost(self.token)
        self._renewed = time.monotonic()

    def lost(self) -> None:
        """A write was refused: the lease is another trainer's now."""
        self.held = False

    def release(self) -> None:
        """Give the lease back, so that a standby takes over at once."""
        if self.held:
            self.held = False
            self._lease.release(self.holder, self.token)
