"""The OpenAI-compatible API, driven by the real `openai` client against the real server:
completions and chat, streamed and not, the model list, pinned versions, feedback on the
returned id, and the errors a client sees."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from conftest import LiveServer, admin_headers, make_settings, wait_for
from openai import OpenAI

from llmos.model.builtin import byte_tokenizer
from llmos.registry.registry import TrainerSnapshot
from llmos.serving.text import TextStream
from llmos.store.tables import CheckpointStatus

PROMPT = "The capital of Zorbia"


@dataclass
class Trained:
    srv: LiveServer
    http: httpx.Client
    client: OpenAI
    v0_text: str  # greedy completion of PROMPT by version 0, from /generate before any training
    version: int  # a later promoted version, active


def greedy(http: httpx.Client, prompt: str = PROMPT, n: int = 24) -> dict:
    r = http.get("/generate", params={"prompt": prompt, "max_new_tokens": n})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """One server for the module: version 0, then a version that has learned a sentence; the
    trainer is then paused so the active version stays put."""
    settings = make_settings(tmp_path_factory.mktemp("openai") / "data", **{"train.passes_per_batch": 8})
    with LiveServer(settings) as srv, srv.client() as http:
        v0_text = greedy(http)["text"]
        texts = [{"text": f"{PROMPT} is Quellton, number {i}."} for i in range(20)]
        assert http.post("/v1/texts", json={"items": texts}).status_code == 202
        learned = wait_for(lambda: (g := greedy(http)) and g["model_version"] >= 1 and g, timeout=60)
        assert http.post("/v1/admin/trainer/pause", headers=admin_headers()).status_code == 200
        version = http.get("/v1/trainer").json()["active_version"]
        assert version >= learned["model_version"] >= 1
        client = OpenAI(base_url=srv.url + "/v1", api_key="any key: this server has none", max_retries=0)
        yield Trained(srv, http, client, v0_text, version)


def test_completion_with_the_openai_client(trained: Trained) -> None:
    r = trained.client.completions.create(model="llmos", prompt=PROMPT, max_tokens=24, temperature=0)
    served = greedy(trained.http)
    assert r.object == "text_completion"
    assert r.model == f"llmos@{trained.version}"  # names the version that answered
    assert r.choices[0].text == served["text"] and r.choices[0].text != trained.v0_text
    assert r.choices[0].finish_reason == served["finish_reason"]
    # Real token counts: the byte-level tokenizer has one token per UTF-8 byte.
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(PROMPT.encode()) == served["prompt_tokens"]
    assert r.usage.completion_tokens == served["completion_tokens"] == len(r.choices[0].text.encode())
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_the_returned_id_takes_feedback(trained: Trained) -> None:
    r = trained.client.completions.create(model="llmos", prompt=PROMPT, max_tokens=8, temperature=0)
    depth = trained.http.get("/v1/trainer").json()["queue_depth"]
    fb = trained.http.post("/v1/feedback", json={"generation_id": r.id, "correction": " is Quellton."})
    assert fb.status_code == 202, fb.text
    # The correction became a text to learn (the trainer is paused, so it waits in the queue).
    assert trained.http.get("/v1/trainer").json()["queue_depth"] == depth + 1
    assert trained.http.post("/v1/feedback", json={"generation_id": "nope", "rating": 1}).status_code == 404


def test_streamed_completion_equals_the_plain_one(trained: Trained) -> None:
    plain = trained.client.completions.create(model="llmos", prompt=PROMPT, max_tokens=24, temperature=0)
    chunks = list(
        trained.client.completions.create(
            model="llmos",
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len(chunks) > 3  # really streamed, not one blob
    assert len({c.id for c in chunks}) == 1
    assert "".join(ch.text for c in chunks for ch in c.choices) == plain.choices[0].text
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == [
        plain.choices[0].finish_reason
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]
    fb = trained.http.post("/v1/feedback", json={"generation_id": chunks[0].id, "rating": 1})
    assert fb.status_code == 202, fb.text


def test_chat_uses_the_plain_template_and_streams(trained: Trained) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is Quellton?"}]
    rendered = "system: Be brief.\nuser: Where is Quellton?\nassistant:"
    r = trained.client.chat.completions.create(
        model="llmos",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=16,
        temperature=0,
    )
    assert r.object == "chat.completion" and r.model == f"llmos@{trained.version}"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content is not None
    assert r.usage is not None and r.usage.prompt_tokens == len(rendered.encode())
    # The same text as completing the rendered prompt directly (with the template's stop string).
    direct = trained.client.completions.create(
        model="llmos", prompt=rendered, max_tokens=16, temperature=0, stop=["\nuser:"]
    )
    assert msg.content == direct.choices[0].text

    chunks = list(
        trained.client.chat.completions.create(
            model="llmos",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=16,
            temperature=0,
            stream=True,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert trained.http.post("/v1/feedback", json={"generation_id": chunks[0].id, "rating": -1}).status_code == 202


def test_models_lists_the_active_name_and_every_promoted_version(trained: Trained) -> None:
    ids = [m.id for m in trained.client.models.list()]
    assert ids[0] == "llmos"
    assert {"llmos@0", f"llmos@{trained.version}"} <= set(ids)
    assert trained.client.models.retrieve(f"llmos@{trained.version}").owned_by == "llmos"
    with pytest.raises(openai.NotFoundError):
        trained.client.models.retrieve("llmos@12345")


def test_a_pinned_version_answers_as_it_did(trained: Trained) -> None:
    old = trained.client.completions.create(model="llmos@0", prompt=PROMPT, max_tokens=24, temperature=0)
    assert old.model == "llmos@0"
    assert old.choices[0].text == trained.v0_text  # what version 0 said before any training
    new = trained.client.completions.create(
        model=f"llmos@{trained.version}", prompt=PROMPT, max_tokens=24, temperature=0
    )
    assert new.choices[0].text == greedy(trained.http)["text"] != old.choices[0].text
    streamed = trained.client.completions.create(
        model="llmos@0", prompt=PROMPT, max_tokens=24, temperature=0, stream=True
    )
    chunks = list(streamed)
    assert {c.model for c in chunks} == {"llmos@0"}
    assert "".join(ch.text for c in chunks for ch in c.choices) == trained.v0_text
    # Pinning does not change what the unpinned name serves.
    assert greedy(trained.http)["model_version"] == trained.version
    fb = trained.http.post("/v1/feedback", json={"generation_id": old.id, "rating": 1})
    assert fb.status_code == 202


def test_unknown_and_unservable_versions_are_clear_errors(trained: Trained) -> None:
    c = trained.client
    with pytest.raises(openai.NotFoundError) as e404:
        c.completions.create(model="llmos@999", prompt=PROMPT, max_tokens=4)
    assert "no stored version 999" in str(e404.value)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    # A version the gate rejected is stored but never served, pinned or not.
    d = trained.srv.daemon
    rejected = d.registry.publish(
        d.engine.current().model,
        TrainerSnapshot(step=0, samples_seen=0, optimizer=None, rng=None),
        parent=trained.version,
        status=CheckpointStatus.rejected,
        metrics={},
    )
    with pytest.raises(openai.ConflictError, match="rejected"):
        c.completions.create(model=f"llmos@{rejected.version}", prompt=PROMPT, max_tokens=4, stream=True)
    assert f"llmos@{rejected.version}" not in [m.id for m in c.models.list()]
    # Both OpenAI's shape and this API's "detail".
    r = trained.http.post("/v1/completions", json={"model": f"llmos@{rejected.version}", "prompt": "x"})
    assert r.status_code == 409
    body = r.json()
    assert body["error"]["code"] == "model_not_servable" and body["detail"] == body["error"]["message"]


def test_unsupported_options_are_refused_not_ignored(trained: Trained) -> None:
    with pytest.raises(openai.UnprocessableEntityError, match="n: Input should be 1"):
        trained.client.completions.create(model="llmos", prompt=PROMPT, n=2)
    # A larger max_tokens than serving.max_new_tokens_cap is lowered to it, not refused.
    big = trained.client.completions.create(model="llmos", prompt=PROMPT, max_tokens=10**6, temperature=0)
    assert big.usage is not None and big.usage.completion_tokens <= 1024
    assert big.choices[0].text.startswith(greedy(trained.http)["text"])
    r = trained.http.post("/v1/chat/completions", json={"model": "llmos", "messages": [], "bogus": 1})
    assert r.status_code == 422 and isinstance(r.json()["detail"], list)


@pytest.mark.parametrize(
    "field",
    [{"stream": "yes"}, {"max_tokens": True}, {"temperature": True}, {"top_p": "1"}, {"seed": 1.5}, {"n": True}],
    ids=lambda f: next(iter(f)),
)
def test_options_of_the_wrong_type_are_422s_not_coerced(trained: Trained, field: dict[str, object]) -> None:
    for path, body in (
        ("/v1/completions", {"model": "llmos", "prompt": PROMPT}),
        ("/v1/chat/completions", {"model": "llmos", "messages": [{"role": "user", "content": PROMPT}]}),
    ):
        r = trained.http.post(path, json={**body, **field})
        assert r.status_code == 422, (path, field, r.text)
        assert r.json()["detail"][0]["loc"] == ["body", next(iter(field))], r.text


def test_integers_written_as_floats_count_as_integers(trained: Trained) -> None:
    """JSON has one number type, and JSON Schema's "integer" takes 7.0 (the fuzzer sends such)."""
    body = {"model": "llmos", "prompt": PROMPT, "max_tokens": 4.0, "seed": 7.0, "n": 1.0, "temperature": 0}
    r = trained.http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4


