"""``Idempotency-Key`` on creating POSTs, with Stripe's semantics. A route opts in with one decorator::

    @router.post("/", response_model=ExperimentPublic, status_code=201)
    @idempotent
    def create_experiment(...): ...

A request without the header runs as if the decorator were not there. With ``Idempotency-Key: <1..255
printable ASCII characters>``:

- **Scope**: the caller, as the route's own dependencies resolved it: (user, team). An API key and a
  login of the same user in the same team share the scope (the key acts as that user, so a client that
  retries with a fresh credential still finds its first answer); two users never share keys, and a
  route outside any team (creating a team) is scoped to the user alone. The route's authentication and
  role checks run before any of this, so a replay never reaches a caller the route would refuse.
- **Same key, same request** (SHA-256 of method, path, query and the canonical body: JSON re-serialised
  with sorted keys; for multipart uploads the form fields and each file's name and bytes as the route
  sees them) → the first answer again: its status code and body, plus ``Idempotent-Replayed: true``.
- **Same key, different request** → 422 naming ``Idempotency-Key``.
- **Concurrent duplicates** → one runs. Each request first inserts an ``idempotency_key`` row ("started")
  under a unique key hash; the loser polls the row with short sessions (no connection held while it
  sleeps, and the route's own session is released first) for up to ``WAIT_S`` and replays the winner's
  answer, or answers 409 if the winner is still running then.
- **Failures**: a 4xx raised by the route is stored and replayed like a success (except 429, which is
  "try later"); a 5xx or an unhandled error deletes the row, so a retry runs again. A request refused
  before the route ran (401/403 from authentication, 422 from body validation) stores nothing.
- **Expiry**: rows live ``api.idempotency_ttl_s`` (default 24 h). An expired row met on insert is deleted
  and the request runs anew; a "started" row older than ``STARTED_LEASE_S`` is taken to belong to a dead
  process and is taken over; every ``PURGE_EVERY_S`` a process deletes all expired rows.
- **At rest**: the table holds a SHA-256 of (scope, key), and the answer encrypted with AES-256-GCM under a
  key derived from (scope, key), so an API key or invitation token in a stored answer is not readable from
  the table alone. Clients should send random keys (a UUID4).

Not covered: the window between the route's commit and the answer being recorded. A process that dies
there leaves a "started" row; retries get 409 until the lease passes, then run again.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Annotated, Any, TypeVar, cast

import anyio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fastapi import Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select, update
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from app.core.config import get_settings
from app.core.db import session_scope
from app.models import IdempotencyKey, User, utcnow
from app.services.errors import Conflict, InvalidRequest
from app.services.principal import Principal

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
WAIT_S = 10.0  # how long a concurrent duplicate waits for the first request's answer
STARTED_LEASE_S = 600.0  # a "started" row this old belongs to a process that died mid-request
PURGE_EVERY_S = 300.0
_NONCE_BYTES = 12  # the size AES-GCM is built for
_CHUNK = 1 << 20

KeyHeader = Annotated[
    str | None,
    Header(
        alias=HEADER,
        min_length=1,
        max_length=255,
        pattern=r"^[\x20-\x7e]+$",
        description="Send the same key to retry safely: the first answer is replayed (for api.idempotency_ttl_s)",
    ),
]
EndpointT = TypeVar("EndpointT", bound=Callable[..., Any])
_REQUEST_ARG = "idempotency_request_"
_KEY_ARG = "idempotency_key_"


@dataclass(frozen=True)
class _Identity:
    """One request as this module sees it: whose key, which key, which request."""

    user_id: Any
    team_id: Any
    key_hash: str
    seal_key: bytes
    request_hash: str
    method: str
    path: str


@dataclass(frozen=True)
class _Stored:
    status_code: int
    content_type: str | None
    body: bytes


class _Verdict(Enum):
    busy = "busy"  # the first request is still running
    mismatch = "mismatch"  # the key was used for a different request


_Outcome = int | _Stored | _Verdict  # int: the row is ours (its id)


def idempotent(endpoint: EndpointT) -> EndpointT:
    """Make a creating route honour ``Idempotency-Key`` (see the module docstring)."""
    signature = inspect.signature(endpoint, eval_str=True)
    extra = [
        inspect.Parameter(_REQUEST_ARG, inspect.Parameter.KEYWORD_ONLY, annotation=Request),
        inspect.Parameter(_KEY_ARG, inspect.Parameter.KEYWORD_ONLY, annotation=KeyHeader, default=None),
    ]
    params = list(signature.parameters.values())
    assert not {p.name for p in params} & {_REQUEST_ARG, _KEY_ARG}

    @functools.wraps(endpoint)
    async def wrapper(**kwargs: Any) -> Any:
        request: Request = kwargs.pop(_REQUEST_ARG)
        key: str | None = kwargs.pop(_KEY_ARG, None)
        if key is None:
            return await _call(endpoint, kwargs)
        identity = await _identify(request, key, kwargs)
        for session in (v for v in kwargs.values() if isinstance(v, Session)):
            await run_in_threadpool(session.rollback)  # give its connection back while we claim (and wait)
        outcome = await _claim_or_wait(identity)
        if isinstance(outcome, _Stored):
            return _replay(outcome)
        if outcome is _Verdict.mismatch:
            raise InvalidRequest(HEADER, f"this {HEADER} was already used for a different request; use a new key")
        if outcome is _Verdict.busy:
            raise Conflict(f"a request with this {HEADER} is still running; retry later", field=HEADER)
        with anyio.CancelScope(shield=True):  # once the route runs, its answer is recorded even if the client left
            return await _run_and_record(endpoint, kwargs, request, identity, cast(int, outcome))

    wrapper.__signature__ = signature.replace(parameters=[*params, *extra])  # type: ignore[attr-defined]
    return cast(EndpointT, wrapper)


async def _call(endpoint: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(endpoint):
        return await endpoint(**kwargs)
    return await run_in_threadpool(functools.partial(endpoint, **kwargs))


# ---------------------------------------------------------------- who, which key, which request


async def _identify(request: Request, key: str, kwargs: Mapping[str, Any]) -> _Identity:
    principal = next((v for v in kwargs.values() if isinstance(v, Principal)), None)
    if principal is not None:
        user_id, team_id = principal.user_id, principal.team_id
    else:
        user = next((v for v in kwargs.values() if isinstance(v, User)), None)
        if user is None:
            raise RuntimeError(f"@idempotent route {request.url.path} has no Principal or User parameter")
        user_id, team_id = user.id, None
    scope = f"{user_id}/{team_id or '-'}\0{key}".encode()
    digest = hashlib.sha256()
    for part in (request.method, request.url.path, json.dumps(sorted(request.query_params.multi_items()))):
        digest.update(part.encode() + b"\0")
    digest.update(await _body_digest(request))
    return _Identity(
        user_id=user_id,
        team_id=team_id,
        key_hash=hashlib.sha256(b"studio idempotency key\0" + scope).hexdigest(),
        seal_key=hashlib.sha256(b"studio idempotency seal\0" + scope).digest(),
        request_hash=digest.hexdigest(),
        method=request.method,
        path=request.url.path[:500],
    )


async def _body_digest(request: Request) -> bytes:
    """The body as the route sees it: FastAPI has already read (and cached) it on the request."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        fields: list[list[str]] = []
        for name, value in (await request.form()).multi_items():
            if isinstance(value, UploadFile):
                fields.append([name, "file", value.filename or "", await run_in_threadpool(_file_digest, value)])
            else:
                fields.append([name, "field", value])
        return hashlib.sha256(json.dumps(sorted(fields)).encode()).digest()
    body = await request.body()
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode() if body else b""
    except ValueError:
        canonical = body
    return hashlib.sha256(canonical).digest()


