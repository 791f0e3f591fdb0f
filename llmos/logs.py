"""Log output: one line per event, as text for people or JSON for machines.

``llmos serve --log-format json`` writes one JSON object per line on stderr::

    {"ts": "2026-11-28T15:02:11.532Z", "level": "info", "logger": "llmos.serving.engine",
     "message": "serving version 3 (loaded in 0.004s)"}

with ``exc`` (the traceback) when there is one, and for uvicorn's access log ``client``,
``method``, ``path`` and ``status``. In text format a traceback is kept on the same line, its
line breaks written as `` | ``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, _http, status = record.args
            out.update(client=client, method=method, path=path, status=status)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r\n", " | ").replace("\n", " | ")


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when the event happens, not when the handler was made
    (a test runner swaps it; a stream captured at start would be closed later)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def configure(level: str, fmt: LogFormat) -> None:
    """Route every logger (llmos, uvicorn, libraries) through one handler on stderr."""
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        # Ours from an earlier call, or basicConfig's; a host's own handlers (a test runner's) stay.
        if isinstance(h, StderrHandler) or type(h) is logging.StreamHandler:
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Alembic narrates every start at INFO (its plugins, its context, each migration): its
    # warnings only, unless the operator asked for debug.
    logging.getLogger("alembic").setLevel(logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.setLevel(logging.NOTSET)  # the root's level, until uvicorn applies --log-level
        lg.propagate = True
    logging.captureWarnings(False)  # (re)start capturing: a test runner may have swapped showwarning
    logging.captureWarnings(True)  # Python warnings become log lines too
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a progress bar is not an event (first start saves the built-in model)
    hf_logging.disable_default_handler()  # transformers' own stderr handler: ours formats its lines
    hf_logging.enable_propagation()


def current_config() -> tuple[str, LogFormat]:
    """The level and format configure() set in this process: a child process (the trainer's)
    configures itself alike."""
    root = logging.getLogger()
    fmt: LogFormat = "text"
    for h in root.handlers:
        if isinstance(h, StderrHandler) and isinstance(h.formatter, JsonFormatter):
            fmt = "json"
    return logging.getLevelName(root.level).lower(), fmt
