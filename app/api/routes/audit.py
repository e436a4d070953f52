"""The team's audit log: who created, started, stopped, deployed, deleted and changed what."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import Admin, SessionDep
from app.models import AuditEventPublic, AuditEventsPublic
from app.services import audit as service

router = APIRouter(prefix="/teams/{team_id}/audit", tags=["audit"])


@router.get("/", response_model=AuditEventsPublic)
def list_audit_events(
    session: SessionDep, principal: Admin, team_id: uuid.UUID,
    action: Annotated[str | None, Query(max_length=64, description="e.g. experiment.create")] = None,
    skip: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditEventsPublic:  # fmt: skip
    """Newest first."""
    rows, count = service.list_events(session, principal.team_id, action=action, skip=skip, limit=limit)
    return AuditEventsPublic(data=[AuditEventPublic.model_validate(r) for r in rows], count=count)
