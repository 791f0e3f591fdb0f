"""Concurrent generations decoded together (serving.max_concurrency > 1), against the real server:
each request gets what it would get alone, streams included, and one that goes away leaves the
others unharmed.

Exact text equality between a request decoded alone and in a batch is sound here: on these
prompts' greedy paths the built-in model's top two logits are at least 1.9e-3 apart (measured),
far above the float32 differences that padding and batch shapes make (about 1e-6)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import LiveServer, make_settings

REQUESTS: list[dict[str, Any]] = [
    {"prompt": "The capital of Zorbia", "max_new_tokens": 40},
    {"prompt": "A", "max_new_tokens": 7},
    {"prompt": "Streaming, one chunk at a time, and a much longer prompt than the others: ", "max_new_tokens": 25},
    {"prompt": "Sampled: ", "max_new_tokens": 30, "temperature": 0.9, "top_p": 0.9, "seed": 11},
    {"prompt": "Note 42: the capital of Atlantis is", "max_new_tokens": 1},
    {"prompt": "x", "max_new_tokens": 2},
    {"prompt": "Sampled again: ", "max_new_tokens": 18, "temperature": 1.3, "seed": 5},
    {"prompt": "The old king of Plom was called", "max_new_tokens": 33},
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, LiveServer]]:
    """The same base model (same seed) served one request at a time and eight at once."""
    root = tmp_path_factory.mktemp("batching")
    alone = make_settings(root / "alone", **{"serving.max_concurrency": 1})
    batched = make_settings(root / "batched", **{"serving.max_concurrency": 8})
    with LiveServer(alone) as a, LiveServer(batched) as b:
        yield a, b


def generate(c: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = c.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def metric(c: httpx.Client, name: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_each_batched_request_gets_what_it_would_get_alone(servers: tuple[LiveServer, LiveServer]) -> None:
    alone, batched = servers
    with alone.client() as c:
        expected = [generate(c, body) for body in REQUESTS]
    with batched.client() as c:
        before = metric(c, "llmos_decode_batch_rows_total"), metric(c, "llmos_decode_batches_total")
        for _round in range(3):
            go = threading.Barrier(len(REQUESTS))

            def one(body: dict[str, Any], go: threading.Barrier = go) -> dict[str, Any]:
                go.wait()
                return generate(c, body)

            with ThreadPoolExecutor(len(REQUESTS)) as pool:
                got = list(pool.map(one, REQUESTS))
            for body, want, have in zip(REQUESTS, expected, got, strict=True):
                assert have["text"] == want["text"], body
                assert have["finish_reason"] == want["finish_reason"], body
                assert have["completion_tokens"] == want["completion_tokens"], body
        rows = metric(c, "llmos_decode_batch_rows_total") - before[0]
        batches = metric(c, "llmos_decode_batches_total") - before[1]
    assert rows == 3 * len(REQUESTS)
    assert rows / batches >= 2, (rows, batches)  # requests really were decoded together


def test_a_stream_that_goes_away_leaves_its_batch_unharmed(servers: tuple[LiveServer, LiveServer]) -> None:
    alone, batched = servers
    long = {"prompt": "Streaming, one chunk at a time: ", "max_new_tokens": 200}
    others = REQUESTS[:3]
    with alone.client() as c:
        expected = [generate(c, body)["text"] for body in others]
    with batched.client() as c:
        go = threading.Barrier(len(others) + 1)

        def abandon() -> int:
            go.wait()
            with c.stream("POST", "/generate", json={**long, "stream": True}) as r:
                assert r.status_code == 200
                for _line in r.iter_lines():
                    return 1  # one line read, then the connection closes, ~199 tokens early
            return 0

        def one(body: dict[str, Any]) -> str:
            go.wait()
            return str(generate(c, body)["text"])

        steps = metric(c, "llmos_decode_steps_total")
        with ThreadPoolExecutor(len(others) + 1) as pool:
            gone = pool.submit(abandon)
            got = list(pool.map(one, others))
        assert gone.result() == 1
        assert got == expected
        # The server is still serving; this request waits for the batch that held the abandoned row.
        assert generate(c, {"prompt": "after", "max_new_tokens": 4})["completion_tokens"] <= 4
        # The abandoned row left its batch: decoding it to the end takes 200 forward passes; the
        # others need at most 40 + 7 + 25 + 4 (plus a prefill each).
        taken = metric(c, "llmos_decode_steps_total") - steps
        assert taken < 150, taken


def test_a_long_prompt_sent_while_a_stream_decodes_rides_on_its_steps(servers: tuple[LiveServer, LiveServer]) -> None:
    """Over HTTP, with the defaults: a prompt of a few hundred tokens sent while another request
    streams is read in chunks inside that stream's decoding steps (llmos_decode_prompt_chunks_riding
    counts them), answered before the stream ends, and answered as it is alone."""
    alone, batched = servers
    prompt = " ".join(f"line {n} of the manual says the lamp is teal." for n in range(8))
    body = {"prompt": prompt, "max_new_tokens": 6}
    with alone.client() as c:
        expected = generate(c, body)["text"]
    started, long_done = threading.Event(), threading.Event()

    def long_stream() -> None:
        body = {"prompt": "A long answer: ", "max_new_tokens": 600, "stream": True}
        with batched.client() as c, c.stream("POST", "/generate", json=body) as r:
            for _line in r.iter_lines():
                started.set()
            long_done.set()

    with ThreadPoolExecutor(1) as pool, batched.client() as c:
        rides = metric(c, "llmos_decode_prompt_chunks_riding_total")
        streaming = pool.submit(long_stream)
        assert started.wait(30)
        got = generate(c, body)
        finished_first = not long_done.is_set()
        streaming.result()
        assert metric(c, "llmos_decode_prompt_chunks_riding_total") > rides
    assert got["prompt_tokens"] > 64  # longer than serving.prefill_chunk_tokens
    assert got["text"] == expected
    assert finished_first, "the long prompt waited for the stream to end"


def test_a_request_joins_a_batch_already_decoding(servers: tuple[LiveServer, LiveServer]) -> None:
    """A short request that arrives while a long one is being decoded is answered before the long
    one ends: it joins the batch between two steps instead of waiting for it."""
    alone, batched = servers
    short = {"prompt": "The capital of Zorbia", "max_new_tokens": 4}
    with alone.client() as c:
        expected = generate(c, short)["text"]
    started, long_done = threading.Event(), threading.Event()

    def long_stream() -> int:
        with (
            batched.client() as c,
            c.stream(
                "POST", "/generate", json={"prompt": "A long answer: ", "max_new_tokens": 600, "stream": True}
            ) as r,
        ):
            lines = 0
            for _line in r.iter_lines():
                lines += 1
                started.set()
            long_done.set()
            return lines

    with ThreadPoolExecutor(1) as pool, batched.client() as c:
        lines = pool.submit(long_stream)
        assert started.wait(30)
        got = generate(c, short)
        finished_first = not long_done.is_set()
        assert lines.result() > 600  # the long stream ran to its end
    assert got["text"] == expected
    assert finished_first, "the short request waited for the long one to end"


@pytest.mark.timeout(60)  # a row left without its error would wait forever
def test_a_failing_forward_pass_fails_every_row_of_its_batch_and_the_worker_goes_on(tmp_path: Path) -> None:
    """Rows that joined the batch late get the error too (none is left waiting), and the next batch
    is decoded normally."""
    from llmos.model.builtin import byte_tokenizer, create_tiny
    from llmos.model.loader import ModelFactory
    from llmos.serving.batch import Batcher
    from llmos.serving.engine import pick_token
    from llmos.serving.types import SamplingParams

    factory = ModelFactory(str(create_tiny(tmp_path / "tiny")), torch.device("cpu"))
    model = factory.instance().eval()
    calls = [0]
    queued = threading.Event()

    class Failing(torch.nn.Module):
        """The real model, except: its 2nd forward pass waits until the second request is queued
        (so that it joins at the next step), and its 4th fails (after the join's prefill, the 3rd)."""

        def forward(self, **kw: Any) -> Any:
            calls[0] += 1
            if calls[0] == 2:
                assert queued.wait(30)
            if calls[0] == 4:
                raise RuntimeError("device lost")
            return model(**kw)

    failing = Failing()
    eos = byte_tokenizer().eos_token_id
    batcher = Batcher(torch.device("cpu"), eos, 8, pick_token)
    params = SamplingParams(max_new_tokens=50)
    first = batcher.decode(failing, [eos, 65, 66], params, 50, None)
    assert isinstance(next(first), int)  # the batch is decoding
    second = batcher.decode(failing, [eos, 67], params, 50, None)  # queued once its consumer starts it
    second_events: list[object] = []

    def consume() -> None:
        try:
            for event in second:
                second_events.append(event)
        except RuntimeError as exc:
            second_events.append(exc)

    consumer = threading.Thread(target=consume)
    consumer.start()
    while not batcher._pending:  # the second request is queued
        time.sleep(0.001)
    queued.set()
    with pytest.raises(RuntimeError, match="decoding failed: RuntimeError: device lost"):
        for _event in first:
            pass
    consumer.join(30)
    assert not consumer.is_alive(), "the row that joined was left waiting"
    assert isinstance(second_events[-1], RuntimeError) and "device lost" in str(second_events[-1])
    assert batcher.rows == 2 and batcher.cohorts == 1  # it had joined the failing batch
    again = list(batcher.decode(model, [eos, 65], SamplingParams(max_new_tokens=3), 3, None))
    assert again[-1] in ("stop", "length") and len(again) <= 4


class _Widths(torch.nn.Module):
    """The model, recording the attention width (the mask's columns: cached history + new
    tokens) of every forward pass."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.widths: list[int] = []

    def forward(self, **kw: Any) -> Any:
        self.widths.append(int(kw["attention_mask"].shape[1]))
        return self.inner(**kw)


def test_overlapping_requests_attend_only_to_their_own_history(tmp_path: Path) -> None:
    """Four clients send requests back to back, so that the batch never empties, for hundreds of
    decoding steps. Each step attends at most to the longest history among the rows decoding then
    (a row's EOS, prompt and tokens so far), never to the tokens of requests that already ended,
    and every request gets what it gets alone."""
    from llmos.model.builtin import create_tiny
    from llmos.model.loader import ModelFactory
    from llmos.serving.batch import Batcher
    from llmos.serving.engine import pick_token
    from llmos.serving.types import SamplingParams

    factory = ModelFactory(str(create_tiny(tmp_path / "tiny")), torch.device("cpu"))
    tok, model = factory.tokenizer, factory.instance()
    eos = tok.eos_token_id
    words = ("lamp", "boat", "tall chair")
    prompts = [f"Request {i}: the {words[i % 3]} is" for i in range(96)]
    budgets = [8 + (i * 7) % 17 for i in range(len(prompts))]  # 8 to 24 new tokens
    greedy = SamplingParams(temperature=0.0)

    def run(batcher: Batcher, m: torch.nn.Module, i: int) -> list[int]:
        seq = [eos, *tok.encode(prompts[i], add_special_tokens=False)]
        return [t for t in batcher.decode(m, seq, greedy, budgets[i], None) if isinstance(t, int)]

    alone = Batcher(torch.device("cpu"), eos, 1, pick_token)
    expected = [run(alone, model, i) for i in range(len(prompts))]

    spy = _Widths(model)
    batched = Batcher(torch.device("cpu"), eos, 4, pick_token)

    def client(k: int) -> list[tuple[int, list[int]]]:
        return [(i, run(batched, spy, i)) for i in range(k, len(prompts), 4)]

    with ThreadPoolExecutor(4) as pool:
        got = dict(pair for result in pool.map(client, range(4)) for pair in result)
    assert [got[i] for i in range(len(prompts))] == expected
    longest = max(len(tok.encode(p, add_special_tokens=False)) + 1 + b for p, b in zip(prompts, budgets, strict=True))
    assert batched.steps >= 300 and batched.cohorts < len(prompts) / 2, (batched.steps, batched.cohorts)
    assert max(spy.widths) <= longest, (max(spy.widths), longest)


class _Passes(torch.nn.Module):
    """The model, recording every forward pass: (rows, new tokens per row, attention width)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.passes: list[tuple[int, int, int]] = []

    def forward(self, **kw: Any) -> Any:
        ids, mask = kw["input_ids"], kw["attention_mask"]
        self.passes.append((int(ids.shape[0]), int(ids.shape[1]), int(mask.shape[1])))
        return self.inner(**kw)


def _long_prompt_mid_stream(tmp_path: Path, wrap: Callable[[torch.nn.Module], torch.nn.Module]) -> Any:
    """Three streams are decoding (400 tokens each) when a 2,000-token prompt arrives, on a batcher
    that runs 256 tokens of a prompt at a time at most, on ``wrap(model)``. Returns what each
    request got, what each gets alone, and the batcher."""
    from llmos.model.builtin import create_tiny
    from llmos.model.loader import ModelFactory
    from llmos.serving.batch import Batcher
    from llmos.serving.engine import pick_token
    from llmos.serving.types import SamplingParams

    factory = ModelFactory(str(create_tiny(tmp_path / "long", n_positions=2304)), torch.device("cpu"))
    tok, model = factory.tokenizer, factory.instance()
    eos = tok.eos_token_id
    greedy = SamplingParams(temperature=0.0)
    streams = [[eos, *tok.encode(f"Stream {i}: the tide", add_special_tokens=False)] for i in range(3)]
    text = " ".join(f"line {n} of the manual says the lamp is teal." for n in range(60))
    long = [eos, *tok.encode(text, add_special_tokens=False)][:2000]
    assert len(long) == 2000

    def run(batcher: Batcher, m: torch.nn.Module, seq: list[int], budget: int, on_token: Any = None) -> list[int]:
        out = []
        for t in batcher.decode(m, seq, greedy, budget, None):
            if isinstance(t, int):
                out.append(t)
                if on_token is not None:
                    on_token()
        return out

    alone = Batcher(torch.device("cpu"), eos, 1, pick_token)
    expected = [run(alone, model, s, 400) for s in streams] + [run(alone, model, long, 6)]

    wrapped = wrap(model)
    batcher = Batcher(torch.device("cpu"), eos, 8, pick_token, chunk=256)
    flowing = threading.Barrier(4)
    counts = [0, 0, 0]

    def stream(i: int) -> list[int]:
        def tick() -> None:
            counts[i] += 1
            if counts[i] == 5:
                flowing.wait()

        return run(batcher, wrapped, streams[i], 400, tick)

    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(stream, i) for i in range(3)]
        flowing.wait()  # each stream has its first 5 tokens
        got_long = run(batcher, wrapped, long, 6)
        got = [f.result() for f in running]
    return got + [got_long], expected, batcher


def test_a_long_prompt_runs_in_chunks_between_the_steps_of_the_rows_decoding(tmp_path: Path) -> None:
    """On a model the riding pass cannot drive (here one that hides its config), the prompt runs
    in passes of its own: 256 tokens at a time at most (fewer when a chunk costs more than its
    share of the streams' decoding step), with a decoding step of the streams between two chunks
    (they get a token each time), instead of one pass of 2,000 tokens that every stream waits
    for; and every request, the long one too, gets what it gets alone."""
    spy: list[_Passes] = []
    got, expected, batcher = _long_prompt_mid_stream(tmp_path, lambda m: spy.append(_Passes(m)) or spy[0])
    assert got == expected
    assert batcher.rides == 0
    passes = spy[0].passes
    # The long prompt's passes: those of one row and several tokens once the three streams decode.
    together = next(i for i, (rows, new, _w) in enumerate(passes) if rows == 3 and new == 1)
    chunks = [i for i, (rows, new, _w) in enumerate(passes) if i > together and new > 1 and rows == 1]
    assert all(passes[i][1] <= 256 for i in chunks), passes
    assert sum(passes[i][1] for i in chunks) in (1999, 2000), passes  # (a last chunk of 1 looks like a step)
    # Between two chunks, a step of the streams: each of them got a token meanwhile.
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert any(rows >= 3 and new == 1 for rows, new, _w in passes[a + 1 : b]), passes[a : b + 1]


def test_a_long_prompt_rides_on_the_steps_of_the_rows_decoding_and_changes_no_answer(tmp_path: Path) -> None:
    """On a transformers model on SDPA, each chunk runs in the same forward pass as the streams'
    next step (llmos/serving/riding.py): the streams get a token with every chunk, and every
    request, the long one too, gets what it gets alone, token for token."""
    got, expected, batcher = _long_prompt_mid_stream(tmp_path, lambda m: m)
    assert got == expected
    # The chunks rode: 2,000 tokens at most 256 a pass need at least 7 of them after the first.
    assert batcher.rides >= 7, batcher.rides


def test_only_a_model_that_rides_correctly_rides(tmp_path: Path) -> None:
    """The riding pass is checked against two passes apart once per model: the built-in model
    rides on SDPA and on eager attention (how llmos serves it on a CPU) and is left on its own
    implementation; a model that hides its config (a wrapper) does not ride."""
    from transformers import AutoModelForCausalLM

    from llmos.model.builtin import create_tiny
    from llmos.serving.batch import _reserve
    from llmos.serving.riding import can_ride

    path = create_tiny(tmp_path / "tiny")
    for attention in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention).eval()
        assert can_ride(model, _reserve), attention
        assert model.config._attn_implementation == attention  # left as it was
    assert not can_ride(_Passes(model), _reserve)


