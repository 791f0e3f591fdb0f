"""Dependencies shared by the routes: the daemon, who is calling, rate limits, the admin audit.

Two kinds of credential, both sent as ``Authorization: Bearer <secret>``: API keys
(``auth.api_keys``) for ingest, feedback and generation, and the admin token for ``/v1/admin/*``.
With no API keys configured the data routes are open (the CLI allows that on loopback only).
Secrets are compared in constant time, against every key every time; only a short fingerprint of
a secret (never the secret) is kept, for rate limits and the audit log.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from llmos.api.limits import Limiter, RateLimiter, retry_after
from llmos.api.relay import Slots
from llmos.daemon import Daemon
from llmos.store.audit import AuditOutcome

_bearer = HTTPBearer(auto_error=False, description="An API key, or the admin token for /v1/admin/*")
_BEARER_HINT = {"WWW-Authenticate": "Bearer"}


def fingerprint(secret: str) -> str:
    """A short, stable, non-reversible name for a secret (the first 12 hex digits of its sha256)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True)
class Caller:
    """Who sent a request: ``id`` names the credential (or the client address when the API is open)
    without revealing it; rate limits and the audit log key on it."""

    kind: Literal["admin", "api_key", "anonymous"]
    id: str


# Callers of an open API: llmos listens on loopback alone without API keys (cli.py refuses more).
OPEN_CALLERS = ("addr:127.0.0.1", "addr:::1", "addr:unknown")


class Keyring:
    """The credentials this process accepts, kept as sha256 digests so that every comparison is
    between equal-length values (hmac.compare_digest leaks lengths, not contents)."""

    def __init__(self, admin_token: str, api_keys: Sequence[str]) -> None:
        self._admin = hashlib.sha256(admin_token.encode("utf-8")).digest()
        self._admin_id = "admin:" + fingerprint(admin_token)
        self._keys = [(hashlib.sha256(k.encode("utf-8")).digest(), "key:" + fingerprint(k)) for k in api_keys]

    def caller_ids(self) -> list[str]:
        """Every credential's caller id, and those of open-API callers (loopback addresses only)."""
        return [self._admin_id, *(kid for _, kid in self._keys), *OPEN_CALLERS]

    @property
    def open(self) -> bool:
        """No API keys configured: the data routes need no credential."""
        return not self._keys

    def identify(self, presented: str) -> Caller | None:
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        is_admin = hmac.compare_digest(digest, self._admin)
        key_id = None
        for key_digest, kid in self._keys:  # every key, every time: no early exit
            if hmac.compare_digest(digest, key_digest):
                key_id = kid
        if is_admin:
            return Caller("admin", self._admin_id)
        return Caller("api_key", key_id) if key_id else None


def get_daemon(request: Request) -> Daemon:
    daemon: Daemon = request.app.state.daemon
    return daemon


DaemonDep = Annotated[Daemon, Depends(get_daemon)]
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def get_keyring(request: Request) -> Keyring:
    keyring: Keyring = request.app.state.keyring
    return keyring


def get_key_limiter(request: Request) -> Limiter:
    limiter: Limiter = request.app.state.key_limiter
    return limiter


def get_source_limiter(request: Request) -> Limiter:
    limiter: Limiter = request.app.state.source_limiter
    return limiter


def get_slots(request: Request) -> Slots:
    slots: Slots = request.app.state.generation_slots
    return slots


KeyringDep = Annotated[Keyring, Depends(get_keyring)]
SlotsDep = Annotated[Slots, Depends(get_slots)]
SourceLimiterDep = Annotated[Limiter, Depends(get_source_limiter)]


def too_many(detail: str, wait_s: float) -> HTTPException:
    return HTTPException(429, detail, headers={"Retry-After": retry_after(wait_s)})


