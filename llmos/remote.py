"""The commands that talk to a running llmos over HTTP: ingest, status, checkpoints, rollback,
forget, generate. (``llmos serve`` runs the server; ``llmos export`` reads a data directory.)

Each takes ``--url`` (default $LLMOS_URL or http://127.0.0.1:8000) and, where the server has API
keys, ``--api-key`` ($LLMOS_API_KEY). ``rollback`` and ``forget`` need the admin token: ``--token``, else
$LLMOS_ADMIN_TOKEN, else the file ``<data-dir>/admin_token`` that ``llmos serve`` made.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:8000"
MAX_BATCH_BYTES = 512 * 1024  # well under the server's default 1 MiB body cap

UrlOpt = Annotated[str, typer.Option("--url", envvar="LLMOS_URL", help="The llmos server.")]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="LLMOS_API_KEY", help="API key, when the server has auth.api_keys."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the server's JSON instead of a table.")]
TokenOpt = Annotated[str | None, typer.Option("--token", help="Admin token (else $LLMOS_ADMIN_TOKEN).")]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Where to find admin_token (default ./llmos-data).")
]

err = Console(stderr=True)
out = Console()
UNWRAPPED = 100_000  # columns: wider than any table, so that none wraps


def table_out() -> Console:
    """Where a table goes: stdout at a terminal's width; piped or redirected, as wide as the table
    (rich would squeeze it into 80 columns, each row wrapped over lines that grep and cut cannot use)."""
    return out if out.is_terminal else Console(width=UNWRAPPED)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"llmos: {message}", markup=False, highlight=False)
    raise typer.Exit(code)


class Server:
    """A small HTTP client that turns transport and API errors into one clear line and exit 1."""

    def __init__(self, url: str, bearer: str | None = None, timeout: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            fail(f"cannot reach llmos at {self.url} ({type(exc).__name__}: {exc}); is `llmos serve` running?")

    def call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.request(method, path, **kw)
        if r.status_code >= 400:
            fail(f"{method} {path} failed with {r.status_code}: {detail(r)}")
        return r.json()


def detail(r: httpx.Response) -> str:
    try:
        d = r.json().get("detail", r.text)
    except ValueError:
        return r.text[:500]
    if isinstance(d, list):  # validation errors: one per problem
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in d)
    return str(d)


def admin_token(token: str | None, data_dir: Path | None) -> str:
    if token:
        return token
    if os.environ.get("LLMOS_ADMIN_TOKEN"):
        return os.environ["LLMOS_ADMIN_TOKEN"]
    d = data_dir or Path(os.environ.get("LLMOS_DATA_DIR", "./llmos-data"))
    path = d / "admin_token"
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        fail(f"no admin token: pass --token, set LLMOS_ADMIN_TOKEN, or point --data-dir at the server's data ({path})")


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, int | float) and not isinstance(x, bool) else "-"


# ---- ingest ------------------------------------------------------------------------------------
class Format(StrEnum):
    auto = "auto"
    jsonl = "jsonl"
    text = "text"


@dataclass
class Item:
    line: int
    body: dict[str, Any]


@dataclass
class Rejected:
    line: int
    reason: str


@dataclass
class Tally:
    accepted: int = 0
    rejected: list[Rejected] = field(default_factory=list)


def content_key(text: str, occurrence: int) -> str:
    """The idempotency key of a text: sha256 of its content, and of its occurrence number when the
    same text comes again in one file (so intended repeats are kept, and a re-run adds nothing)."""
    data = text if occurrence == 0 else f"{text}\0{occurrence}"
    return "sha256:" + hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()


def read_samples(path: Path, fmt: Format, paragraphs: bool) -> Iterator[Item | Rejected]:
    """Texts of a file, with the line each starts on."""
    if fmt is Format.auto:
        fmt = Format.jsonl if path.suffix.lower() in (".jsonl", ".ndjson") else Format.text
    seen: Counter[str] = Counter()

    def item(line: int, text: str, extra: dict[str, Any]) -> Item:
        key = extra.pop("idempotency_key", None) or content_key(text, seen[text])
        seen[text] += 1
        return Item(line, {"text": text, **extra, "idempotency_key": key})

    with path.open(encoding="utf-8", errors="surrogateescape", newline=None) as f:
        if fmt is Format.jsonl:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as exc:
                    yield Rejected(n, f"not JSON ({exc.msg})")
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    yield Rejected(n, "no 'text' string")
                    continue
                extra = {k: obj[k] for k in ("source", "weight", "idempotency_key") if obj.get(k) is not None}
                yield item(n, obj["text"], extra)
            return
        block: list[str] = []
        start = 0
        for n, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if not paragraphs:
                if line.strip():
                    yield item(n, line, {})
                continue
            if line.strip():
                if not block:
                    start = n
                block.append(line)
            elif block:
                yield item(start, "\n".join(block), {})
                block = []
        if block:
            yield item(start, "\n".join(block), {})


def _batches(items: Iterator[Item | Rejected], size: int, tally: Tally) -> Iterator[list[Item]]:
    batch: list[Item] = []
    nbytes = 0
    for it in items:
        if isinstance(it, Rejected):
            tally.rejected.append(it)
            continue
        b = len(json.dumps(it.body, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        if batch and (len(batch) >= size or nbytes + b > MAX_BATCH_BYTES):
            yield batch
            batch, nbytes = [], 0
        batch.append(it)
        nbytes += b
    if batch:
        yield batch


def _post(server: Server, batch: list[Item], tally: Tally, progress: Progress, task: Any) -> None:
    """Post one batch; on 429 wait as told; when the server refuses the batch (422, 413), post
    smaller pieces so that one bad text costs only itself."""
    while True:
        try:
            body = json.dumps({"items": [it.body for it in batch]}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            r = None  # a text that is not valid Unicode: the server would refuse it
        else:
            r = server.request("POST", "/v1/texts", content=body, headers={"Content-Type": "application/json"})
        if r is not None and r.status_code == 429:
            wait = float(r.headers.get("Retry-After", "1") or 1)
            progress.update(task, description=f"waiting {wait:g}s (server busy)")
            time.sleep(min(max(wait, 0.1), 60))
            progress.update(task, description="ingesting")
            continue
        break
    if r is not None and r.status_code == 202:
        tally.accepted += len(batch)
        progress.advance(task, len(batch))
        return
    if r is not None and r.status_code not in (400, 413, 422):
        fail(f"POST /v1/texts failed with {r.status_code}: {detail(r)}")
    if len(batch) > 1:
        half = len(batch) // 2
        _post(server, batch[:half], tally, progress, task)
        _post(server, batch[half:], tally, progress, task)
        return
    reason = detail(r) if r is not None else "not valid Unicode"
    tally.rejected.append(Rejected(batch[0].line, reason))
    progress.advance(task, 1)


def ingest(
    file: Annotated[
        Path, typer.Argument(help="JSONL with a 'text' field, or plain text.", exists=True, dir_okay=False)
    ],
    url: UrlOpt = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
    fmt: Annotated[
        Format, typer.Option("--format", help="auto: JSONL for .jsonl/.ndjson files, plain text otherwise.")
    ] = Format.auto,
    paragraphs: Annotated[
        bool, typer.Option("--paragraphs", help="Plain text: one sample per blank-line paragraph, not per line.")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, max=1000, help="Texts per request.")] = 200,
) -> None:
    """Queue every text of FILE for training, in batches, with a progress bar.

    Each text carries an idempotency key made from its content (sha256), so running the command
    again, e.g. after an interruption, adds nothing twice."""
    tally = Tally()
    total = sum(1 for it in read_samples(file, fmt, paragraphs) if isinstance(it, Item))
    server = Server(url, api_key)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("ingesting", total=total)
        for batch in _batches(read_samples(file, fmt, paragraphs), batch_size, tally):
            _post(server, batch, tally, progress, task)
    out.print(f"accepted {tally.accepted}, rejected {len(tally.rejected)}", highlight=False)
    for r in sorted(tally.rejected, key=lambda r: r.line)[:50]:
        err.print(f"  line {r.line}: {r.reason}", markup=False, highlight=False)
    if len(tally.rejected) > 50:
        err.print(f"  ... and {len(tally.rejected) - 50} more", highlight=False)


# ---- reading -----------------------------------------------------------------------------------
def status(url: UrlOpt = DEFAULT_URL, api_key: ApiKeyOpt = None, as_json: JsonOpt = False) -> None:
    """The trainer, the queue and the version being served."""
    t = Server(url, api_key).call("GET", "/v1/trainer")
    if as_json:
        out.print_json(data=t)
        return
    rows = [
        ("active version", t["active_version"]),
        ("trainer", t["state"]),
        ("step", t["step"]),
        ("queue depth", t["queue_depth"]),
        ("train loss", _fmt(t.get("last_loss"))),
        ("prequential loss", _fmt(t.get("prequential_loss"))),
        ("device", t["device"]),
    ]
    if t.get("last_error"):
        rows.append(("last error", t["last_error"]))
    for k, v in rows:
        out.print(f"{k:<17} {v}", highlight=False, markup=False)


def checkpoints(url: UrlOpt = DEFAULT_URL, api_key: ApiKeyOpt = None, as_json: JsonOpt = False) -> None:
    """The stored versions, newest first, with their metrics and status."""
    r = Server(url, api_key).call("GET", "/v1/checkpoints")
    if as_json:
        out.print_json(data=r)
        return
    table = Table("version", "status", "parent", "created", "step", "samples", "held-out", "anchor", "train")
    for c in r["checkpoints"]:
        m = c.get("metrics") or {}
        active = c["version"] == r["active_version"]
        table.add_row(
            f"{c['version']}{' *' if active else ''}",
            c["status"] + (" (corrupt)" if c.get("corrupt") else ""),
            "-" if c["parent_version"] is None else str(c["parent_version"]),
            (c.get("created_at") or "-")[:19].replace("T", " "),
            str(c["step"]),
            str(c["samples_seen"]),
            _fmt(m.get("heldout_loss")),
            _fmt(m.get("anchor_loss")),
            _fmt(m.get("train_loss")),
        )
    table_out().print(table)
    out.print(f"* active version: {r['active_version']}", highlight=False)


# ---- acting ------------------------------------------------------------------------------------
def rollback(
    version: Annotated[int, typer.Argument(min=0, help="The version to serve.")],
    requeue: Annotated[
        bool, typer.Option("--requeue", help="Queue again the texts trained only in the abandoned versions.")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Serve an earlier version now; the trainer continues from it."""
    server = Server(url, admin_token(token, data_dir))
    r = server.call("POST", "/v1/admin/rollback", json={"version": version, "requeue": requeue})
    out.print(f"active version is now {r['active_version']} (requeued {r['requeued']} texts)", highlight=False)