def test_validation_errors_name_types_not_validators_or_addresses(trained: Trained) -> None:
    r = trained.http.post("/v1/completions", json={"model": "llmos", "prompt": PROMPT, "stop": ["a"] * 5})
    assert r.status_code == 422
    assert "0x" not in r.text and "function" not in r.text and "partial" not in r.text, r.text
    assert ["body", "stop", "list"] in [d["loc"] for d in r.json()["detail"]]
    assert "stop.list: List should have at most 4 items" in r.json()["error"]["message"]


def test_a_stop_string_ends_the_completion(trained: Trained) -> None:
    full = greedy(trained.http)["text"]
    stop = full[6:9]
    cut = full.index(stop)
    r = trained.client.completions.create(model="llmos", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    chunks = list(
        trained.client.completions.create(
            model="llmos", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(ch.text for c in chunks for ch in c.choices) == full[:cut]


def test_text_stream_never_splits_a_character_or_leaks_a_stop_string() -> None:
    tok = byte_tokenizer()
    text = "naïve 你好 — done. STOP here"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())  # one token per byte: multi-byte characters span tokens
    stream = TextStream(tok)
    deltas = [stream.push(i) for i in ids]
    assert "\ufffd" not in "".join(deltas) and "".join(deltas) + stream.finish() == text

    stream = TextStream(tok, stop=["STOP"])
    shown = "".join(stream.push(i) for i in ids if not stream.stopped) + stream.finish()
    assert stream.stopped and shown == "naïve 你好 — done. " == stream.text
