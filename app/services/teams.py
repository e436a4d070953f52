"""Teams, members, invitations and quotas. Every function takes the team explicitly; callers pass
the principal's team, so nothing here can reach another team's rows."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlmodel import Session, col, func, select

from app.core.config import Settings
from app.core.db import is_postgres
from app.core.security import new_one_time_token, token_hash
from app.models import (
    Experiment,
    ExperimentStatus,
    Invitation,
    InvitationAccept,
    InvitationCreate,
    MemberPublic,
    Membership,
    QuotaUpdate,
    Role,
    Team,
    TeamPublic,
    User,
    utcnow,
)
from app.services import audit
from app.services.accounts import create_user, get_by_email, memberships, normalize_email
from app.services.crud import get_owned
from app.services.errors import Conflict, InvalidRequest, NotFound
from app.services.principal import Principal


def team_public(*, team: Team, settings: Settings, role: Role | None) -> TeamPublic:
    limits = quota_limits(team=team, settings=settings)
    return TeamPublic(id=team.id, name=team.name, role=role, created_at=team.created_at, **limits)


def user_teams(*, session: Session, settings: Settings, user_id: uuid.UUID) -> list[TeamPublic]:
    """The teams a user belongs to, with the user's role in each, oldest membership first."""
    teams = []
    for membership in memberships(session=session, user_id=user_id):
        team = session.get(Team, membership.team_id)
        assert team is not None
        teams.append(team_public(team=team, settings=settings, role=membership.role))
    return teams


def visible_teams(
    *, session: Session, settings: Settings, user_id: uuid.UUID, key: Principal | None
) -> list[TeamPublic]:
    """The teams a caller sees: all of the user's for a login; for an API key, the key's team only, with
    the key's effective role (an API key is bound to its team, also on routes outside any team)."""
    if key is None:
        return user_teams(session=session, settings=settings, user_id=user_id)
    team = session.get(Team, key.team_id)
    return [] if team is None else [team_public(team=team, settings=settings, role=key.role)]


def create_team(*, session: Session, user_id: uuid.UUID, name: str) -> Team:
    if session.exec(select(Team).where(Team.name == name)).first():
        raise Conflict(f"a team named {name!r} already exists", field="name")
    team = Team(name=name)
    session.add(team)
    session.flush()
    session.add(Membership(team_id=team.id, user_id=user_id, role=Role.admin))
    audit.record(
        session=session,
        actor=Principal(user_id, team.id, Role.admin),
        action="team.create",
        target_type="team",
        target_id=team.id,
        name=name,
    )
    session.commit()
    session.refresh(team)
    return team


# ---------------------------------------------------------------- members


def list_members(*, session: Session, team_id: uuid.UUID) -> list[MemberPublic]:
    rows = session.exec(
        select(Membership, User)
        .join(User, col(User.id) == col(Membership.user_id))
        .where(Membership.team_id == team_id)
        .order_by(col(Membership.created_at))
    ).all()
    return [
        MemberPublic(user_id=u.id, email=u.email, full_name=u.full_name, role=m.role, created_at=m.created_at)
        for m, u in rows
    ]


def _membership(session: Session, team_id: uuid.UUID, user_id: uuid.UUID) -> Membership:
    membership = session.get(Membership, (team_id, user_id))
    if membership is None:
        raise NotFound("user_id", f"user {user_id} is not a member of this team")
    return membership


def _guard_last_admin(session: Session, membership: Membership) -> None:
    if membership.role is not Role.admin:
        return
    admins = session.exec(
        select(func.count())
        .select_from(Membership)
        .where(Membership.team_id == membership.team_id, Membership.role == Role.admin)
    ).one()
    if admins <= 1:
        raise Conflict("the team's last admin cannot be removed or demoted", field="user_id")


def set_role(*, session: Session, actor: Principal, user_id: uuid.UUID, role: Role) -> Membership:
    membership = _membership(session, actor.team_id, user_id)
    if role is not Role.admin:
        _guard_last_admin(session, membership)
    before = membership.role
    membership.role = role
    session.add(membership)
    audit.record(
        session=session,
        actor=actor,
        action="member.role",
        target_type="user",
        target_id=user_id,
        before=before.value,
        after=role.value,
    )
    session.commit()
    session.refresh(membership)
    return membership


def remove_member(*, session: Session, actor: Principal, user_id: uuid.UUID) -> None:
    membership = _membership(session, actor.team_id, user_id)
    _guard_last_admin(session, membership)
    session.delete(membership)
    audit.record(session=session, actor=actor, action="member.remove", target_type="user", target_id=user_id)
    session.commit()


# ---------------------------------------------------------------- invitations


def invite(*, session: Session, settings: Settings, actor: Principal, body: InvitationCreate) -> tuple[Invitation, str]:
    email = normalize_email(body.email)
    existing = get_by_email(session=session, email=email)
    if existing and session.get(Membership, (actor.team_id, existing.id)):
        raise Conflict(f"{email} is already a member of this team", field="email")
    token, hashed = new_one_time_token()
    invitation = Invitation(
        team_id=actor.team_id,
        email=email,
        role=body.role,
        token_hash=hashed,
        invited_by=actor.user_id,
        expires_at=utcnow() + timedelta(seconds=settings.auth.invitation_ttl_s),
    )
    session.add(invitation)
    session.flush()
    audit.record(
        session=session,
        actor=actor,
        action="member.invite",
        target_type="invitation",
        target_id=invitation.id,
        email=email,
        role=body.role.value,
    )
    session.commit()
    session.refresh(invitation)
    return invitation, token


