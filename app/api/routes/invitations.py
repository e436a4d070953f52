"""Invitations: admins invite by email with a role; the invitee accepts with the one-time token."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from app.api.auth_guards import no_store
from app.api.deps import Admin, LoggedIn, SessionDep, SettingsDep
from app.api.idempotency import idempotent
from app.models import (
    InvitationAccept,
    InvitationCreate,
    InvitationCreated,
    InvitationPublic,
    InvitationsPublic,
    MemberPublic,
)
from app.services import teams as service

router = APIRouter(tags=["invitations"])


@router.post("/teams/{team_id}/invitations", response_model=InvitationCreated, status_code=201)
@no_store
@idempotent
def invite(
    session: SessionDep,
    settings: SettingsDep,
    principal: Admin,
    _: LoggedIn,
    team_id: uuid.UUID,
    body: InvitationCreate,
) -> InvitationCreated:
    """Invite someone; the answer carries the token (shown once) to send them. Needs a login token."""
    invitation, token = service.invite(session=session, settings=settings, actor=principal, body=body)
    return InvitationCreated(**InvitationPublic.model_validate(invitation).model_dump(), token=token)


@router.get("/teams/{team_id}/invitations", response_model=InvitationsPublic)
def list_invitations(session: SessionDep, principal: Admin, team_id: uuid.UUID) -> InvitationsPublic:
    """Pending and accepted invitations."""
    rows = service.list_invitations(session=session, team_id=principal.team_id)
    return InvitationsPublic(data=[InvitationPublic.model_validate(r) for r in rows], count=len(rows))


@router.delete("/teams/{team_id}/invitations/{invitation_id}", status_code=204)
def revoke_invitation(session: SessionDep, principal: Admin, team_id: uuid.UUID, invitation_id: uuid.UUID) -> None:
    """Withdraw an invitation."""
    service.revoke_invitation(session=session, actor=principal, invitation_id=invitation_id)


@router.post("/invitations/accept", response_model=MemberPublic)
@no_store  # the request carried the token and maybe a password: nothing of it is kept
def accept(session: SessionDep, body: InvitationAccept) -> MemberPublic:
    """Join a team with an invitation token (the token is the credential; new users set a password, which
    the password policy checks)."""
    user, membership = service.accept_invitation(session=session, body=body)
    return MemberPublic(
        user_id=user.id,
        email=user.email,
        full_name=user.full_name,
        role=membership.role,
        created_at=membership.created_at,
    )
