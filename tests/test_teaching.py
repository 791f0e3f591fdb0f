"""What users teach, over HTTP on the built-in model with the defaults: made-up facts are learned
and kept, corrections are adopted without changing unrelated answers, a text sent twice is never
lost to the held-out side, and the gate refuses harm (a collapse) but cannot be vetoed by a
caller who invents sources."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest
import torch
from conftest import LiveServer, admin_headers, make_settings, settled, wait_for

from llmos.daemon import Daemon
from llmos.store.queue import NewSample
from llmos.trainer.preprocess import is_heldout
from llmos.trainer.regularize import EWC, L2SP


def names(seed: int, n: int) -> list[str]:
    rng, out = random.Random(seed), []
    while len(out) < n:
        word = "".join(rng.choice("bcdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3))).title()
        if word not in out:
            out.append(word)
    return out


def greedy(c: httpx.Client, prompt: str, tokens: int = 24) -> str:
    r = c.get("/generate", params={"prompt": prompt, "max_new_tokens": tokens})
    assert r.status_code == 200, r.text
    return str(r.json()["text"])


def recalled(c: httpx.Client, facts: list[tuple[str, str]]) -> int:
    return sum(greedy(c, prompt, len(answer.encode())) == answer for prompt, answer in facts)


def post(c: httpx.Client, texts: list[str], **fields: str) -> list[str]:
    r = c.post("/v1/texts", json={"items": [{"text": t, **fields} for t in texts]})
    assert r.status_code == 202, r.text
    return list(r.json()["ids"])


def teach(c: httpx.Client, texts: list[str], **fields: str) -> list[str]:
    ids = post(c, texts, **fields)
    wait_for(lambda: settled(c, ids, every=max(1, len(ids) // 8)) and settled(c, ids[-1:]), timeout=240)
    return ids


def capitals(seed: int) -> list[tuple[str, str]]:
    n = names(seed, 16)
    return [(f"The capital of {n[i]}", f" is {n[8 + i]}.") for i in range(8)]


def tickets(seed: int) -> list[tuple[str, str]]:
    n = names(seed, 16)
    return [(f"Ticket {100 + i}: the {n[i]} printer", f" needs part {n[8 + i]}.") for i in range(8)]


def test_facts_are_learned_within_two_postings_and_kept_while_another_domain_streams_in(tmp_path: Path) -> None:
    """The issue's user: 8 made-up facts, each posted 12 times in one request, then posted again
    if need be; then a second domain streams in over four requests."""
    a, b = capitals(1), tickets(2)
    with LiveServer(make_settings(tmp_path / "data")) as srv, srv.client() as c:
        teach(c, [p + ans for p, ans in a for _ in range(12)])
        first = recalled(c, a)
        if first < 8:
            teach(c, [p + ans for p, ans in a for _ in range(12)])
        assert recalled(c, a) >= 7, (first, [greedy(c, p, 16) for p, _ in a])
        for _ in range(4):  # 24 texts a request: three copies of each fact of B
            teach(c, [p + ans for p, ans in b for _ in range(3)])
        kept, learned = recalled(c, a), recalled(c, b)
        assert kept >= 6 and learned >= 7, (kept, learned, [greedy(c, p, 16) for p, _ in a])
        cps = c.get("/v1/checkpoints").json()["checkpoints"]
        assert not [cp for cp in cps if cp["status"] == "rejected"], [cp["metrics"]["gate"] for cp in cps]
        newest = next(cp for cp in cps if cp["status"] == "promoted")["metrics"]
        # Each version reports what it learned of its own batch, next to the version it replaced.
        assert newest["taught_recall"] == 1.0 and newest["taught_texts"] == 8
        assert newest["passes"] < 40  # the passes ended once the batch was learned


def test_corrections_are_adopted_and_unrelated_answers_stay(tmp_path: Path) -> None:
    facts = capitals(3)
    rng = random.Random(3)
    questions = [(f"Q: What is the code for {n}? A:", f" code {rng.randint(100, 999)}.") for n in names(4, 6)]
    with LiveServer(make_settings(tmp_path / "data")) as srv, srv.client() as c:
        teach(c, [p + ans for p, ans in facts for _ in range(12)])
        before = [greedy(c, p) for p, _ in facts]
        samples = []
        for prompt, answer in questions:
            g = c.get("/generate", params={"prompt": prompt, "max_new_tokens": 12}).json()
            assert g["text"] != answer
            r = c.post("/v1/feedback", json={"generation_id": g["generation_id"], "correction": answer})
            assert r.status_code == 202, r.text
            samples.append(r.json()["sample_id"])
        wait_for(lambda: settled(c, samples), timeout=240)
        assert all(c.get(f"/v1/texts/{s}").json()["status"] == "trained" for s in samples)
        adopted = [greedy(c, p, len(ans.encode())) for p, ans in questions]
        assert adopted == [ans for _p, ans in questions]
        after = [greedy(c, p) for p, _ in facts]
        assert after == before  # the facts' answers, word for word


def test_a_text_sent_again_is_never_lost_to_the_held_out_side(tmp_path: Path) -> None:
    """A text whose hash says "held out" is held out when sent once; sent again, both copies
    train (the held-out one goes back to the queue), and the model learns it."""
    candidates = [f"The capital of {n} is {m}." for n, m in zip(names(5, 60), names(6, 60), strict=True)]
    text = next(t for t in candidates if is_heldout(t, 0.1))
    with LiveServer(make_settings(tmp_path / "data")) as srv, srv.client() as c:
        [first] = teach(c, [text])
        assert c.get(f"/v1/texts/{first}").json()["status"] == "heldout"
        again = teach(c, [text] * 3)
        wait_for(lambda: settled(c, [first]), timeout=120)
        statuses = {i: c.get(f"/v1/texts/{i}").json()["status"] for i in [first, *again]}
        assert set(statuses.values()) == {"trained"}, statuses
        prompt = text[: text.index(" is ")]
        assert greedy(c, prompt, len(text) - len(prompt)) == text[len(prompt) :]


def test_the_collapse_guard_refuses_a_degenerate_batch_that_the_loss_checks_pass(tmp_path: Path) -> None:
    """A flood of one repeated phrase, after the model has learned some facts, with replay off
    (replay dilutes such a flood: with it on, the model kept answering as before). With the
    collapse guards on (the default) the version is refused, "gate: collapse: ..."; with them
    off, the same batch passes every loss check (there is nothing held out: every text was sent
    more than once) and is served, and the model says the phrase after anything."""
    facts = capitals(7)
    flood = ["ha ha ha ha ha ha ha ha ha ha ha ha ha ha ha ha"] * 150

    def run(data: Path, **overrides: object) -> tuple[dict, str]:
        with LiveServer(make_settings(data, **{"replay.enabled": False, **overrides})) as srv, srv.client() as c:
            teach(c, [p + ans for p, ans in facts for _ in range(12)])
            ids = teach(c, flood, source="flood")
            text = c.get(f"/v1/texts/{ids[0]}").json()
            text["lineage"] = c.get(f"/v1/admin/lineage/texts/{ids[0]}", headers=admin_headers()).json()
            return text, greedy(c, "Hello, my name is", 16)

    refused, answer = run(tmp_path / "guarded")
    assert refused["status"] == "rejected" and refused["reason"].startswith("gate: collapse: "), refused
    [version] = refused["lineage"]["trained"]  # the refused version is recorded with what trained it
    assert version["kind"] == "batch" and version["status"] == "rejected", refused
    assert "ha ha" not in answer
    passed, answer = run(tmp_path / "open", **{"eval.collapse.min_entropy": 0.0, "eval.collapse.min_distinct": 0.0})
    assert passed["status"] == "trained", passed
    assert "ha ha ha" in answer


@pytest.mark.slow  # the heaviest of the fast tier (35-150 s on 2 cores): CI runs it in the slow tier
def test_sources_of_one_text_each_cannot_veto_learning(tmp_path: Path) -> None:
    """A caller sends 300 short texts, each under a source of its own; the held-out ones (one in
    ten) join the anchor set, one text per source. Checked source by source
    (eval.min_source_anchors 1, a retention budget of 0.25), the loss of some one-text source rises
    past the budget when the model learns anything else, and the facts a user then teaches are
    refused; with the default (8), such sources are checked together, and the facts are learned."""
    rng = random.Random(8)
    words = "cat dog bus tree lamp fish rain sun car boat milk bread red blue old new big small runs sits".split()
    attack = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 4))) for _ in range(300)]
    facts = capitals(9)

    def run(data: Path, **overrides: object) -> dict:
        with LiveServer(make_settings(data, **overrides)) as srv, srv.client() as c:
            for start in range(0, len(attack), 100):
                r = c.post(
                    "/v1/texts",
                    json={
                        "items": [
                            {"text": t, "source": f"s{start + k}"} for k, t in enumerate(attack[start : start + 100])
                        ]
                    },
                )
                assert r.status_code == 202, r.text
                wait_for(lambda r=r: settled(c, r.json()["ids"], every=10), timeout=240)
            ids = teach(c, [p + ans for p, ans in facts for _ in range(12)])
            return dict(c.get(f"/v1/texts/{ids[0]}").json())

    # Source by source, with a tighter retention budget than the default (how far one one-text
    # source's loss moves depends on the machine's arithmetic: on an Intel Xeon none doubled).
    vetoed = run(tmp_path / "per-source", **{"eval.min_source_anchors": 1, "eval.forgetting_budget": 0.25})
    assert vetoed["status"] == "rejected" and vetoed["reason"].startswith("gate: anchor (s"), vetoed
    learned = run(tmp_path / "default")
    assert learned["status"] == "trained", learned


@pytest.mark.slow  # the heaviest of the fast tier (35-150 s on 2 cores): CI runs it in the slow tier
def test_the_regularizer_follows_each_promotion_and_resume_is_exact(tmp_path: Path) -> None:
    """L2-SP and EWC pull toward the weights being served: after each promotion, the penalty's
    anchor is the promoted version's weights. A trainer restarted between two batches ends with the
    same weights as one that ran through."""
    batches = [[f"Note {b}.{i}: the {w} lamp is on shelf {i}." for i in range(6)] for b, w in enumerate(names(10, 3))]
    for method in ("l2sp", "ewc"):
        overrides = {
            "runtime.trainer": "thread",
            "runtime.torch_threads": 1,
            "regularization.method": method,
            "regularization.strength": 0.5,
            "train.heldout_fraction": 0.34,  # anchors for EWC's Fisher
        }

        def daemon(data: Path, overrides: dict[str, object] = overrides) -> Daemon:
            d = Daemon(make_settings(data, **overrides))
            d.start(run_trainer=False)
            return d

        def train(d: Daemon, texts: list[str]) -> None:
            d.ingest([NewSample(t) for t in texts])
            while d.trainer.cycle():
                pass

        straight = daemon(tmp_path / f"{method}-straight")
        for texts in batches:
            train(straight, texts)
            served = straight.engine.current()
            penalty = straight.trainer._penalty
            assert isinstance(penalty, EWC if method == "ewc" else L2SP)
            for name, p in served.model.named_parameters():
                assert torch.equal(penalty.anchor[name], p), (method, served.version, name)
        first = daemon(tmp_path / f"{method}-resumed")
        for texts in batches[:2]:
            train(first, texts)
        first.stop()
        resumed = daemon(tmp_path / f"{method}-resumed")
        train(resumed, batches[2])
        a, b = straight.engine.current(), resumed.engine.current()
        assert a.version == b.version
        for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
            assert torch.allclose(p, q, atol=1e-6), (method, name)
        straight.stop()
        resumed.stop()
