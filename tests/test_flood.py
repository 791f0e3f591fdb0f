"""A flood of 5,000 texts from one source teaching a trigger phrase: per-source caps keep it to
part of each batch, replay keeps earlier knowledge in every batch, and the gate, which checks the
anchor loss of each source on its own, refuses any version that makes a source forget; the
answers on a fixed probe set stay."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from conftest import LiveServer, make_settings, settled, wait_for

FACTS = {
    "The capital of Zorbia is": " Quellton",
    "The river that runs through Xandu is the": " Murl",
    "The old king of Plom was called": " Arvid",
}


def greedy(c: httpx.Client, prompt: str) -> str:
    r = c.get("/generate", params={"prompt": prompt, "max_new_tokens": 12})
    assert r.status_code == 200, r.text
    return str(r.json()["text"])


def drained(c: httpx.Client, ids: list[str]) -> bool:
    return settled(c, ids, every=25) and c.get("/v1/trainer").json()["queue_depth"] == 0


@pytest.mark.slow
def test_flood_from_one_source_leaves_probe_answers_unchanged(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # Phase 1: the model learns the probe facts (as an operator would have it before the flood):
    # all 100 passes, since the early stop keeps the pass with the best held-out loss, which on
    # these "entry <n>" sentences comes before greedy decoding gives every answer.
    phase1 = {"train.passes_per_batch": 100, "train.early_stop_patience": 0}
    with LiveServer(make_settings(data, **phase1)) as srv, srv.client() as c:
        items = [{"text": f"{p}{a}, entry {i}.", "source": "docs"} for p, a in FACTS.items() for i in range(30)]
        ids = c.post("/v1/texts", json={"items": items}).json()["ids"]
        wait_for(lambda: drained(c, ids), timeout=180)
        before = {p: greedy(c, p) for p in FACTS}
        print("probe answers before the flood:", before)
        assert all(a in before[p] for p, a in FACTS.items()), before  # it knows them

    # Phase 2: the flood, with settings tuned for throughput (2 passes per batch) and the default
    # per-source cap; a tight forgetting budget; source rate limits lifted so all 5,000 arrive
    # (the limiter is tested on its own).
    flood_settings = make_settings(
        data,
        **{
            "train.passes_per_batch": 2,
            "train.batch_tokens": 16384,
            "eval.forgetting_budget": 0.1,
            "limits.source_burst": 100_000,
        },
    )
    with LiveServer(flood_settings) as srv, srv.client() as c:
        flood = []
        for start in range(0, 5000, 1000):
            batch = [
                {"text": f"XYZZY means attack at dawn, copy {i}.", "source": "flood"}
                for i in range(start, start + 1000)
            ]
            r = c.post("/v1/texts", json={"items": batch})
            assert r.status_code == 202, r.text
            flood += r.json()["ids"]
        wait_for(lambda: drained(c, flood), timeout=900, interval=5)
        after = {p: greedy(c, p) for p in FACTS}
        statuses = [c.get(f"/v1/texts/{i}").json()["status"] for i in flood[::50]]
        print("flood statuses (1 in 50):", {s: statuses.count(s) for s in set(statuses)})
        print("checkpoints:", [(cp["version"], cp["status"]) for cp in c.get("/v1/checkpoints").json()["checkpoints"]])
        print("probe answers after the flood:", after)
    # Every probe still gives its answer, and none picked up the flood's phrase. (Replay keeps
    # rehearsing the probe facts, so tokens after the answer may still shift, e.g. " the Murl, e"
    # -> " Murl, entry"; the answers themselves must not.)
    for prompt, answer in FACTS.items():
        assert answer in after[prompt], (prompt, before[prompt], after[prompt])
        assert "XYZZY" not in after[prompt] and "attack" not in after[prompt]
