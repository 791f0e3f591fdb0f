"""Helpers for tests that drive the real `python -m llmos serve` process (crash, shutdown, load)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from conftest import ADMIN, wait_for
from prometheus_client.parser import text_string_to_metric_families


def start_server(
    data_dir: Path,
    port: int,
    log: Path,
    extra_env: dict[str, str] | None = None,
    wait_ready: bool = True,
    own_group: bool = False,
    args: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start `python -m llmos serve` on a loopback port and wait until /readyz answers 200;
    ``own_group``: in a process group of its own, as a service manager starts it; ``args``: more
    command-line arguments (``--role api``)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmos", "serve", "--data-dir", str(data_dir), "--port", str(port), *args],
        env=llmos_env(extra_env),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=own_group,
    )
    if wait_ready:
        wait_until_ready(proc, port, log)
    return proc


def start_trainer(data_dir: Path, log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `python -m llmos train` (the trainer alone) on the store of ``data_dir``."""
    return subprocess.Popen(
        [sys.executable, "-m", "llmos", "train", "--data-dir", str(data_dir)],
        env=llmos_env(extra_env),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def start_torchrun(
    data_dir: Path, log: Path, extra_env: dict[str, str] | None = None, nproc: int = 2
) -> subprocess.Popen[bytes]:
    """Start `torchrun --standalone --nproc-per-node N -m llmos train` (gloo on the CPU); every
    rank's output goes to ``log``, each line prefixed with its rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += ["--tee", "3", "--log-dir", str(log.parent / f"{log.stem}-ranks"), "-m", "llmos", "train"]
    env = llmos_env({"OMP_NUM_THREADS": "1", **(extra_env or {})})
    cmd += ["--data-dir", str(data_dir)]
    return subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def llmos_env(extra_env: dict[str, str] | None) -> dict[str, str]:
    """This environment without its LLMOS_ settings, with the tests' own and ``extra_env``."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")},
        "HF_HUB_OFFLINE": "1",
        "LLMOS_ADMIN_TOKEN": ADMIN,
        "LLMOS_TRAIN__PASSES_PER_BATCH": "3",
        "LLMOS_TRAIN__FILL_WAIT_S": "0.05",
        "LLMOS_TRAIN__POLL_INTERVAL_S": "0.2",
        **(extra_env or {}),
    }


def wait_until_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Until the server on ``port`` answers /readyz with 200 (90 s at most)."""
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=90, interval=0.3)


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS, in KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def tree_rss_kib(pid: int) -> int:
    """Resident set size of a process and all its descendants (the fork server and the trainer
    process of `llmos serve`), summed; a process that ends meanwhile counts 0."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += rss_kib(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, AssertionError):
            continue
    return total