def _file_digest(upload: UploadFile) -> str:
    digest = hashlib.sha256()
    position = upload.file.tell()
    upload.file.seek(0)
    while chunk := upload.file.read(_CHUNK):
        digest.update(chunk)
    upload.file.seek(position)  # the route reads it next
    return digest.hexdigest()


# ---------------------------------------------------------------- the row


async def _claim_or_wait(identity: _Identity) -> _Outcome:
    """Our row's id, the stored answer, or a verdict; polls (bounded) while the first request runs."""
    ttl_s = get_settings().api.idempotency_ttl_s
    deadline = time.monotonic() + WAIT_S
    delay = 0.02
    while True:
        outcome = await run_in_threadpool(_claim, identity, ttl_s)
        if outcome is not _Verdict.busy or time.monotonic() >= deadline:
            return outcome
        await anyio.sleep(min(delay, max(deadline - time.monotonic(), 0)))
        delay = min(delay * 2, 0.25)


def _claim(identity: _Identity, ttl_s: float) -> _Outcome:
    _purge_now_and_then(ttl_s)
    with session_scope() as session:
        for _ in range(3):
            now = utcnow()
            row = session.exec(select(IdempotencyKey).where(IdempotencyKey.key_hash == identity.key_hash)).first()
            if row is not None and _stale(row, now, ttl_s):
                # id and created_at: SQLite may hand a deleted row's id to the next insert
                stale = (col(IdempotencyKey.id) == row.id) & (col(IdempotencyKey.created_at) == row.created_at)
                session.exec(delete(IdempotencyKey).where(stale))
                session.commit()
                row = None
            if row is not None:
                if row.request_hash != identity.request_hash:
                    return _Verdict.mismatch
                if row.status_code is None or row.response is None:
                    return _Verdict.busy
                return _Stored(row.status_code, row.content_type, _unseal(identity, row.response))
            mine = IdempotencyKey(
                key_hash=identity.key_hash,
                user_id=identity.user_id,
                team_id=identity.team_id,
                request_hash=identity.request_hash,
                method=identity.method,
                path=identity.path,
                created_at=now,
            )
            session.add(mine)
            try:
                session.commit()
            except IntegrityError:  # a concurrent duplicate inserted first: look at its row
                session.rollback()
                continue
            assert mine.id is not None
            return mine.id
    return _Verdict.busy