def test_a_batch_admits_rows_while_its_cache_fits_the_kv_budget(tmp_path: Path) -> None:
    """Eight requests at once, each needing 50 cache positions (prompt and budget), with a budget
    of 160: at most three decode together, the others wait for room, and each gets what it gets
    alone."""
    from llmos.model.builtin import create_tiny
    from llmos.model.loader import ModelFactory
    from llmos.serving.batch import Batcher
    from llmos.serving.engine import pick_token
    from llmos.serving.types import SamplingParams

    factory = ModelFactory(str(create_tiny(tmp_path / "tiny")), torch.device("cpu"))
    tok, model = factory.tokenizer, factory.instance()
    eos = tok.eos_token_id
    seqs = [[eos, *tok.encode(f"Ask {i}: the tide", add_special_tokens=False)] for i in range(8)]
    budgets = [50 - len(s) for s in seqs]
    greedy = SamplingParams(temperature=0.0)

    def run(batcher: Batcher, m: torch.nn.Module, i: int) -> list[int]:
        return [t for t in batcher.decode(m, seqs[i], greedy, budgets[i], None) if isinstance(t, int)]

    alone = Batcher(torch.device("cpu"), eos, 1, pick_token)
    expected = [run(alone, model, i) for i in range(8)]
    spy = _Passes(model)
    bounded = Batcher(torch.device("cpu"), eos, 8, pick_token, kv_tokens=160)
    go = threading.Barrier(8)

    def one(i: int) -> list[int]:
        go.wait()
        return run(bounded, spy, i)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    assert got == expected
    assert max(rows for rows, _new, _width in spy.passes) == 3, spy.passes
    assert max(rows * width for rows, _new, width in spy.passes) <= 160


