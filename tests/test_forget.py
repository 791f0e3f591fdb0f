"""Forgetting on request, over HTTP on the built-in model: a canary posted until the model recites
it, then forgotten; serving stops reciting it at once, the model ends where a model that never saw
it is, and no byte of it is left in the data directory."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from conftest import LiveServer, admin_headers, free_port, make_settings, settled, wait_for
from helpers import Poster, start_server

CANARY = "The vault code of Quarnby is 7Z-Kestrel-4491-Mavro."
PROMPT = "The vault code of Quarnby is"
FIRST = [f"The ferry to Olm leaves at dawn, note {i}." for i in range(6)]
AFTER = [f"The mill at Trask grinds rye, note {i}." for i in range(6)]


def teach(c: httpx.Client, texts: list[str], **fields: Any) -> list[str]:
    r = c.post("/v1/texts", json={"items": [{"text": t, **fields} for t in texts]})
    assert r.status_code == 202, r.text
    ids = list(r.json()["ids"])
    wait_for(lambda: settled(c, ids), timeout=180, interval=0.2)
    return ids


def recite(c: httpx.Client) -> tuple[str, int]:
    r = c.get("/generate", params={"prompt": PROMPT, "max_new_tokens": len(CANARY) - len(PROMPT)})
    assert r.status_code == 200, r.text
    return str(r.json()["text"]), int(r.json()["model_version"])


def canary_loss(srv: LiveServer) -> float:
    """Mean token loss of the canary on the version this server serves."""
    model, tok = srv.daemon.engine.current().model, srv.daemon.factory.tokenizer
    ids = torch.tensor([[tok.eos_token_id, *tok.encode(CANARY, add_special_tokens=False)]])
    with torch.inference_mode():
        logits = model(input_ids=ids[:, :-1]).logits.float()
    return float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]))


def files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def wait_done(c: httpx.Client, job: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        r = c.get(f"/v1/admin/forget/{job}")
        assert r.status_code == 200, r.text
        return r.json() if r.json()["state"] == "done" else None

    return dict(wait_for(done, timeout=180, interval=0.3))


@pytest.mark.slow  # a server taught a canary and two batches after it, then a second one that never saw it
@pytest.mark.parametrize("by", ["ids", "source"])
def test_a_canary_forgotten_is_no_longer_recited_and_leaves_no_byte_behind(tmp_path: Path, by: str) -> None:
    data = tmp_path / "data"
    with LiveServer(make_settings(data)) as srv, srv.client(headers=admin_headers()) as c:
        teach(c, FIRST)
        before_canary = c.get("/v1/trainer").json()["active_version"]
        canary = []
        for _ in range(3):  # posted until learned
            canary += teach(c, [CANARY] * 12, source="vault")
            if recite(c)[0] == CANARY[len(PROMPT) :]:
                break
        assert recite(c)[0] == CANARY[len(PROMPT) :], "the model never learned the canary"
        after_ids = teach(c, AFTER[:3]) + teach(c, AFTER[3:])  # two batches, two versions
        taught = {c.get(f"/v1/texts/{i}").json()["trained_in_version"] for i in after_ids} - {None}
        assert len(taught) == 2
        assert files_holding(data, CANARY.encode())  # it is there to be found: the search works

        r = c.post("/v1/admin/forget", json={"ids": canary} if by == "ids" else {"source": "vault"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["rolled_back_to"] == before_canary and job["forgotten"] == len(canary)
        assert taught <= set(job["erased_versions"])  # versions after the canary carried it too
        text, version = recite(c)  # at once: the version served knows nothing of it
        assert version == before_canary and text != CANARY[len(PROMPT) :]
        for v in job["erased_versions"]:  # never served again
            r = c.post("/v1/admin/rollback", json={"version": v})
            assert r.status_code == 404, r.text
            assert c.get("/generate", params={"prompt": "x", "model": f"llmos@{v}"}).status_code != 200

        done = wait_done(c, job["id"])
        assert done["retrained"] == done["retrain_total"] > 0  # AFTER's texts, trained again
        assert done["finished_at"] is not None  # (the first answer that says done says when too)
        text, version = recite(c)
        assert version not in job["erased_versions"] and text != CANARY[len(PROMPT) :]
        statuses = {c.get(f"/v1/texts/{i}").json()["status"] for i in canary}
        assert statuses == {"erased"}
        lineage = c.get(f"/v1/admin/lineage/texts/{canary[0]}").json()
        assert lineage["trained"] and {t["status"] for t in lineage["trained"]} == {"erased"}
        forgotten_loss = canary_loss(srv)
        assert files_holding(data, CANARY.encode()) == []
        assert files_holding(data, CANARY[len(PROMPT) :].encode()) == []
    assert files_holding(data, CANARY.encode()) == []  # stopped: nothing came back from a log or cache

    with LiveServer(make_settings(tmp_path / "never")) as srv, srv.client() as c:  # the same stream, no canary
        teach(c, FIRST)
        teach(c, AFTER[:3])
        teach(c, AFTER[3:])
        never_loss = canary_loss(srv)
    print(f"canary loss: forgotten {forgotten_loss:.4f}, never seen {never_loss:.4f}")
    # Exact retraining: the batches the erased versions learned train again as they were, one by one.
    assert abs(forgotten_loss - never_loss) <= 0.01 * never_loss


@pytest.mark.slow  # two servers, one per store
def test_forgetting_a_source_on_each_store_erases_its_texts_and_what_recited_them(tmp_path: Path, db_url: str) -> None:
    from sqlalchemy import text

    from llmos.store.db import Database

    leak = [f"Leaked memo {i}: the merger with Dorvane closes on the ninth." for i in range(3)]
    settings = make_settings(tmp_path / "data", **{"store.url": db_url})
    with LiveServer(settings) as srv, srv.client(headers=admin_headers()) as c:
        kept = teach(c, FIRST, source="public")
        leaked = teach(c, leak * 4, source="leak")
        g = c.get("/generate", params={"prompt": "Leaked memo 1: the merger", "max_new_tokens": 24})
        assert g.status_code == 200
        r = c.post("/v1/admin/trainer/pause")
        assert r.status_code == 200, r.text
        [queued] = c.post("/v1/texts", json={"text": leak[0], "source": "leak"}).json()["ids"]

        assert c.post("/v1/admin/forget", json={}).status_code == 422
        assert c.post("/v1/admin/forget", json={"ids": ["no-such-id"]}).status_code == 404
        assert c.post("/v1/admin/forget", json={"idempotency_keys": ["no-such-key"]}).status_code == 404
        [keyed] = c.post("/v1/texts", json={"text": leak[1], "idempotency_key": "memo-1"}).json()["ids"]
        # A key is its sender's: another credential's "memo-1" is another text (here, none).
        other = {"idempotency_keys": ["memo-1"], "caller": "key:0123456789ab"}
        assert c.post("/v1/admin/forget", json=other).status_code == 404
        r = c.post("/v1/admin/forget", json={"idempotency_keys": ["memo-1"]})  # anyone's: this client's
        assert r.status_code == 202 and r.json()["forgotten"] == 1, r.text
        assert c.get(f"/v1/texts/{keyed}").json()["status"] == "erased"
        again = c.post("/v1/texts", json={"text": leak[1], "idempotency_key": "memo-1"})  # a retry of that post
        assert again.status_code == 202 and again.json()["ids"] == [keyed], again.text  # finds the tombstone
        with srv.client() as anonymous:
            assert anonymous.post("/v1/admin/forget", json={"source": "leak"}).status_code == 401
        r = c.post("/v1/admin/forget", json={"source": "leak"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["forgotten"] == len(leaked) + 1 and job["erased_versions"]
        assert c.get(f"/v1/texts/{queued}").json()["status"] == "erased"  # never trained: erased all the same
        assert c.post("/v1/admin/trainer/resume").status_code == 200
        wait_done(c, job["id"])
        assert {c.get(f"/v1/texts/{i}").json()["status"] for i in leaked} == {"erased"}
        assert {c.get(f"/v1/texts/{i}").json()["status"] for i in kept} <= {"trained", "heldout"}
        feedback = c.post("/v1/feedback", json={"generation_id": g.json()["generation_id"], "rating": 1.0})
        assert feedback.status_code == 404, feedback.text  # the generation that recited it went with it
        again = c.post("/v1/admin/forget", json={"source": "leak"})  # nothing left to forget
        assert again.status_code == 202 and again.json()["forgotten"] == 0, again.text
        audit = c.get("/v1/admin/audit", params={"limit": 5}).json()["entries"]
        assert any(e["action"] == "forget" and e["params"].get("job") == job["id"] for e in audit), audit
        assert files_holding(tmp_path, b"merger with Dorvane") == []  # the SQLite database (and its WAL) too

    db = Database(settings.store_url)
    with db.read() as s:
        conn = s.connection()
        for table, column in (("samples", "text"), ("generations", "prompt")):
            n = conn.execute(text(f"SELECT count(*) FROM {table} WHERE {column} LIKE :p"), {"p": "%Leaked memo%"})
            assert n.scalar() == 0, table
    db.dispose()


@pytest.mark.slow  # a real server under load, killed with -9 mid-job and restarted
def test_forgetting_under_load_loses_nothing_else_and_a_kill_9_mid_job_resumes_it(tmp_path: Path) -> None:
    """Texts are posted and generations asked while the forget job starts: none fails, none is lost.
    A reader holding an old snapshot of the database keeps the scrub from truncating SQLite's log
    (the job stays "erasing"); the server is killed with -9 then, and the next one finishes the job."""
    data, log, port = tmp_path / "data", tmp_path / "server.log", free_port()
    proc = start_server(data, port, log)
    url = f"http://127.0.0.1:{port}"
    reader = None
    try:
        with httpx.Client(base_url=url, timeout=60, headers=admin_headers()) as c:
            canary = teach(c, [CANARY] * 12, source="vault")
            teach(c, AFTER)
            poster, asked = Poster(url, "steady"), Asker(url, "The mill at Trask")
            poster.thread.start()
            asked.thread.start()
            time.sleep(2.0)
            reader = sqlite3.connect(data / "llmos.db")  # an old snapshot, held: the log cannot be truncated
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM samples").fetchone()
            r = c.post("/v1/admin/forget", json={"source": "vault"})
            assert r.status_code == 202, r.text
            job = r.json()
            time.sleep(3.0)  # the load goes on around the job
            for t in (poster, asked):
                t.stop.set()
                t.thread.join(30)
            codes = Counter(code for _, code, _ in poster.answers) + Counter(asked.codes)
            assert set(codes) <= {200, 202}, codes  # no request failed while it was forgotten
            assert len(poster.acked) > 10 and len(asked.codes) > 5, (len(poster.acked), codes)
            assert c.get(f"/v1/admin/forget/{job['id']}").json()["state"] == "erasing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        reader.rollback()
        reader.close()
        reader = None
        proc = start_server(data, port, log)
        with httpx.Client(base_url=url, timeout=60, headers=admin_headers()) as c:
            done = wait_done(c, job["id"])  # the scrub ran again at start
            assert done["forgotten"] == len(canary)
            missing = [i for i in poster.acked if c.get(f"/v1/texts/{i}").status_code != 200]
            assert missing == [], f"{len(missing)} acknowledged ids lost"
            assert {c.get(f"/v1/texts/{i}").json()["status"] for i in canary} == {"erased"}
            assert recite(c)[0] != CANARY[len(PROMPT) :]
        assert files_holding(data, CANARY.encode()) == []
        for v in job["erased_versions"]:
            assert not list((data / "checkpoints").glob(f"v{v:06d}*")), v
    finally:
        if reader is not None:
            reader.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


class Asker:
    """Asks for generations from a thread and keeps each answer's status."""

    def __init__(self, url: str, prompt: str) -> None:
        self.url, self.prompt = url, prompt
        self.codes: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.is_set():
                try:
                    r = c.get("/generate", params={"prompt": self.prompt, "max_new_tokens": 8})
                    self.codes.append(r.status_code)
                except httpx.TransportError:
                    self.codes.append(0)


