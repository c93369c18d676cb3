"""Dependencies as ``Annotated`` aliases: the service, the calling principal (from the API key) and its role.

A handler states who may call it in its signature: ``p: Generator`` (a tenant key whose role may
generate), ``p: Operator`` (the operator token), ``p: role(("admin",), "manage keys")`` and so on;
``PrincipalDep`` alone admits any valid key or the operator token."""
from __future__ import annotations

import datetime as dt
import hmac
import time
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from aigc.db import crud
from aigc.db.crud import Principal
from aigc.db.models import Organization, User, utcnow
from aigc.serve.errors import ApiError
from aigc.serve.registry import ModelEntry
from aigc.serve.service import Service

bearer = HTTPBearer(auto_error=False, description="An API key (sk-aigc-...) or, for /v1/admin, the operator token.")
OPERATOR = Principal(0, "operator", 0, "*", 0, "operator", None, 10**9, 10**12, None, False, None, operator=True)
KEY_CACHE_MAX = 100_000


async def get_service(request: Request) -> Service:
    # Dependencies are coroutines: FastAPI runs a plain function in a worker thread, a hop per request.
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def _lookup(service: Service, secret: str) -> Principal | None:
    with service.sessions() as s:
        return crud.lookup_key(s, secret)


SESSION_COOKIE = "aigc_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass
class ConsoleUser:
    """A signed-in browser: who it acts as, and the CSRF token its forms and calls must send back."""

    principal: Principal
    csrf: str
    who: str  # shown in the console's header


def _console_user(service: Service, token: str) -> ConsoleUser | None:
    idle = dt.timedelta(minutes=service.settings.console_idle_minutes)
    with service.sessions.begin() as s:
        row = crud.console_session(s, token, idle)
        if row is None:
            return None
        if row.org_id is None:
            return ConsoleUser(OPERATOR, row.csrf, "operator")
        if row.key_id is not None:
            p = crud.key_principal(s, row.key_id)
            if p is None or p.revoked or (p.expires_at is not None and p.expires_at <= utcnow()):
                s.delete(row)  # a session made from a key ends with the key
                return None
            return ConsoleUser(p, row.csrf, f"{p.key_prefix}… ({p.org_name})")
        user = s.get(User, row.user_id)
        return ConsoleUser(crud.user_principal(s, user), row.csrf, f"{user.email} ({s.get(Organization, user.org_id).name})")


async def console_user(request: Request, service: Service) -> ConsoleUser | None:
    """The browser session of the request's cookie, or None (checked once per request)."""
    if "console_user" in request.state._state:
        return request.state.console_user
    token = request.cookies.get(SESSION_COOKIE, "")
    cu = await anyio.to_thread.run_sync(_console_user, service, token) if 16 <= len(token) <= 128 else None
    request.state.console_user = cu
    return cu


async def get_principal(request: Request, service: ServiceDep,
                        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
    if (cred is None or not cred.credentials) and SESSION_COOKIE in request.cookies:
        # The console calls this API from the browser with its session cookie; every call that changes something
        # carries the session's CSRF token in a header (a page of another site can neither read it nor set it).
        cu = await console_user(request, service)
        if cu is None:
            raise ApiError(401, "the console session has expired: sign in again", code="session_expired")
        if request.method not in SAFE_METHODS and not hmac.compare_digest(request.headers.get(CSRF_HEADER, "").encode(),
                                                                           cu.csrf.encode()):
            raise ApiError(403, "missing or wrong CSRF token", code="csrf_failed")
        p = cu.principal
        request.state.key_prefix = p.key_prefix
        if not p.operator:
            request.state.org_id = p.org_id
        crud.ACTOR.set("operator" if p.operator else f"key:{p.key_prefix}" if p.key_id else f"console:{cu.who.split(' ')[0]}")
        return p
    if cred is None or not cred.credentials:
        raise ApiError(401, "missing API key: send it as 'Authorization: Bearer sk-aigc-...'", code="missing_api_key")
    secret = cred.credentials
    token = service.settings.admin_token
    if token and hmac.compare_digest(secret.encode(), token.encode()):
        request.state.key_prefix = "operator"
        crud.ACTOR.set("operator")
        return OPERATOR
    if not secret.startswith(crud.KEY_PREFIX) or len(secret) > 128:
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")
    h = crud.hash_key(secret)
    now = time.monotonic()
    hit = service.key_cache.get(h)
    if hit is None or hit[1] < now:
        p = await anyio.to_thread.run_sync(_lookup, service, secret)
        if len(service.key_cache) > KEY_CACHE_MAX:
            service.key_cache.clear()
        service.key_cache[h] = hit = (p, now + service.settings.key_cache_s)
    p = hit[0]
    if p is None:
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")
    if p.revoked:
        raise ApiError(401, "this API key has been revoked", code="key_revoked")
    if p.expires_at is not None and p.expires_at <= utcnow():
        raise ApiError(401, "this API key has expired", code="key_expired")
    request.state.key_prefix, request.state.org_id = p.key_prefix, p.org_id
    crud.ACTOR.set(f"key:{p.key_prefix}")  # admin changes made by this request are audited under this key
    return p


PrincipalDep = Annotated[Principal, Depends(get_principal)]

GENERATE = ("admin", "developer")
READ_USAGE = ("admin", "developer", "viewer")
ANY_ROLE = ("admin", "developer", "viewer", "reviewer")


def require(p: Principal, roles: tuple[str, ...], what: str) -> None:
    """403 unless ``p`` is a tenant key whose role is one of ``roles`` (``what`` names the action in the message)."""
    if p.operator:
        raise ApiError(403, "the operator token manages tenants (/v1/admin); use a tenant's API key here", code="wrong_credentials")
    if p.role not in roles:
        raise ApiError(403, f"the {p.role} role cannot {what} (needs {' or '.join(roles)})", code="insufficient_role")


def role(roles: tuple[str, ...], what: str):
    """The principal, as a dependency that admits only tenant keys with one of ``roles``."""
    async def check(p: PrincipalDep) -> Principal:
        require(p, roles, what)
        return p
    return Annotated[Principal, Depends(check)]


def role_or_operator(roles: tuple[str, ...], what: str):
    """The principal: the operator token, or a tenant key with one of ``roles``."""
    async def check(p: PrincipalDep) -> Principal:
        if not p.operator:
            require(p, roles, what)
        return p
    return Annotated[Principal, Depends(check)]


async def _operator(p: PrincipalDep) -> Principal:
    if not p.operator:
        raise ApiError(403, "operator endpoints need the operator token", code="operator_only")
    return p


Generator = role(GENERATE, "generate")
Operator = Annotated[Principal, Depends(_operator)]


def model_for(service: Service, p: Principal, model_id: str, kinds: tuple[str, ...]) -> ModelEntry:
    entry = service.registry.entries.get(model_id)
    if entry is None or not entry.visible_to(None if p.operator else p.org_id):
        raise ApiError(404, f"the model {model_id!r} does not exist", code="model_not_found", param="model")
    if p.allowed_models is not None and model_id not in p.allowed_models:
        raise ApiError(403, f"this API key may not use the model {model_id!r}", code="model_not_allowed", param="model")
    if entry.kind not in kinds:
        raise ApiError(400, f"the model {model_id!r} is a {entry.kind} model; this endpoint needs a {' or '.join(kinds)} model",
                       code="wrong_model_kind", param="model")
    return entry