def _stale(row: IdempotencyKey, now: Any, ttl_s: float) -> bool:
    age = (now - row.created_at).total_seconds()
    return age >= ttl_s or (row.status_code is None and age >= STARTED_LEASE_S)


def _complete(identity: _Identity, row_id: int, stored: _Stored) -> None:
    with session_scope() as session:
        session.exec(
            update(IdempotencyKey)
            .where(col(IdempotencyKey.id) == row_id)
            .values(
                status_code=stored.status_code,
                content_type=stored.content_type,
                response=_seal(identity, stored.body),
                completed_at=utcnow(),
            )
        )
        session.commit()


def _release(row_id: int) -> None:
    """Forget a key whose request failed with a 5xx (or 429), so a retry runs again."""
    with session_scope() as session:
        session.exec(
            delete(IdempotencyKey).where(col(IdempotencyKey.id) == row_id, col(IdempotencyKey.status_code).is_(None))
        )
        session.commit()


_purge_lock = threading.Lock()
_next_purge = 0.0


def _purge_now_and_then(ttl_s: float) -> None:
    global _next_purge
    with _purge_lock:
        if time.monotonic() < _next_purge:
            return
        _next_purge = time.monotonic() + PURGE_EVERY_S
    try:
        with session_scope() as session:
            purge_expired(session=session, ttl_s=ttl_s)
    except Exception:  # housekeeping must never fail a request
        log.warning("could not purge expired idempotency keys", exc_info=True)


def purge_expired(*, session: Session, ttl_s: float) -> None:
    """Delete every row older than the TTL (also done lazily, row by row, when a key is reused)."""
    cutoff = utcnow() - timedelta(seconds=ttl_s)
    session.exec(delete(IdempotencyKey).where(col(IdempotencyKey.created_at) < cutoff))
    session.commit()


# ---------------------------------------------------------------- running the route, recording its answer


async def _run_and_record(
    endpoint: Callable[..., Any], kwargs: dict[str, Any], request: Request, identity: _Identity, row_id: int
) -> Any:
    try:
        result = await _call(endpoint, kwargs)
    except Exception as exc:
        rendered = await _render_error(request, exc)
        if rendered is not None and 400 <= rendered.status_code < 500 and rendered.status_code != 429:
            await _record(identity, row_id, rendered)
        else:
            await run_in_threadpool(_release, row_id)
        raise  # the app's handler answers it, the same bytes as stored
    except BaseException:
        await run_in_threadpool(_release, row_id)
        raise
    response = result if isinstance(result, Response) else _render(request, result)
    await _record(identity, row_id, response)
    return response


async def _record(identity: _Identity, row_id: int, response: Response) -> None:
    stored = _Stored(response.status_code, response.headers.get("content-type"), bytes(response.body))
    try:
        await run_in_threadpool(_complete, identity, row_id, stored)
    except Exception:  # the resource exists: answer it; retries see 409 until the lease passes
        log.warning("could not record the answer for an idempotency key", exc_info=True)


def _render(request: Request, result: Any) -> Response:
    """What FastAPI would answer: the route's status code and its response model as JSON."""
    route = request.scope.get("route")
    return JSONResponse(jsonable_encoder(result), status_code=getattr(route, "status_code", None) or 200)


async def _render_error(request: Request, exc: Exception) -> Response | None:
    """The app's answer to ``exc`` (its exception handler's), or None when nothing handles it (a 500)."""
    handlers: dict[Any, Callable[..., Any]] = request.app.exception_handlers
    handler = handlers.get(exc.status_code) if isinstance(exc, HTTPException) else None
    if handler is None:
        handler = next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)
    if handler is None:
        return None
    if inspect.iscoroutinefunction(handler):
        response = await handler(request, exc)
    else:
        response = await run_in_threadpool(handler, request, exc)
    return cast(Response, response)


def _replay(stored: _Stored) -> Response:
    return Response(
        content=stored.body,
        status_code=stored.status_code,
        media_type=stored.content_type,
        headers={REPLAYED_HEADER: "true"},
    )


# ---------------------------------------------------------------- the stored answer, sealed


def _seal(identity: _Identity, body: bytes) -> bytes:
    """AES-256-GCM under a key only the client's Idempotency-Key derives: a replayed answer may hold a
    secret (a new API key, an invitation token), and the database must not hold it readable."""
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return nonce + AESGCM(identity.seal_key).encrypt(nonce, body, identity.key_hash.encode())


def _unseal(identity: _Identity, sealed: bytes) -> bytes:
    return AESGCM(identity.seal_key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], identity.key_hash.encode())