def forget(
    ids: Annotated[list[str] | None, typer.Option("--id", help="A text's id (repeat for more).")] = None,
    source: Annotated[str | None, typer.Option("--source", help="Every text posted with this source.")] = None,
    keys: Annotated[
        list[str] | None, typer.Option("--idempotency-key", help="A text by the key it was posted with (repeat).")
    ] = None,
    caller: Annotated[
        str | None,
        typer.Option(
            "--caller", help="Whose idempotency keys, as the audit log names the credential (default: anyone's)."
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the job until it is done.")] = True,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Forget texts: erase them, stop serving every version they trained, and train again what those
    versions learned besides (see docs/operations.md). Serving has switched when the job starts;
    a progress bar follows the retraining."""
    if not ids and not keys and source is None:
        fail("name what to forget: --id, --idempotency-key or --source", code=2)
    server = Server(url, admin_token(token, data_dir))
    body: dict[str, Any] = {}
    if ids:
        body["ids"] = ids
    if keys:
        body["idempotency_keys"] = keys
    if source is not None:
        body["source"] = source
    if caller is not None:
        body["caller"] = caller
    job = server.call("POST", "/v1/admin/forget", json=body)
    served = "unchanged" if job["rolled_back_to"] is None else f"version {job['rolled_back_to']}"
    erased = ", ".join(str(v) for v in job["erased_versions"]) or "none"
    out.print(
        f"forget job {job['id']}: {job['forgotten']} texts erased; versions erased: {erased}; serving {served}",
        highlight=False,
    )
    if not wait:
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("retraining", total=job["retrain_total"])
        while job["state"] != "done":
            progress.update(task, completed=job["retrained"], description=job["state"])
            time.sleep(0.5)
            job = server.call("GET", f"/v1/admin/forget/{job['id']}")
        progress.update(task, completed=job["retrained"], description="done")
    out.print(f"done: {job['retrained']} texts trained again", highlight=False)


def generate(
    prompt: Annotated[str, typer.Argument(help="The text to continue.")],
    url: UrlOpt = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
    model: Annotated[str, typer.Option("--model", help="'llmos' (the active version) or 'llmos@<version>'.")] = "llmos",
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(min=0, max=2, help="0 = greedy.")] = 0.0,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print tokens as they come.")] = True,
) -> None:
    """Complete PROMPT; the completion goes to stdout, its version and generation id to stderr."""
    server = Server(url, api_key)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
    if not stream:
        r = server.call("POST", "/v1/completions", json=body)
        sys.stdout.write(r["choices"][0]["text"] + "\n")
        err.print(f"[{r['model']}, generation {r['id']}]", markup=False, highlight=False)
        return
    body |= {"stream": True}
    try:
        with server.http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code >= 400:
                r.read()
                fail(f"POST /v1/completions failed with {r.status_code}: {detail(r)}")
            gid = model_at = None
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    fail(f"generation failed: {chunk['error'].get('message')}")
                gid, model_at = chunk["id"], chunk["model"]
                for choice in chunk["choices"]:
                    sys.stdout.write(choice.get("text", ""))
                    sys.stdout.flush()
    except httpx.TransportError as exc:
        fail(f"cannot reach llmos at {server.url} ({type(exc).__name__}: {exc}); is `llmos serve` running?")
    sys.stdout.write("\n")
    err.print(f"[{model_at}, generation {gid}]", markup=False, highlight=False)
