"""The caller's own account: profile, teams, password change."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.auth_guards import AccountOwner, Caller, CallerDep
from app.api.deps import SessionDep, SettingsDep
from app.models import User, UserMe, UserUpdateMe
from app.services import accounts
from app.services.teams import visible_teams

router = APIRouter(prefix="/users", tags=["users"])


@router.get("/me", response_model=UserMe)
def read_me(session: SessionDep, settings: SettingsDep, caller: CallerDep) -> UserMe:
    """Who you are, and your teams with your role in each (with an API key: the key's team only)."""
    return _me(session, settings, caller.user, caller)


@router.patch("/me", response_model=UserMe)
def update_me(session: SessionDep, settings: SettingsDep, user: AccountOwner, body: UserUpdateMe) -> UserMe:
    """Change your name, or your password (send `current_password` with `new_password`; the password policy
    applies). Needs a login token: API keys cannot change the account."""
    return _me(session, settings, accounts.update_me(session=session, user=user, body=body), Caller(user, None))


def _me(session: SessionDep, settings: SettingsDep, user: User, caller: Caller) -> UserMe:
    teams = visible_teams(session=session, settings=settings, user_id=user.id, key=caller.key)
    return UserMe(**user.model_dump(exclude={"hashed_password"}), teams=teams)
