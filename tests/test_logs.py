"""Logs: one line per event; `llmos serve --log-format json` writes only JSON lines."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_for

from llmos.logs import JsonFormatter, TextFormatter, configure
from llmos.store.db import Database


@pytest.mark.slow  # a real `llmos serve` process: ~10 s on 2 cores
def test_serve_with_json_logs_writes_one_json_object_per_line(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("LLMOS_ADMIN_TOKEN", None)  # so the token file is made and announced, as a log line
    cmd = [sys.executable, "-m", "llmos", "serve", "--log-format", "json", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--data-dir", str(tmp_path / "data")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/readyz").status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None  # died: stop waiting, the asserts below say why

        wait_for(up, timeout=90)
        assert httpx.get(url + "/generate", params={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
        assert httpx.get(url + "/v1/texts/nope").status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()
    lines = [line for line in stderr.decode().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= e.keys() for e in events)
    messages = [e["message"] for e in events]
    assert any("admin token is in" in m for m in messages)
    assert any(m.startswith("serving version 0") for m in messages)
    access = [e for e in events if e["logger"] == "uvicorn.access"]
    assert {(e["method"], e["path"], e["status"]) for e in access} >= {
        ("GET", "/generate?prompt=hi&max_new_tokens=2", 200),
        ("GET", "/v1/texts/nope", 404),
    }


def test_json_logging_covers_llmos_uvicorn_libraries_and_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure("info", "json")
        logging.getLogger("llmos.trainer.loop").info("version %d promoted", 3)
        logging.getLogger("uvicorn.access").info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/v1/trainer", "1.1", 200
        )
        from transformers.utils import logging as hf_logging

        hf_logging.get_logger("transformers.modeling_utils").warning("a library warning")
        warnings.warn("a Python warning", UserWarning, stacklevel=1)
    finally:
        from transformers.utils import logging as hf_logging

        hf_logging.enable_default_handler()
        hf_logging.disable_propagation()
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [e["message"] for e in events][:3] == [
        "version 3 promoted",
        '127.0.0.1:5000 - "GET /v1/trainer HTTP/1.1" 200',
        "a library warning",
    ]
    assert events[1]["path"] == "/v1/trainer" and events[1]["status"] == 200
    assert events[3]["logger"] == "py.warnings" and "a Python warning" in events[3]["message"]


def test_a_start_logs_no_alembic_info_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Every start brings the schema to head: alembic's plugin, context and migration lines are
    # noise at info (llmos's own lines stay); at debug they show.
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure("info", "text")
        fresh = Database(f"sqlite:///{tmp_path / 'info.db'}")
        fresh.create_schema()  # every migration, from none to head
        fresh.dispose()
        logging.getLogger("llmos.daemon").info("store ready")
        configure("debug", "text")
        debug = Database(f"sqlite:///{tmp_path / 'debug.db'}")
        debug.create_schema()
        debug.dispose()
    finally:
        from transformers.utils import logging as hf_logging

        hf_logging.enable_default_handler()
        hf_logging.disable_propagation()
        logging.captureWarnings(False)
        logging.getLogger("alembic").setLevel(logging.NOTSET)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    err = capsys.readouterr().err
    assert "INFO llmos.daemon: store ready\n" in err, err
    at_info, _, at_debug = err.partition("INFO llmos.daemon: store ready\n")
    assert "alembic" not in at_info, at_info
    assert "alembic.runtime.migration: Running upgrade" in at_debug, at_debug


def _record_with_traceback() -> logging.LogRecord:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        return logging.getLogger("llmos.test").makeRecord(
            "llmos.test", logging.ERROR, __file__, 1, "trainer cycle failed", (), sys.exc_info()
        )


def test_a_traceback_stays_on_its_line() -> None:
    record = _record_with_traceback()
    text = TextFormatter().format(record)
    assert "\n" not in text and "trainer cycle failed" in text and "ValueError: bad | thing" in text
    obj = json.loads(JsonFormatter().format(record))
    assert obj["level"] == "error" and "ValueError: bad\nthing" in obj["exc"]
