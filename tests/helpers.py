"""Helpers for tests that drive the real `python -m llmos serve` process (crash, shutdown, load)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import ADMIN, wait_for


def start_server(
    data_dir: Path, port: int, log: Path, extra_env: dict[str, str] | None = None, wait_ready: bool = True
) -> subprocess.Popen[bytes]:
    """Start `python -m llmos serve` on a loopback port and wait until /readyz answers 200."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")},
        "HF_HUB_OFFLINE": "1",
        "LLMOS_ADMIN_TOKEN": ADMIN,
        "LLMOS_TRAIN__PASSES_PER_BATCH": "3",
        "LLMOS_TRAIN__FILL_WAIT_S": "0.05",
        "LLMOS_TRAIN__POLL_INTERVAL_S": "0.2",
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmos", "serve", "--data-dir", str(data_dir), "--port", str(port)],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    if not wait_ready:
        return proc
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=90, interval=0.3)
    return proc


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS, in KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")