def require_api_key(
    request: Request,
    creds: BearerDep,
    keyring: KeyringDep,
    limiter: Annotated[Limiter, Depends(get_key_limiter)],
) -> Caller:
    """An API key (or the admin token); none needed when no keys are configured. Then the
    key's rate limit."""
    caller = keyring.identify(creds.credentials) if creds is not None else None
    if caller is None:
        if not keyring.open:
            if creds is None:
                raise HTTPException(401, "API key required: send 'Authorization: Bearer <key>'", headers=_BEARER_HINT)
            raise HTTPException(401, "unknown API key", headers=_BEARER_HINT)
        # Open API (loopback only): clients that always send some key (OpenAI SDKs do) are welcome.
        # Every local client has the same address, so there is no caller to limit: the per-source
        # limits and the queue depth still hold.
        return Caller("anonymous", "addr:" + (request.client.host if request.client else "unknown"))
    wait = limiter.take({caller.id: 1})
    if wait:
        raise too_many(
            f"rate limit: {limiter.rate_per_s:g} requests per second per key, bursts of {limiter.burst} "
            "(limits.key_rate_per_s, limits.key_burst); retry later",
            wait,
        )
    return caller


# For any router (this one, an OpenAI-compatible one, ...): `caller: ApiKeyDep` as a parameter, or
# `dependencies=[ApiKey]`.
ApiKeyDep = Annotated[Caller, Depends(require_api_key)]
ApiKey = Depends(require_api_key)  # for dependencies=[...] where the route does not need the caller


def require_admin(request: Request, creds: BearerDep, keyring: KeyringDep, daemon: DaemonDep) -> Caller:
    """The admin caller; a refused attempt (401, 403) is recorded in the audit log too."""
    address = "addr:" + (request.client.host if request.client else "unknown")
    refusal: tuple[str, HTTPException] | None = None
    caller = keyring.identify(creds.credentials) if creds is not None else None
    if creds is None:
        hint = "admin token required: send 'Authorization: Bearer <token>'"
        refusal = address, HTTPException(401, hint, headers=_BEARER_HINT)
    elif caller is None:
        refusal = address, HTTPException(401, "wrong admin token", headers=_BEARER_HINT)
    elif caller.kind != "admin":
        refusal = caller.id, HTTPException(403, "an API key cannot use /v1/admin/*: send the admin token")
    if refusal is None:
        assert caller is not None
        return caller
    actor, exc = refusal
    limiter: RateLimiter = request.app.state.refusal_audit
    if not limiter.take({address: 1}):
        action = f"{request.method} {request.url.path}"[:200]
        daemon.audit(actor, action, {}, AuditOutcome.refused, exc.status_code, str(exc.detail))
    raise exc


AdminDep = Depends(require_admin)
AdminCallerDep = Annotated[Caller, Depends(require_admin)]


class AdminAudit:
    """Records each admin action in the store's audit log with its outcome."""

    def __init__(self, daemon: Daemon, caller: Caller) -> None:
        self._daemon = daemon
        self.caller = caller

    @contextmanager
    def __call__(self, action: str, ok_code: int = 200, **params: Any) -> Iterator[dict[str, Any]]:
        """Record ``action`` with ``params`` and how it ended; the block may add to the params it is
        given (what the action made: a job's id)."""
        try:
            yield params
        except HTTPException as exc:
            outcome = AuditOutcome.refused if exc.status_code < 500 else AuditOutcome.error
            self._daemon.audit(self.caller.id, action, params, outcome, exc.status_code, str(exc.detail))
            raise
        except Exception as exc:
            self._daemon.audit(self.caller.id, action, params, AuditOutcome.error, 500, type(exc).__name__)
            raise
        self._daemon.audit(self.caller.id, action, params, AuditOutcome.ok, ok_code, None)


def get_admin_audit(daemon: DaemonDep, caller: AdminCallerDep) -> AdminAudit:
    return AdminAudit(daemon, caller)


AuditDep = Annotated[AdminAudit, Depends(get_admin_audit)]
