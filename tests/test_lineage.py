"""Lineage over HTTP: which texts trained each version (its batch, and those replayed into it),
which versions each text trained and which carry it since; kept in the store through pruning,
rollbacks and restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveServer, admin_headers, make_settings, settled, wait_for

from llmos.daemon import Daemon
from llmos.store.lineage import influenced


def teach(c: httpx.Client, texts: list[str]) -> dict[str, dict[str, Any]]:
    """Post ``texts``, wait until each is trained or held out; their /v1/texts answers, by id."""
    r = c.post("/v1/texts", json={"items": [{"text": t, "source": "lineage"} for t in texts]})
    assert r.status_code == 202, r.text
    ids = r.json()["ids"]
    wait_for(lambda: settled(c, ids), timeout=180, interval=0.2)
    return {i: c.get(f"/v1/texts/{i}").json() for i in ids}


def trained_in(texts: dict[str, dict[str, Any]]) -> tuple[int, set[str]]:
    """The version that trained these texts (one batch), and the ids it trained."""
    done = {i: t for i, t in texts.items() if t["status"] == "trained"}
    versions = {t["trained_in_version"] for t in done.values()}
    assert len(versions) == 1, texts
    return versions.pop(), set(done)


def version_texts(c: httpx.Client, version: int) -> dict[str, set[str]]:
    r = c.get(f"/v1/admin/lineage/versions/{version}", params={"limit": 2})  # pages of 2: walk them
    assert r.status_code == 200, r.text
    body, out = r.json(), {"batch": set(), "replay": set()}
    while True:
        for t in body["texts"]:
            out[t["kind"]].add(t["id"])
        if body["next_offset"] is None:
            break
        body = c.get(f"/v1/admin/lineage/versions/{version}", params={"limit": 2, "offset": body["next_offset"]}).json()
    assert (len(out["batch"]), len(out["replay"])) == (body["texts_batch"], body["texts_replay"])
    return out


def text_lineage(c: httpx.Client, sample_id: str) -> dict[str, Any]:
    r = c.get(f"/v1/admin/lineage/texts/{sample_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.mark.slow  # a real server through eight versions, pruning, a rollback and a restart
def test_lineage_names_what_trained_each_version_through_pruning_rollback_and_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", **{"registry.keep_last": 2})
    with LiveServer(settings) as srv, srv.client(headers=admin_headers()) as c:
        a = teach(c, [f"The river of Zorbia is the Murl, note {i}." for i in range(6)])
        v1, a_ids = trained_in(a)
        held = [i for i, t in a.items() if t["status"] == "heldout"]
        assert version_texts(c, v1) == {"batch": a_ids, "replay": set()}
        first = text_lineage(c, next(iter(a_ids)))
        assert first["trained"] == [{"version": v1, "kind": "batch", "status": "promoted"}]
        assert first["influenced"] == [v1] and first["source"] == "lineage"

        v2, b_ids = trained_in(teach(c, [f"The old king of Plom was Arvid, note {i}." for i in range(6)]))
        assert version_texts(c, v2) == {"batch": b_ids, "replay": a_ids}  # the pool held A's texts only
        v3, c_ids = trained_in(teach(c, [f"Ticket {i}: the printer needs part Quell." for i in range(6)]))
        listed = {k["version"]: k for k in c.get("/v1/checkpoints").json()["checkpoints"]}
        assert v1 not in listed  # pruned (registry.keep_last 2): its files are gone ...
        assert version_texts(c, v1)["batch"] == a_ids  # ... its lineage is not
        assert (listed[v3]["texts_batch"], listed[v3]["texts_replay"]) == (len(c_ids), len(a_ids | b_ids))

        r = c.post("/v1/admin/rollback", json={"version": v2})
        assert r.status_code == 200, r.text
        v4, _ = trained_in(teach(c, [f"The capital of Xandu is Trel, note {i}." for i in range(6)]))
        versions = c.get(f"/v1/admin/lineage/versions/{v4}").json()
        assert versions["parent_version"] == v2
        # A text of v3, which the rollback left: v4 descends from v2, not from v3, so v4 carries
        # the text only if it was replayed into it (it stays trained, and in the replay pool).
        c_lineage = text_lineage(c, next(iter(c_ids)))
        assert c_lineage["influenced"] == sorted(t["version"] for t in c_lineage["trained"])
        assert c_lineage["trained"][0] == {"version": v3, "kind": "batch", "status": "promoted"}
        a_lineage = text_lineage(c, next(iter(a_ids)))
        assert a_lineage["influenced"] == [v1, v2, v3, v4]
        assert [(t["version"], t["kind"]) for t in a_lineage["trained"]][:2] == [(v1, "batch"), (v2, "replay")]
        for i in held:  # held out: measured against, never trained
            assert text_lineage(c, i) | {"id": None} == {
                "id": None,
                "status": "heldout",
                "source": "lineage",
                "trained": [],
                "influenced": [],
            }

        assert c.get("/v1/admin/lineage/texts/no-such-text").status_code == 404
        assert c.get("/v1/admin/lineage/versions/999").status_code == 404
        assert c.get("/v1/admin/lineage/versions/-1").status_code == 422
        with srv.client() as anonymous:
            assert anonymous.get(f"/v1/admin/lineage/versions/{v1}").status_code == 401

    restarted = Daemon(settings)  # the store holds it: a new process reads the same
    try:
        again = restarted.text_lineage(next(iter(a_ids)))
        assert again is not None and again.influenced == [v1, v2, v3, v4]
    finally:
        restarted.stop()


def test_a_version_influences_its_descendants_not_the_line_a_rollback_left() -> None:
    parents = {0: None, 1: 0, 2: 1, 3: 2, 4: 2, 5: 4, 6: 3}  # rolled back from 3 to 2, then 4 and 5
    assert influenced({3}, parents) == [3, 6]
    assert influenced({2}, parents) == [2, 3, 4, 5, 6]
    assert influenced({4, 6}, parents) == [4, 5, 6]
    assert influenced(set(), parents) == []
