"""Request dependencies as ``Annotated`` aliases, so routes read like their signatures.

Authentication: ``Authorization: Bearer <token>`` where the token is a login JWT or an API key
(``fts_...``). The team is the path's ``{team_id}``, else the ``X-Team-Id`` header, else the user's
first team; an API key is bound to its own team. A team the caller is not in answers 404, the same
as one that does not exist, so ids of other teams reveal nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar
from weakref import WeakKeyDictionary

import anyio.to_thread
import sqlalchemy.exc
from fastapi import Depends, Header, HTTPException, Query, Request
from fastapi.security import OAuth2PasswordBearer
from sqlmodel import Session

from app.core.config import Settings, get_settings
from app.core.db import get_engine, pool_capacity
from app.core.security import API_KEY_PREFIX, InvalidToken, decode_access_token
from app.core.storage import Storage, get_storage
from app.models import Membership, Role, User
from app.services import accounts, api_keys
from app.services.crud import TeamOwned, get_owned
from app.services.principal import Principal

OwnedT = TypeVar("OwnedT", bound=TeamOwned)


class RequestSession(Session):
    """A route's session. Lazy: it checks a connection out at its first query, in the thread running the
    route. It holds one of the request slots (below) until it is closed: by the route before a long
    await (SSE, generation), else when the route function returns."""

    def __init__(self, release_slot: Callable[[], None]) -> None:
        super().__init__(get_engine())
        self._release_slot: Callable[[], None] | None = release_slot

    def close(self) -> None:
        try:
            super().close()
        finally:
            release, self._release_slot = self._release_slot, None
            if release is not None:
                release()


class RequestSlots:
    """Admits a few fewer route sessions at once than the pool has connections, and makes the rest wait
    here, on the event loop, before any of their threads start. Otherwise threads wait in the pool for
    connections held by requests that wait for a thread (FastAPI serialises a sync route's answer in
    another threadpool call), which stalled the API under load. The connections left over serve the
    short sessions that take no slot (authentication, SSE reads, the outbox relay), which always finish."""

    def __init__(self) -> None:
        self._semaphores: WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = WeakKeyDictionary()

    async def take(self) -> Callable[[], None]:
        """Wait for a slot (up to ``database.queue_timeout_s``, then 503); returns its release, callable
        from any thread."""
        loop = asyncio.get_running_loop()
        semaphore = self._semaphores.get(loop)
        if semaphore is None:
            capacity = pool_capacity(get_engine())
            if capacity is None:  # an unbounded pool: nothing to protect
                return lambda: None
            semaphore = self._semaphores[loop] = asyncio.Semaphore(max(1, capacity - max(2, capacity // 5)))
        timeout_s = get_settings().database.queue_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await semaphore.acquire()
        except TimeoutError:
            raise sqlalchemy.exc.TimeoutError(f"no database session free within {timeout_s} s") from None

        def release() -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing waits on it any more
                loop.call_soon_threadsafe(semaphore.release)

        return release


request_slots = RequestSlots()


async def get_session() -> AsyncIterator[Session]:
    """The route's session, closed when the route function returns (``scope="function"``): before the
    response is sent, and before an SSE stream starts, so no connection waits on a slow client."""
    session = RequestSession(await request_slots.take())
    try:
        yield session
    finally:
        await close_session(session)


async def close_session(session: Session) -> None:
    """Close on the event loop when no connection is held; else in a thread of its own (returning the
    connection rolls back: I/O), not one of the request threads, which may all be busy."""
    if session.in_transaction():
        await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
    else:
        session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]

# auto_error=False: a missing token is answered below with the same 401 shape as a bad one.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/auth/login", auto_error=False)
TokenDep = Annotated[str | None, Depends(oauth2_scheme)]


def unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def _authenticate(session: Session, settings: Settings, token: str | None) -> tuple[User, Principal | None]:
    """The calling user, and the key's principal when the token is an API key."""
    if not token:
        raise unauthorized("not authenticated: send Authorization: Bearer <token or API key>")
    if token.startswith(API_KEY_PREFIX):
        principal = api_keys.resolve(session=session, key=token)
        if principal is None:
            raise unauthorized("invalid or revoked API key")
        user = session.get(User, principal.user_id)
        assert user is not None
        return user, principal
    try:
        claims = decode_access_token(settings, token)
    except InvalidToken as exc:
        raise unauthorized(str(exc)) from None
    found = session.get(User, claims.user_id)
    if found is None or not found.is_active:
        raise unauthorized("user is unknown or disabled")
    changed = found.password_changed_at
    if changed is not None and claims.issued_at < changed.replace(microsecond=0):
        raise unauthorized("token issued before the password changed; log in again")
    return found, None