# ---- load ---------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What a load run saw. Memory comes as series of (seconds since the start, value): ``rss_kib``
    (VmRSS of the server process, from /proc, 4 times a second) and ``tree_rss_kib`` (the same
    summed over the server and its descendants: the fork server and the trainer process), and from
    /metrics once a second ``heap_in_use`` (bytes of C heap handed out and not freed), ``heap_free``
    (what glibc's arenas hold free), ``python_blocks``, and the counters ``generated_tokens`` and
    ``attended_positions`` (what decoding attended to). ``latency_<op>``: each request's seconds,
    at the time it started."""

    clients: int
    duration_s: float
    warmup_s: float
    requests: dict[str, int] = field(default_factory=dict)  # op -> completed with a 2xx
    errors: list[str] = field(default_factory=list)  # anything else: status code or exception, with the op
    latencies_s: dict[str, list[float]] = field(default_factory=dict)
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    texts_acknowledged: int = 0
    window: float = 20.0

    # Memory is compared over windows, not as single samples: one sample lands anywhere in the
    # trainer's step, whose working set (activations, logits, their gradients) swings by ~55 MiB on
    # the built-in model, 8% of the process. Resident memory: the peak of a window (the step's
    # peak plus whatever was retained). Memory in use: its floor (what stays between steps).
    @property
    def window_s(self) -> float:
        return min(self.window, self.duration_s / 3)

    def after_warmup(self, name: str, agg: Callable[[list[float]], float] = max) -> float:
        """``agg`` of series ``name`` over the first window after the warm-up."""
        return agg([v for s, v in self.series[name] if self.warmup_s <= s <= self.warmup_s + self.window_s])

    def at_end(self, name: str, agg: Callable[[list[float]], float] = max) -> float:
        """``agg`` of series ``name`` over the last window of the run."""
        end = self.series[name][-1][0]
        return agg([v for s, v in self.series[name] if end - self.window_s <= s <= end])

    def percentile(self, op: str, q: float) -> float:
        xs = sorted(self.latencies_s.get(op, []))
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_load(
    url: str,
    pid: int,
    keys: list[str],
    duration_s: float = 60.0,
    warmup_s: float = 15.0,
    ingest_share: float = 0.7,
    seed: int = 0,
    new_tokens: int = 16,
) -> LoadReport:
    """One client per key, each in its own thread with its own connection, for ``warmup_s`` and
    then ``duration_s`` more: ingest (1-4 texts, its own source) or greedy generation (16 tokens),
    mixed at random. The server's memory is sampled (see LoadReport). The warm-up is the
    time the server's bounded caches take to fill (SQLite pages, kernels for each batch shape)."""
    report = LoadReport(clients=len(keys), duration_s=duration_s, warmup_s=warmup_s)
    lock = threading.Lock()
    t0 = time.monotonic()
    deadline = t0 + warmup_s + duration_s

    def record(op: str, ok: bool, what: str, latency: float) -> None:
        with lock:
            if ok:
                report.requests[op] = report.requests.get(op, 0) + 1
                report.latencies_s.setdefault(op, []).append(latency)
                report.series.setdefault(f"latency_{op}", []).append((time.monotonic() - latency - t0, latency))
            else:
                report.errors.append(f"{op}: {what}")

    def client(n: int, key: str) -> None:
        rng = random.Random(seed * 1000 + n)
        i = 0
        headers = {"Authorization": f"Bearer {key}"} if key else {}  # "": a server without API keys
        with httpx.Client(base_url=url, timeout=120, headers=headers) as c:
            while time.monotonic() < deadline:
                i += 1
                start = time.monotonic()
                try:
                    if rng.random() < ingest_share:
                        op = "ingest"
                        k = rng.randint(1, 4)
                        items = [
                            {
                                "text": f"client {n} line {i}.{j}: the tide at Korvel turns at {rng.randint(0, 23)}h.",
                                "source": f"client-{n}",
                            }
                            for j in range(k)
                        ]
                        r = c.post("/v1/texts", json={"items": items})
                        if r.status_code == 202:
                            with lock:
                                report.texts_acknowledged += k
                    else:
                        op = "generate"
                        params = {"prompt": f"the tide at Korvel {i}", "max_new_tokens": new_tokens}
                        r = c.get("/generate", params=params)
                    record(op, r.is_success, f"{r.status_code} {r.text[:200]}", time.monotonic() - start)
                except httpx.HTTPError as exc:
                    record(op, False, f"{type(exc).__name__}: {exc}", time.monotonic() - start)

    rss = report.series.setdefault("rss_kib", [])
    tree = report.series.setdefault("tree_rss_kib", [])

    def sample_rss(stop: threading.Event) -> None:
        while not stop.is_set():
            t = time.monotonic() - t0
            rss.append((t, rss_kib(pid)))
            tree.append((t, tree_rss_kib(pid)))
            stop.wait(0.25)

    def sample_heap(stop: threading.Event) -> None:
        scrape = {"Authorization": f"Bearer {keys[0]}"} if keys and keys[0] else {}  # /metrics takes a key
        with httpx.Client(base_url=url, timeout=30, headers=scrape) as c:
            while not stop.wait(1.0):
                t = time.monotonic() - t0
                for name, value in memory_metrics(c.get("/metrics").text).items():
                    report.series.setdefault(name, []).append((t, value))

    stop = threading.Event()
    samplers = [threading.Thread(target=f, args=(stop,), daemon=True) for f in (sample_rss, sample_heap)]
    for sampler in samplers:
        sampler.start()
    threads = [threading.Thread(target=client, args=(n, k)) for n, k in enumerate(keys)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    for sampler in samplers:
        sampler.join()
    rss.append((time.monotonic() - t0, rss_kib(pid)))
    return report


def memory_metrics(text: str) -> dict[str, float]:
    """The heap and Python figures of a /metrics scrape (see llmos/memory.py)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "llmos_heap_bytes" and s.labels["kind"] in ("in_use", "free"):
                out[f"heap_{s.labels['kind']}"] = s.value
            elif s.name == "llmos_python_allocated_blocks":
                out["python_blocks"] = s.value
            elif s.name == "llmos_generated_tokens_total":
                out["generated_tokens"] = s.value
            elif s.name == "llmos_decode_attended_positions_total":
                out["attended_positions"] = s.value
    return out


class Poster:
    """Posts one text at a time from a thread and keeps what each answer said."""

    def __init__(self, url: str, label: str = "outage") -> None:
        self.url, self.label = url, label
        self.acked: list[str] = []  # ids answered 202
        self.answers: list[tuple[float, int, str | None]] = []  # (when, status, Retry-After)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                try:
                    r = c.post("/v1/texts", json={"text": f"{self.label} text {i}: the tide rose {i} inches."})
                except httpx.TransportError:
                    self.answers.append((time.monotonic(), 0, None))  # no answer at all: recorded, and fails the test
                    time.sleep(0.1)
                    continue
                self.answers.append((time.monotonic(), r.status_code, r.headers.get("retry-after")))
                if r.status_code == 202:
                    self.acked.extend(r.json()["ids"])
                time.sleep(0.05)

    def since(self, t: float) -> list[int]:
        return [code for when, code, _ in self.answers if when >= t]
