"""Access: API keys for the data routes, the admin token for /v1/admin/*, the audit log of admin
actions, admin actions that take registry versions only, and the refusal to open the API to the
network without keys. Against the real server over HTTP."""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN, LiveServer, make_settings
from typer.testing import CliRunner

from llmos.api.deps import Keyring, fingerprint
from llmos.cli import app, is_loopback
from llmos.settings import ConfigError, load_settings

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("auth") / "data", **{"auth.api_keys": [KEY_A, KEY_B]})
    with LiveServer(settings) as srv:
        yield srv


DATA_ROUTES = [
    ("POST", "/v1/texts", {"text": "hello"}, 202),
    ("GET", "/generate?prompt=hi&max_new_tokens=2", None, 200),
    ("POST", "/generate", {"prompt": "hi", "max_new_tokens": 2}, 200),
    ("GET", "/v1/checkpoints", None, 200),
    ("GET", "/v1/trainer", None, 200),
]


@pytest.mark.parametrize(("method", "path", "body", "ok"), DATA_ROUTES, ids=[f"{m} {p}" for m, p, _, _ in DATA_ROUTES])
def test_data_routes_need_a_known_api_key(keyed: LiveServer, method: str, path: str, body: object, ok: int) -> None:
    with keyed.client() as c:
        r = c.request(method, path, json=body)
        assert r.status_code == 401, r.text
        assert "API key required" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
        r = c.request(method, path, json=body, headers=bearer("not-a-key-0123456789"))
        assert r.status_code == 401 and r.json()["detail"] == "unknown API key"
        r = c.request(method, path, json=body, headers={"Authorization": f"Basic {KEY_A}"})
        assert r.status_code == 401, r.text
        for key in (KEY_A, KEY_B, ADMIN):  # either key; the admin token may do what a key may
            r = c.request(method, path, json=body, headers=bearer(key))
            assert r.status_code == ok, r.text


def test_feedback_and_text_status_need_a_key(keyed: LiveServer) -> None:
    with keyed.client(headers=bearer(KEY_A)) as c:
        gid = c.get("/generate", params={"prompt": "x", "max_new_tokens": 2}).json()["generation_id"]
        tid = c.post("/v1/texts", json={"text": "status check"}).json()["ids"][0]
    with keyed.client() as anon:
        assert anon.post("/v1/feedback", json={"generation_id": gid, "rating": 1}).status_code == 401
        assert anon.get(f"/v1/texts/{tid}").status_code == 401
    with keyed.client(headers=bearer(KEY_B)) as c:
        assert c.post("/v1/feedback", json={"generation_id": gid, "rating": 1}).status_code == 202
        assert c.get(f"/v1/texts/{tid}").status_code == 200


def test_an_api_key_on_an_admin_route_is_forbidden(keyed: LiveServer) -> None:
    with keyed.client() as c:
        for method, path, body in [
            ("POST", "/v1/admin/rollback", {"version": 0}),
            ("POST", "/v1/admin/trainer/pause", None),
            ("POST", "/v1/admin/trainer/resume", None),
            ("GET", "/v1/admin/audit", None),
        ]:
            r = c.request(method, path, json=body, headers=bearer(KEY_A))
            assert r.status_code == 403, (path, r.text)
            assert "admin token" in r.json()["detail"]
            assert c.request(method, path, json=body).status_code == 401
            assert c.request(method, path, json=body, headers=bearer("x" * 30)).status_code == 401
        assert c.get("/v1/trainer", headers=bearer(KEY_A)).json()["state"] != "paused"  # nothing happened


def test_health_probes_need_no_credential(keyed: LiveServer) -> None:
    with keyed.client() as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200


def test_head_answers_where_get_does_with_no_body(keyed: LiveServer) -> None:
    """Load balancers and uptime checks often probe with HEAD (it was 405)."""
    with keyed.client(headers=bearer(KEY_A)) as c:
        for path in ("/healthz", "/readyz", "/metrics", "/dashboard"):
            r = c.head(path)
            assert r.status_code == c.get(path).status_code == 200, path
            assert r.content == b"", path


def test_metrics_need_a_key_once_keys_are_set(keyed: LiveServer) -> None:
    with keyed.client() as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=bearer("x" * 30)).status_code == 401
        r = c.get("/metrics", headers=bearer(KEY_B))
        assert r.status_code == 200 and "llmos_active_version" in r.text
        assert c.get("/metrics", headers=bearer(ADMIN)).status_code == 200


def test_open_api_on_loopback_needs_no_key_and_ignores_stray_ones(live: LiveServer) -> None:
    with live.client() as c:
        assert c.post("/v1/texts", json={"text": "open"}).status_code == 202
        # Clients that always send some key (OpenAI SDKs do) are not turned away when no keys are set.
        assert c.post("/v1/texts", json={"text": "open"}, headers=bearer("sk-anything")).status_code == 202
        assert c.post("/v1/admin/trainer/pause", headers=bearer("sk-anything")).status_code == 401