def _auth_session() -> Session:
    """Who is calling is resolved in a short session of its own, inside one threadpool call: its
    connection is back in the pool before the route runs. Loaded rows stay readable after it closes."""
    return Session(get_engine(), expire_on_commit=False)


def get_current_user(settings: SettingsDep, token: TokenDep) -> User:
    with _auth_session() as session:
        return _authenticate(session, settings, token)[0]


def get_principal(
    request: Request,
    settings: SettingsDep,
    token: TokenDep,
    x_team_id: Annotated[str | None, Header(description="Team to act in; default your first team")] = None,
) -> Principal:
    wanted = request.path_params.get("team_id") or x_team_id
    with _auth_session() as session:
        return _principal(session, settings, token, wanted)


def _principal(session: Session, settings: Settings, token: str | None, wanted: str | None) -> Principal:
    user, key_principal = _authenticate(session, settings, token)
    team_id = _parse_team(wanted) if wanted else None
    if key_principal is not None:
        if team_id is not None and team_id != key_principal.team_id:
            raise HTTPException(404, f"team {team_id} not found")
        return key_principal
    if team_id is not None:
        membership = session.get(Membership, (team_id, user.id))
        if membership is None:
            raise HTTPException(404, f"team {team_id} not found")
    else:
        teams = accounts.memberships(session=session, user_id=user.id)
        if not teams:
            raise HTTPException(403, "you are not a member of any team; ask an admin for an invitation")
        membership = teams[0]
    return Principal(user.id, membership.team_id, membership.role, is_superuser=user.is_superuser)


def _parse_team(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise HTTPException(404, f"team {value} not found") from None


def require(role: Role) -> Callable[[Principal], Awaitable[Principal]]:
    async def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:  # no I/O: no thread
        if not principal.role.includes(role):
            raise HTTPException(403, f"needs the {role.value} role in this team; you are {principal.role.value}")
        return principal

    return check


async def require_login(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    """For minting credentials (API keys, invitations): a leaked API key must not be able to create more."""
    if principal.api_key_id is not None:
        raise HTTPException(403, "needs a logged-in user (POST /api/auth/login), not an API key")
    return principal


def require_superuser(settings: SettingsDep, token: TokenDep) -> User:
    with _auth_session() as session:
        user, key_principal = _authenticate(session, settings, token)
    if key_principal is not None or not user.is_superuser:  # API keys never carry platform admin
        raise HTTPException(403, "needs a platform admin, logged in (not an API key)")
    return user


@dataclass(frozen=True)
class PageParams:
    """A list route's ``?skip=&limit=``."""

    skip: int
    limit: int


MAX_SKIP = 10_000_000  # past any real list; keeps OFFSET inside what the database accepts


async def page_params(
    skip: Annotated[int, Query(ge=0, le=MAX_SKIP)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> PageParams:
    return PageParams(skip=skip, limit=limit)


async def long_page_params(
    skip: Annotated[int, Query(ge=0, le=MAX_SKIP)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> PageParams:
    return PageParams(skip=skip, limit=limit)


def get_owned_or_404(*, session: Session, model: type[OwnedT], team_id: uuid.UUID, id: Any, what: str) -> OwnedT:
    """The team's row, or 404 "<what> <id> not found" (also for another team's row)."""
    row = get_owned(session=session, model=model, team_id=team_id, id=id)
    if row is None:
        raise HTTPException(404, f"{what} {id} not found")
    return row


CurrentUser = Annotated[User, Depends(get_current_user)]
Viewer = Annotated[Principal, Depends(require(Role.viewer))]
Trainer = Annotated[Principal, Depends(require(Role.trainer))]
Admin = Annotated[Principal, Depends(require(Role.admin))]
Superuser = Annotated[User, Depends(require_superuser)]
LoggedIn = Annotated[Principal, Depends(require_login)]
# ?skip=&limit= on list routes; LongPage allows pages of up to 1000 rows instead of 500.
Page = Annotated[PageParams, Depends(page_params)]
LongPage = Annotated[PageParams, Depends(long_page_params)]