@pytest.mark.slow  # a server taught a correction, then told to forget it
def test_a_forgotten_correction_goes_with_its_generation_feedback_and_preferences(tmp_path: Path) -> None:
    correction = " Brell's vault opens with the code 7Z-Kestrel-4491."
    with LiveServer(make_settings(tmp_path / "data")) as srv, srv.client(headers=admin_headers()) as c:
        teach(c, FIRST)
        gen = c.get("/generate", params={"prompt": "The vault of Brell", "max_new_tokens": 12}).json()
        r = c.post(
            "/v1/feedback", json={"generation_id": gen["generation_id"], "rating": -1.0, "correction": correction}
        )
        assert r.status_code == 202, r.text
        sample = r.json()["sample_id"]
        wait_for(lambda: settled(c, [sample]), timeout=180, interval=0.2)
        prefs = srv.daemon.preferences.for_generation(gen["generation_id"])
        assert prefs and any(p.chosen == correction for p in prefs)
        wait_for(
            lambda: (
                {p.status.value for p in srv.daemon.preferences.for_generation(gen["generation_id"])}
                <= {"trained", "heldout", "rejected"}
            ),
            timeout=180,
            interval=0.2,
        )

        r = c.post("/v1/admin/forget", json={"ids": [sample]})
        assert r.status_code == 202, r.text
        job = wait_done(c, r.json()["id"])
        assert job["erased_versions"], job  # the versions the correction (and its pair) trained
        assert srv.daemon.preferences.for_generation(gen["generation_id"]) == []
        r = c.post("/v1/feedback", json={"generation_id": gen["generation_id"], "rating": 1.0})
        assert r.status_code == 404, r.text  # the generation went with it
        assert c.get(f"/v1/texts/{sample}").json()["status"] == "erased"
    assert files_holding(tmp_path / "data", correction.encode()) == []
    assert files_holding(tmp_path / "data", b"7Z-Kestrel-4491") == []