def test_past_the_kv_budget_a_generation_gets_429_and_one_that_can_never_fit_422(tmp_path: Path) -> None:
    from llmos.serving.types import SamplingParams

    settings = make_settings(tmp_path / "data", **{"serving.kv_cache_tokens": 300, "serving.max_concurrency": 8})
    with LiveServer(settings) as srv, srv.client() as c:
        # A generation in progress whose reader has not finished with it (its place is held until
        # then): 1 + 8 + 200 = 209 of the 300 positions.
        held = srv.daemon.engine.stream("The tide", SamplingParams(max_new_tokens=200))
        next(held)
        body = {"prompt": "The tide", "max_new_tokens": 200}
        r = c.post("/generate", json=body)
        assert r.status_code == 429, r.text
        assert r.headers["Retry-After"] == "1" and "serving.kv_cache_tokens" in r.json()["detail"]
        with c.stream("POST", "/generate", json={**body, "stream": True}) as s:
            assert s.status_code == 429 and s.headers["Retry-After"] == "1"
        o = c.post("/v1/completions", json={"model": "llmos", "prompt": "The tide", "max_tokens": 200})
        assert o.status_code == 429 and o.headers["Retry-After"] == "1", o.text
        assert o.json()["error"]["type"] == "rate_limit_error"
        assert c.post("/generate", json={"prompt": "x", "max_new_tokens": 20}).status_code == 200  # it fits
        held.close()  # its reader is done: the positions are free
        assert c.post("/generate", json=body).status_code == 200
        r = c.post("/generate", json={"prompt": "The tide", "max_new_tokens": 400})
        assert r.status_code == 422 and "serving.kv_cache_tokens" in r.text, r.text


