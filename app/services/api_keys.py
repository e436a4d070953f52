"""API keys: created for a team and a role (at most the creator's), shown once, stored as a hash,
revocable. A key acts with the smaller of its role and its owner's current role in the team, so
demoting or removing a member also narrows or kills their keys."""

from __future__ import annotations

import uuid

from sqlmodel import Session, col, select

from app.core.security import new_api_key, token_hash
from app.models import ApiKey, ApiKeyCreate, Membership, Role, User, utcnow
from app.services import audit
from app.services.crud import get_owned
from app.services.errors import Conflict, InvalidRequest, NotFound
from app.services.principal import Principal


def create_key(*, session: Session, actor: Principal, body: ApiKeyCreate) -> tuple[ApiKey, str]:
    if not actor.role.includes(body.role):
        raise InvalidRequest("role", f"cannot exceed your own role ({actor.role.value})", status_code=403)
    key, prefix, hashed = new_api_key()
    row = ApiKey(
        team_id=actor.team_id, user_id=actor.user_id, name=body.name, role=body.role, prefix=prefix, key_hash=hashed
    )
    session.add(row)
    session.flush()
    audit.record(
        session=session,
        actor=actor,
        action="api_key.create",
        target_type="api_key",
        target_id=row.id,
        name=body.name,
        role=body.role.value,
    )
    session.commit()
    session.refresh(row)
    return row, key


def list_keys(*, session: Session, actor: Principal) -> list[ApiKey]:
    """Admins see the team's keys; everyone else their own."""
    query = select(ApiKey).where(ApiKey.team_id == actor.team_id)
    if actor.role is not Role.admin:
        query = query.where(ApiKey.user_id == actor.user_id)
    return list(session.exec(query.order_by(col(ApiKey.created_at).desc())).all())


def revoke_key(*, session: Session, actor: Principal, key_id: uuid.UUID) -> ApiKey:
    row = get_owned(session=session, model=ApiKey, team_id=actor.team_id, id=key_id)
    if row is None or (actor.role is not Role.admin and row.user_id != actor.user_id):
        raise NotFound("key_id", f"API key {key_id} not found")
    if row.revoked_at is not None:
        raise Conflict("API key is already revoked")
    row.revoked_at = utcnow()
    session.add(row)
    audit.record(
        session=session, actor=actor, action="api_key.revoke", target_type="api_key", target_id=key_id, name=row.name
    )
    session.commit()
    session.refresh(row)
    return row


def resolve(*, session: Session, key: str) -> Principal | None:
    """The principal a presented key acts as, or None (unknown, revoked, owner gone or inactive)."""
    row = session.exec(select(ApiKey).where(ApiKey.key_hash == token_hash(key))).first()
    if row is None or row.revoked_at is not None:
        return None
    user = session.get(User, row.user_id)
    membership = session.get(Membership, (row.team_id, row.user_id))
    if user is None or not user.is_active or membership is None:
        return None
    role = row.role if membership.role.includes(row.role) else membership.role
    now = utcnow()
    if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:  # not a write per request
        row.last_used_at = now
        session.add(row)
        session.commit()
    return Principal(user.id, row.team_id, role, is_superuser=False, api_key_id=row.id)
