"""Imported by the fork server alone (launch.PRELOAD lists it first), for its one side effect.

A service manager stops a server by sending SIGTERM to every process of its group (systemd's
default). The fork server must not die of it at once: the trainer process, its child, would die
with it (die_with_parent) in the middle of a step, holding claimed texts. So it ignores SIGTERM,
and exits when the API process is gone (its pipe to the API process closes), after the API
process has stopped the trainer. A trainer process sets its own handler as it starts.
"""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