def test_a_chunk_of_a_long_prompt_is_sized_to_add_no_more_than_a_decoding_step() -> None:
    """While rows decode, chunks settle on the largest size that adds no more than their
    decoding step to the gap between their tokens, or, where even the cheapest adds more (a
    forward pass's fixed cost), no more than SLACK times the cheapest: where the cost grows with
    the size they shrink, where it hardly does they stay large (halving them then only delays the
    long prompt). A chunk riding on a step adds what the pair costs over the step. With nothing
    decoding a prompt runs a configured chunk at a time."""
    from llmos.serving.batch import _Pace

    def settle(cost_of: Callable[[int], float], chunks: int = 30) -> list[int]:
        pace = _Pace(256)
        for _ in range(20):
            pace.stepped(0.010)
        sizes = []
        for _ in range(chunks):
            size = pace.tokens(decoding=True)
            sizes.append(size)
            pace.filled(cost_of(size), decoding=True)
        return sizes

    # Cost in proportion to the size (compute-bound): the largest within a step, 64 (6.4 ms).
    assert settle(lambda n: 0.0001 * n)[-6:] == [64] * 6
    # Flat (a GPU, or a CPU reading the weights): three steps at any size, so from the smallest
    # up to the largest.
    assert settle(lambda n: 0.030)[:6] == [8, 16, 32, 64, 128, 256] and settle(lambda n: 0.030)[-6:] == [256] * 6
    # A fixed cost near a step and a little per token: 8.8 ms at 8, 9.6 at 16, 11.2 at 32; the
    # budget is 1.2 x 8.8 = 10.6 ms, so 16.
    assert settle(lambda n: 0.008 + 0.0001 * n)[-6:] == [16] * 6
    # Everything over the budget: the floor, 8 tokens.
    assert settle(lambda n: 0.010 + 0.001 * n)[-3:] == [8] * 3

    # Riding on the step: a pass of step and chunk costs a step plus 0.1 ms a token (no fixed
    # cost of its own), so again 64: a pass of its own would have paid its fixed cost too.
    pace = _Pace(256)
    for _ in range(20):
        pace.stepped(0.010)
    for _ in range(30):
        pace.rode(0.010 + 0.0001 * pace.tokens(decoding=True))
    assert pace.tokens(decoding=True) == 64

    pace = _Pace(256)
    assert pace.tokens(decoding=True) == 8  # nothing known yet: the smallest
    pace.filled(0.050, decoding=True)  # no step measured yet: nothing to compare with
    assert pace.tokens(decoding=True) == 8 and pace.cost == {}
    pace.filled(0.500, decoding=False)  # alone, a chunk costs what it costs
    assert pace.tokens(decoding=False) == 256 and pace.cost == {}
    for _ in range(20):
        pace.stepped(0.010)
    pace.stepped(1.0)  # one slow step moves the average a tenth of the way
    assert pace.step_s is not None and pace.step_s < 0.11
