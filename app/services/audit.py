"""The audit log: one row per change, written in the caller's transaction so it commits with it."""

from __future__ import annotations

import uuid
from typing import Any

from sqlmodel import Session, col, select

from app.models import AuditEvent
from app.services.crud import paginate
from app.services.principal import Principal


def record(
    *, session: Session, actor: Principal, action: str, target_type: str, target_id: object, **data: Any
) -> None:
    """One row in the caller's transaction; ``data`` is stored as the row's JSON details."""
    event = AuditEvent(
        team_id=actor.team_id,
        actor_user_id=actor.user_id,
        actor_api_key_id=actor.api_key_id,
        action=action,
        target_type=target_type,
        target_id=str(target_id),
        data=data,
    )
    session.add(event)


def list_events(
    *, session: Session, team_id: uuid.UUID, action: str | None, skip: int, limit: int
) -> tuple[list[AuditEvent], int]:
    query = select(AuditEvent).where(AuditEvent.team_id == team_id)
    if action:
        query = query.where(AuditEvent.action == action)
    return paginate(session=session, query=query.order_by(col(AuditEvent.id).desc()), skip=skip, limit=limit)
