"""The team's audit log: who created, started, stopped, deployed, deleted and changed what."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import Admin, LongPage, SessionDep
from app.models import AuditEventPublic, AuditEventsPublic
from app.services import audit as service

router = APIRouter(prefix="/teams/{team_id}/audit", tags=["audit"])


@router.get("/", response_model=AuditEventsPublic)
def list_audit_events(
    session: SessionDep,
    principal: Admin,
    team_id: uuid.UUID,
    page: LongPage,
    action: Annotated[str | None, Query(max_length=64, description="e.g. experiment.create")] = None,
) -> AuditEventsPublic:
    """Newest first."""
    rows, count = service.list_events(
        session=session, team_id=principal.team_id, action=action, skip=page.skip, limit=page.limit
    )
    return AuditEventsPublic(data=[AuditEventPublic.model_validate(r) for r in rows], count=count)
