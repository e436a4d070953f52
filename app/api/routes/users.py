"""The caller's own account: profile, teams, password change."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CurrentUser, SessionDep, SettingsDep
from app.models import UserMe, UserUpdateMe
from app.services import accounts
from app.services.teams import user_teams

router = APIRouter(prefix="/users", tags=["users"])


@router.get("/me", response_model=UserMe)
def read_me(session: SessionDep, settings: SettingsDep, user: CurrentUser) -> UserMe:
    """Who you are, and your teams with your role in each."""
    return _me(session, settings, user)


@router.patch("/me", response_model=UserMe)
def update_me(session: SessionDep, settings: SettingsDep, user: CurrentUser, body: UserUpdateMe) -> UserMe:
    """Change your name, or your password (send `current_password` with `new_password`)."""
    return _me(session, settings, accounts.update_me(session=session, user=user, body=body))


def _me(session: SessionDep, settings: SettingsDep, user: CurrentUser) -> UserMe:
    teams = user_teams(session=session, settings=settings, user_id=user.id)
    return UserMe(**user.model_dump(exclude={"hashed_password"}), teams=teams)
