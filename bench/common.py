"""Shared by the speed benchmarks: the machine, side-by-side timing, a real server process, and a
small load generator.

Every figure is a ratio of two things measured in the same run, alternated round by round (A, B,
A, B, ...) so that a burst of load from a neighbour hits both sides; the figure is the median of
the per-round ratios.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
ADMIN = "bench-admin-token"


# ---- the machine ---------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict[str, Any]:
    import torch

    gpu = None
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()}x)"
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_features": " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "?",
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def commit() -> str:
    """The commit the working tree is at, with "+" when the code measured (llmos/, bench/ but its
    results, pyproject.toml) differs from it."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(ROOT),
                "status",
                "--porcelain",
                "--",
                "llmos",
                "bench",
                ":!bench/results",
                "pyproject.toml",
            ],
            capture_output=True,
            text=True,
        )
    except OSError:
        return "?"
    return sha.stdout.strip() + ("+" if dirty.stdout.strip() else "")


# ---- statistics ----------------------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return float(s[k])


def alternate(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each variant once per round, in alternating order; returns each one's results."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].append(variants[name]())
    return out


def ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x / y for x, y in zip(a, b, strict=True)]


# ---- a real server process -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`python -m llmos serve` in its own process (so that the load generator does not share its
    interpreter lock), configured through LLMOS_* variables."""

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        tree: Path | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.args = list(args)  # more arguments of `llmos serve` (--role api)
        self.tree = tree  # another checkout of llmos to run instead of this one (a baseline)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or data_dir.parent / f"{data_dir.name}.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")},
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "LLMOS_ADMIN_TOKEN": ADMIN,
            **(env or {}),
        }
        if tree is not None:
            self.env["PYTHONPATH"] = str(tree)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "llmos", "serve", "--data-dir", str(self.data_dir), "--port", str(self.port)]
        cmd += ["--log-level", "warning", *self.args]  # no access log line per request
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, cwd=self.tree or ROOT
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def admin(self, client: httpx.Client, path: str) -> None:
        r = client.post(self.url + path, headers={"Authorization": f"Bearer {ADMIN}"})
        r.raise_for_status()


# ---- a small load generator ----------------------------------------------------------------------
class _Conn:
    """One keep-alive HTTP/1.1 connection, requests written by hand: much cheaper per request
    than a full client, so that the server, not the load generator, is what is measured."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length) if length else b""
        return status, body


def raw_post(port: int, path: str, payload: Any) -> bytes:
    body = json.dumps(payload).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def blast(port: int, requests: Sequence[bytes], concurrency: int) -> tuple[float, dict[int, int], list[bytes]]:
    """Send every request over ``concurrency`` connections, each waiting for its answer before the
    next; returns (seconds, count by status, bodies in order)."""

    async def run() -> tuple[float, dict[int, int], list[bytes]]:
        conns = []
        for _ in range(concurrency):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            conns.append(_Conn(r, w))
        statuses: dict[int, int] = {}
        bodies: list[bytes] = [b""] * len(requests)
        next_i = 0

        async def worker(c: _Conn) -> None:
            nonlocal next_i
            while next_i < len(requests):
                i = next_i
                next_i += 1
                status, body = await c.request(requests[i])
                statuses[status] = statuses.get(status, 0) + 1
                bodies[i] = body

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        dt = time.perf_counter() - t0
        for c in conns:
            c.writer.close()
        return dt, statuses, bodies

    return asyncio.run(run())