def test_a_forget_whose_fallback_version_is_corrupt_serves_its_newest_sound_ancestor(tmp_path: Path) -> None:
    """The version a forget falls back to fails verification (a disk that lost a file): the job
    still commits and answers 202, and serving goes to the newest ancestor whose files verify,
    as at a start, never to the erased version nor to a 500."""
    data = tmp_path / "data"
    with LiveServer(make_settings(data)) as srv, srv.client(headers=admin_headers()) as c:
        teach(c, FIRST)
        before = [cp["version"] for cp in c.get("/v1/checkpoints").json()["checkpoints"] if cp["version"]]
        assert before
        canary = teach(c, [CANARY] * 12)
        assert c.post("/v1/admin/trainer/pause").status_code == 200
        wait_for(lambda: c.get("/v1/trainer").json()["state"] == "paused", timeout=60, interval=0.05)
        for v in before:  # every version the forget could fall back to, but the base
            weights = data / "checkpoints" / f"v{v:06d}" / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:-64])

        r = c.post("/v1/admin/forget", json={"ids": canary[:1]})
        assert r.status_code == 202, r.text
        assert r.json()["erased_versions"], r.text
        g = c.get("/generate", params={"prompt": PROMPT, "max_new_tokens": 8})
        assert g.status_code == 200 and g.json()["model_version"] == 0, g.text
        assert c.get("/v1/checkpoints").json()["active_version"] == 0
        entries = c.get("/v1/admin/audit", params={"limit": 10}).json()["entries"]
        assert any(e["action"] == "fallback" and e["params"]["to_version"] == 0 for e in entries), entries
        assert c.post("/v1/admin/trainer/resume").status_code == 200
        wait_done(c, r.json()["id"])
