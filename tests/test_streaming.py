"""Streaming generation over HTTP: GET /generate?stream=true and POST /generate {"stream": true}
answer with Server-Sent Events, against the real server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import LiveServer, make_settings, wait_for

PROMPT = "Streaming, one chunk at a time: "


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("streaming") / "data", **{"serving.max_new_tokens_cap": 256})
    with LiveServer(settings) as s:
        yield s


def events(r: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) per Server-Sent Event; unnamed events are 'message'."""
    name, data = "message", []
    for line in r.iter_lines():
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].removeprefix(" "))


def stream(c: httpx.Client, method: str, **kw: Any) -> tuple[httpx.Response, list[tuple[str, dict[str, Any]]]]:
    with c.stream(method, "/generate", **kw) as r:
        if r.status_code != 200:
            r.read()
            return r, []
        return r, list(events(r))


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_streamed_chunks_add_up_to_the_plain_greedy_answer(srv: LiveServer, method: str) -> None:
    with srv.client() as c:
        plain = c.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 48})
        assert plain.status_code == 200, plain.text
        want = plain.json()
        ask: dict[str, Any] = {"prompt": PROMPT, "max_new_tokens": 48}
        if method == "GET":
            r, got = stream(c, "GET", params={**ask, "stream": "true"})
        else:
            r, got = stream(c, "POST", json={**ask, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = [data["text"] for name, data in got if name == "message"]
    assert len(chunks) > 1  # token by token, not one block at the end
    assert all(chunks)
    assert "".join(chunks) == want["text"]
    assert [name for name, _ in got][-1] == "done" and sum(name == "done" for name, _ in got) == 1
    done = got[-1][1]
    assert done["model_version"] == want["model_version"]
    assert done["prompt_tokens"] == want["prompt_tokens"]
    assert done["completion_tokens"] == want["completion_tokens"]
    assert done["finish_reason"] == want["finish_reason"]
    assert done["generation_id"] != want["generation_id"]  # a generation of its own


def test_the_streamed_generation_is_recorded_and_takes_feedback(srv: LiveServer) -> None:
    with srv.client() as c:
        _r, got = stream(c, "POST", json={"prompt": PROMPT, "max_new_tokens": 8, "stream": True})
        gid = got[-1][1]["generation_id"]
        fb = c.post("/v1/feedback", json={"generation_id": gid, "rating": -1})
        assert fb.status_code == 202, fb.text


@pytest.mark.parametrize(
    ("method", "ask"),
    [
        ("GET", {"prompt": PROMPT, "stream": "true", "max_new_tokens": 0}),
        ("GET", {"prompt": PROMPT, "stream": "true", "max_new_tokens": 257}),  # past serving.max_new_tokens_cap
        ("GET", {"prompt": PROMPT, "stream": "maybe"}),
        ("POST", {"prompt": PROMPT, "stream": True, "temperature": -1}),
        ("POST", {"prompt": PROMPT, "stream": "true"}),  # a JSON body says true, not "true"
        ("POST", {"prompt": PROMPT, "stream": True, "max_new_tokens": 8, "stram": 1}),
        ("POST", {"prompt": "x" * 2000, "stream": True}),  # more tokens than the model's context
    ],
)
def test_bad_parameters_get_422_before_any_event(srv: LiveServer, method: str, ask: dict[str, Any]) -> None:
    with srv.client() as c:
        if method == "GET":
            r, got = stream(c, "GET", params=ask)
        else:
            r, got = stream(c, "POST", json=ask)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert "detail" in r.json() and got == []


def test_a_client_that_leaves_mid_stream_frees_the_generation_slot(tmp_path: Path) -> None:
    # One generation at a time (the default): a stream abandoned while it still holds the slot
    # must give it back, or every later request would wait forever.
    with LiveServer(make_settings(tmp_path / "data", **{"serving.max_concurrency": 1})) as s, s.client() as c:
        with c.stream("POST", "/generate", json={"prompt": PROMPT, "max_new_tokens": 1000, "stream": True}) as r:
            assert r.status_code == 200
            first = next(events(r))
            assert first[0] == "message"
        # the connection is closed here, some 990 tokens early
        t0 = time.monotonic()
        after = c.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 4}, timeout=30)
        assert after.status_code == 200, after.text
        assert time.monotonic() - t0 < 30


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by bench/gpu_check.sh)")
def test_gpu_streams_and_trains_on_cuda(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", **{"model.device": "cuda", "train.passes_per_batch": 2})
    with LiveServer(settings) as s, s.client() as c:
        assert c.get("/v1/trainer").json()["device"].startswith("cuda")
        plain = c.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 24}).json()
        _r, got = stream(c, "POST", json={"prompt": PROMPT, "max_new_tokens": 24, "stream": True})
        assert "".join(data["text"] for name, data in got if name == "message") == plain["text"]
        ids = c.post("/v1/texts", json={"items": [{"text": f"cuda fact {i}: the kettle hums."} for i in range(8)]})
        assert ids.status_code == 202
        wait_for(lambda: c.get("/v1/checkpoints").json()["active_version"] >= 1, timeout=120)
