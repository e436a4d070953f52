"""The audit log: one row per change, written in the caller's transaction so it commits with it."""

from __future__ import annotations

import uuid
from typing import Any

from sqlmodel import Session, col, func, select

from app.models import AuditEvent
from app.services.principal import Principal


def record(session: Session, actor: Principal, action: str, target_type: str, target_id: object,
           **data: Any) -> None:  # fmt: skip
    session.add(AuditEvent(
        team_id=actor.team_id, actor_user_id=actor.user_id, actor_api_key_id=actor.api_key_id,
        action=action, target_type=target_type, target_id=str(target_id), data=data,
    ))  # fmt: skip


def list_events(
    session: Session, team_id: uuid.UUID, *, action: str | None, skip: int, limit: int
) -> tuple[list[AuditEvent], int]:
    where = [col(AuditEvent.team_id) == team_id]
    if action:
        where.append(col(AuditEvent.action) == action)
    count = session.exec(select(func.count()).select_from(AuditEvent).where(*where)).one()
    rows = session.exec(
        select(AuditEvent).where(*where).order_by(col(AuditEvent.id).desc()).offset(skip).limit(limit)
    ).all()
    return list(rows), count
