"""Request dependencies as ``Annotated`` aliases, so routes read like their signatures.

Authentication: ``Authorization: Bearer <token>`` where the token is a login JWT or an API key
(``fts_...``). The team is the path's ``{team_id}``, else the ``X-Team-Id`` header, else the user's
first team; an API key is bound to its own team. A team the caller is not in answers 404, the same
as one that does not exist, so ids of other teams reveal nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Header, HTTPException, Query, Request
from fastapi.security import OAuth2PasswordBearer
from sqlmodel import Session

from app.core.config import Settings, get_settings
from app.core.db import get_engine
from app.core.security import API_KEY_PREFIX, InvalidToken, decode_access_token
from app.core.storage import Storage, get_storage
from app.models import Membership, Role, User
from app.services import accounts, api_keys
from app.services.crud import TeamOwned, get_owned
from app.services.principal import Principal

OwnedT = TypeVar("OwnedT", bound=TeamOwned)


def get_session() -> Iterator[Session]:
    with Session(get_engine()) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
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


def get_current_user(session: SessionDep, settings: SettingsDep, token: TokenDep) -> User:
    return _authenticate(session, settings, token)[0]


def get_principal(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    token: TokenDep,
    x_team_id: Annotated[str | None, Header(description="Team to act in; default your first team")] = None,
) -> Principal:
    user, key_principal = _authenticate(session, settings, token)
    wanted = request.path_params.get("team_id") or x_team_id
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


def require(role: Role) -> Callable[[Principal], Principal]:
    def check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not principal.role.includes(role):
            raise HTTPException(403, f"needs the {role.value} role in this team; you are {principal.role.value}")
        return principal

    return check


def require_login(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    """For minting credentials (API keys, invitations): a leaked API key must not be able to create more."""
    if principal.api_key_id is not None:
        raise HTTPException(403, "needs a logged-in user (POST /api/auth/login), not an API key")
    return principal


def require_superuser(session: SessionDep, settings: SettingsDep, token: TokenDep) -> User:
    user, key_principal = _authenticate(session, settings, token)
    if key_principal is not None or not user.is_superuser:  # API keys never carry platform admin
        raise HTTPException(403, "needs a platform admin, logged in (not an API key)")
    return user


@dataclass(frozen=True)
class PageParams:
    """A list route's ``?skip=&limit=``."""

    skip: int
    limit: int


def page_params(skip: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 100) -> PageParams:
    return PageParams(skip=skip, limit=limit)


def long_page_params(
    skip: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 100
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