def list_invitations(*, session: Session, team_id: uuid.UUID) -> list[Invitation]:
    query = select(Invitation).where(Invitation.team_id == team_id).order_by(col(Invitation.created_at).desc())
    return list(session.exec(query).all())


def revoke_invitation(*, session: Session, actor: Principal, invitation_id: uuid.UUID) -> None:
    invitation = get_owned(session=session, model=Invitation, team_id=actor.team_id, id=invitation_id)
    if invitation is None:
        raise NotFound("invitation_id", f"invitation {invitation_id} not found")
    session.delete(invitation)
    audit.record(
        session=session,
        actor=actor,
        action="invitation.revoke",
        target_type="invitation",
        target_id=invitation_id,
        email=invitation.email,
    )
    session.commit()


def accept_invitation(*, session: Session, body: InvitationAccept) -> tuple[User, Membership]:
    """The token is the credential: whoever holds it joins (a new account needs a password)."""
    query = select(Invitation).where(Invitation.token_hash == token_hash(body.token))
    invitation = session.exec(query.with_for_update() if is_postgres(session) else query).first()
    if invitation is None or invitation.accepted_at is not None or invitation.expires_at < utcnow():
        raise InvalidRequest("token", "invitation is unknown, used or expired", status_code=400)
    user = get_by_email(session=session, email=invitation.email)
    if user is None:
        if not body.password:
            raise InvalidRequest("password", "required to create the invited account")
        user = create_user(session=session, email=invitation.email, password=body.password, full_name=body.full_name)
    membership = session.get(Membership, (invitation.team_id, user.id))
    if membership is None:
        membership = Membership(team_id=invitation.team_id, user_id=user.id, role=invitation.role)
        session.add(membership)
    invitation.accepted_at = utcnow()
    session.add(invitation)
    actor = Principal(user.id, invitation.team_id, invitation.role)
    audit.record(
        session=session,
        actor=actor,
        action="member.join",
        target_type="user",
        target_id=user.id,
        invitation_id=str(invitation.id),
    )
    session.commit()
    session.refresh(user)
    session.refresh(membership)
    return user, membership


# ---------------------------------------------------------------- quotas


QUOTAS = ("max_active_jobs", "max_queued_jobs", "max_inflight_requests")


def quota_limits(*, team: Team, settings: Settings) -> dict[str, int]:
    """The team's own limits where set, else the platform defaults (settings.quotas)."""
    own = {name: getattr(team, name) for name in QUOTAS}
    return {name: value if value is not None else getattr(settings.quotas, name) for name, value in own.items()}


def set_quota(*, session: Session, settings: Settings, actor: Principal, body: QuotaUpdate) -> Team:
    """Team admins may lower their quota (a budget); raising it above the platform default needs a
    platform admin, or a team could give itself the whole fleet."""
    for field in QUOTAS:
        value, ceiling = getattr(body, field), getattr(settings.quotas, field)
        if value is not None and value > ceiling and not actor.is_superuser:
            raise InvalidRequest(field, f"above the platform default {ceiling} needs a platform admin", 403)
    team = session.get(Team, actor.team_id)
    assert team is not None
    for field in QUOTAS:  # PUT: every limit is replaced; null means the platform default
        setattr(team, field, getattr(body, field))
    session.add(team)
    audit.record(
        session=session, actor=actor, action="quota.update", target_type="team", target_id=team.id, **body.model_dump()
    )
    session.commit()
    session.refresh(team)
    return team


def check_quota(*, session: Session, settings: Settings, team_id: uuid.UUID) -> None:
    """Before queueing a job: 429 when the team is at its quota. Locks the team row on Postgres so two
    concurrent submits cannot both take the last slot (the lock lasts until the caller commits)."""
    query = select(Team).where(Team.id == team_id)
    team = session.exec(query.with_for_update() if is_postgres(session) else query).one()
    limits = quota_limits(team=team, settings=settings)
    max_active, max_queued = limits["max_active_jobs"], limits["max_queued_jobs"]
    counts = dict(
        session.exec(  # type: ignore[arg-type]
            select(Experiment.status, func.count())
            .where(
                Experiment.team_id == team_id,
                col(Experiment.status).in_([ExperimentStatus.queued, ExperimentStatus.running]),
            )
            .group_by(Experiment.status)
        ).all()
    )
    queued = counts.get(ExperimentStatus.queued, 0)
    active = queued + counts.get(ExperimentStatus.running, 0)
    if queued >= max_queued:
        raise InvalidRequest("quota", f"team has {queued} experiments queued; its quota is {max_queued}", 429)
    if active >= max_active:
        raise InvalidRequest(
            "quota", f"team has {active} experiments queued or running; its quota is {max_active}", 429
        )
