"""Teams: list yours, create (platform admin), read, quotas, members and their roles."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, HTTPException

from app.api.auth_guards import CallerDep
from app.api.deps import Admin, SessionDep, SettingsDep, Superuser, Viewer
from app.api.idempotency import idempotent
from app.models import (
    MemberPublic,
    MembersPublic,
    MemberUpdate,
    QuotaUpdate,
    Role,
    Team,
    TeamCreate,
    TeamPublic,
    TeamsPublic,
)
from app.services import teams as service
from app.services.principal import Principal

router = APIRouter(prefix="/teams", tags=["teams"])


@router.get("/", response_model=TeamsPublic)
def list_my_teams(session: SessionDep, settings: SettingsDep, caller: CallerDep) -> TeamsPublic:
    """The teams you belong to, with your role (with an API key: the key's team only)."""
    data = service.visible_teams(session=session, settings=settings, user_id=caller.user.id, key=caller.key)
    return TeamsPublic(data=data, count=len(data))


@router.post("/", response_model=TeamPublic, status_code=201)
@idempotent
def create_team(session: SessionDep, settings: SettingsDep, user: Superuser, body: TeamCreate) -> TeamPublic:
    """Create a team (platform admins); you become its admin."""
    team = service.create_team(session=session, user_id=user.id, name=body.name)
    return service.team_public(team=team, settings=settings, role=Role.admin)


@router.get("/{team_id}", response_model=TeamPublic)
def read_team(session: SessionDep, settings: SettingsDep, principal: Viewer, team_id: uuid.UUID) -> TeamPublic:
    """A team you belong to, with its effective quotas."""
    return service.team_public(team=_team(session, principal), settings=settings, role=principal.role)


@router.put("/{team_id}/quota", response_model=TeamPublic)
def set_quota(
    session: SessionDep, settings: SettingsDep, principal: Admin, team_id: uuid.UUID, body: QuotaUpdate
) -> TeamPublic:
    """Set the team's job quotas (null = platform default). Above the default needs a platform admin."""
    team = service.set_quota(session=session, settings=settings, actor=principal, body=body)
    return service.team_public(team=team, settings=settings, role=principal.role)


@router.get("/{team_id}/members", response_model=MembersPublic)
def list_members(session: SessionDep, principal: Viewer, team_id: uuid.UUID) -> MembersPublic:
    """Members and their roles."""
    members = service.list_members(session=session, team_id=principal.team_id)
    return MembersPublic(data=members, count=len(members))


@router.patch("/{team_id}/members/{user_id}", response_model=MemberPublic)
def change_role(
    session: SessionDep, principal: Admin, team_id: uuid.UUID, user_id: uuid.UUID, body: MemberUpdate
) -> MemberPublic:
    """Change a member's role (the last admin cannot be demoted)."""
    service.set_role(session=session, actor=principal, user_id=user_id, role=body.role)
    return next(m for m in service.list_members(session=session, team_id=principal.team_id) if m.user_id == user_id)


@router.delete("/{team_id}/members/{user_id}", status_code=204)
def remove_member(session: SessionDep, principal: Admin, team_id: uuid.UUID, user_id: uuid.UUID) -> None:
    """Remove a member; their API keys for this team stop working at once."""
    service.remove_member(session=session, actor=principal, user_id=user_id)


def _team(session: SessionDep, principal: Principal) -> Team:
    team = session.get(Team, principal.team_id)
    if team is None:
        raise HTTPException(404, f"team {principal.team_id} not found")
    return team