def test_admin_actions_are_audited_without_the_secret(keyed: LiveServer) -> None:
    admin = bearer(ADMIN)
    with keyed.client(headers=admin) as c:
        first = c.get("/v1/admin/audit").json()["entries"]
        newest_before = first[0]["id"] if first else 0
        assert c.post("/v1/admin/trainer/pause").status_code == 200
        assert c.post("/v1/admin/rollback", json={"version": 0}).status_code == 200
        assert c.post("/v1/admin/rollback", json={"version": 4242}).status_code == 404
        assert c.post("/v1/admin/trainer/resume").status_code == 200
        r = c.get("/v1/admin/audit", params={"limit": 10})
        assert r.status_code == 200
        entries = [e for e in r.json()["entries"] if e["id"] > newest_before]
    assert [e["action"] for e in entries] == ["trainer.resume", "rollback", "rollback", "trainer.pause"]
    assert [e["outcome"] for e in entries] == ["ok", "refused", "ok", "ok"]
    assert [e["status_code"] for e in entries] == [200, 404, 200, 200]
    assert entries[1]["params"] == {"version": 4242, "requeue": False}
    assert "4242" in entries[1]["detail"]
    assert {e["actor"] for e in entries} == {f"admin:{fingerprint(ADMIN)}"}
    assert all(e["at"] for e in entries)
    assert ADMIN not in r.text  # who did it is named by a fingerprint, never the secret
    ids = [e["id"] for e in entries]
    assert ids == sorted(ids, reverse=True)


def test_refused_admin_attempts_are_audited_too(keyed: LiveServer) -> None:
    """No token, a wrong one, an API key: each 401/403 is an entry (docs/api.md: every admin action,
    allowed or refused), naming the caller by address or key fingerprint, never the secret sent."""
    with keyed.client() as c:
        first = c.get("/v1/admin/audit", headers=bearer(ADMIN)).json()["entries"]
        newest_before = first[0]["id"] if first else 0
        assert c.post("/v1/admin/trainer/pause").status_code == 401
        assert c.post("/v1/admin/rollback", json={"version": 0}, headers=bearer("w" * 32)).status_code == 401
        assert c.post("/v1/admin/trainer/resume", headers=bearer(KEY_A)).status_code == 403
        r = c.get("/v1/admin/audit", params={"limit": 10}, headers=bearer(ADMIN))
    entries = [e for e in r.json()["entries"] if e["id"] > newest_before][::-1]
    assert [(e["action"], e["outcome"], e["status_code"]) for e in entries] == [
        ("POST /v1/admin/trainer/pause", "refused", 401),
        ("POST /v1/admin/rollback", "refused", 401),
        ("POST /v1/admin/trainer/resume", "refused", 403),
    ]
    assert [e["actor"] for e in entries] == ["addr:127.0.0.1", "addr:127.0.0.1", f"key:{fingerprint(KEY_A)}"]
    assert "w" * 32 not in r.text and KEY_A not in r.text


def test_audit_pages_back_with_before(keyed: LiveServer) -> None:
    with keyed.client(headers=bearer(ADMIN)) as c:
        for _ in range(3):
            c.post("/v1/admin/trainer/resume")
        page1 = c.get("/v1/admin/audit", params={"limit": 2}).json()
        assert len(page1["entries"]) == 2 and page1["next_before"] == page1["entries"][-1]["id"]
        page2 = c.get("/v1/admin/audit", params={"limit": 2, "before": page1["next_before"]}).json()
        assert page2["entries"] and max(e["id"] for e in page2["entries"]) < page1["next_before"]
        assert c.get("/v1/admin/audit", params={"limit": 0}).status_code == 422


def test_audit_survives_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    with LiveServer(settings) as srv, srv.client(headers=bearer(ADMIN)) as c:
        assert c.post("/v1/admin/trainer/pause").status_code == 200
    with LiveServer(settings) as srv, srv.client(headers=bearer(ADMIN)) as c:
        actions = [e["action"] for e in c.get("/v1/admin/audit").json()["entries"]]
    assert "trainer.pause" in actions


# Strings an admin operation may take: names of stored rows (texts, jobs, a source, the credential
# that posted a key), compared for equality in the store, never opened or fetched.
ROW_NAMES = {"sample_id", "job_id", "ids", "idempotency_keys", "source", "caller"}


def test_admin_operations_take_registry_versions_only(keyed: LiveServer) -> None:
    """No admin operation takes a string besides the names of stored rows (ROW_NAMES), so no path
    or URL can be passed: versions are registry numbers."""
    spec = httpx.get(keyed.url + "/openapi.json").json()
    components = spec["components"]["schemas"]
    admin_ops = [(path, op) for path, ops in spec["paths"].items() if path.startswith("/v1/admin/") for op in ops]
    assert {p for p, _ in admin_ops} >= {"/v1/admin/rollback", "/v1/admin/trainer/pause", "/v1/admin/audit"}
    for path, method in admin_ops:
        op = spec["paths"][path][method]
        for param in op.get("parameters", []):
            types = json.dumps(param["schema"])
            assert '"string"' not in types or param["name"] in ROW_NAMES, (path, param)
        body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        if body:
            schema = components[body["$ref"].rsplit("/", 1)[1]]
            for name, prop in schema["properties"].items():
                assert prop.get("type") in ("integer", "boolean") or name in ROW_NAMES, (path, name, prop)
            assert schema.get("additionalProperties") is False, path


@pytest.mark.parametrize(
    "body",
    [
        {"version": "../../etc/passwd"},
        {"version": "file:///etc/passwd"},
        {"version": "http://example.com/evil.safetensors"},
        {"version": 1.5},
        {"version": 0, "path": "/tmp/evil"},
        {"version": 0, "url": "http://example.com/w"},
    ],
)
def test_rollback_refuses_anything_but_a_version_number(keyed: LiveServer, body: dict[str, object]) -> None:
    with keyed.client(headers=bearer(ADMIN)) as c:
        r = c.post("/v1/admin/rollback", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["detail"]


# ---- the keyring ------------------------------------------------------------------------------


def test_every_key_is_compared_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [f"key-{i}-0123456789abcdef" for i in range(5)]
    ring = Keyring(ADMIN, keys)
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(len(a) + len(b))
        return real(a, b)

    monkeypatch.setattr("llmos.api.deps.hmac.compare_digest", counting)
    for presented in (keys[0], keys[4], ADMIN, "wrong", "x" * 5000):
        calls.clear()
        ring.identify(presented)
        assert len(calls) == 1 + len(keys), presented  # the admin token and every key, matched or not
        assert set(calls) == {64}, presented  # equal-length digests, whatever the secret's length
    caller = ring.identify(keys[2])
    assert caller is not None and caller.kind == "api_key" and caller.id == f"key:{fingerprint(keys[2])}"
    assert keys[2] not in caller.id


def test_api_keys_must_be_long_and_differ_from_the_admin_token() -> None:
    with pytest.raises(ConfigError, match="auth.api_keys"):
        load_settings(None, **{"auth.api_keys": ["short"]})
    with pytest.raises(ConfigError, match="admin token must not also be an API key"):
        load_settings(None, **{"auth.admin_token": KEY_A, "auth.api_keys": [KEY_A]})


# ---- binding beyond loopback -----------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("LLMOS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "llmos.example.com"])
def test_serve_refuses_a_public_address_without_api_keys(clean_env: None, tmp_path: Path, host: str) -> None:
    result = CliRunner().invoke(app, ["serve", "--host", host, "--port", "0"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert f"refusing to listen on {host} without API keys" in result.output
    assert "auth.api_keys" in result.output
    assert not (tmp_path / "llmos-data").exists()  # refused before anything started


def test_loopback_addresses() -> None:
    assert all(is_loopback(h) for h in ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
    assert not any(is_loopback(h) for h in ["0.0.0.0", "::", "10.0.0.1", "example.com", ""])


def test_serve_with_api_keys_may_listen_on_a_public_address(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmos.daemon

    class Reached(ValueError):
        pass

    def fake_daemon(settings: object, role: str = "all") -> None:
        raise Reached("the start-up got past the address check")

    monkeypatch.setattr(llmos.daemon, "Daemon", fake_daemon)
    monkeypatch.setenv("LLMOS_AUTH__API_KEYS", json.dumps([KEY_A]))
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "0"])
    assert "got past the address check" in result.output, result.output


def test_idempotency_keys_belong_to_their_credential_and_a_changed_text_is_409(keyed: LiveServer) -> None:
    """Before, one namespace for every key: another key holder's reuse got the first text's id (and
    could then read its status), and a reuse with another text was dropped silently with a 202."""
    with keyed.client() as c:

        def post(key: str, text: str) -> httpx.Response:
            return c.post("/v1/texts", json={"text": text, "idempotency_key": "order-7"}, headers=bearer(key))

        a = post(KEY_A, "Ticket 7: the lamp is teal.")
        b = post(KEY_B, "Ticket 7: the printer jams.")
        assert a.status_code == b.status_code == 202
        assert a.json()["ids"] != b.json()["ids"]
        again = post(KEY_A, "Ticket 7: the lamp is teal.")
        assert again.status_code == 202 and again.json()["ids"] == a.json()["ids"]  # a retry
        changed = post(KEY_A, "Ticket 7: the lamp is red.")
        assert changed.status_code == 409 and "idempotency key" in changed.json()["detail"], changed.text
