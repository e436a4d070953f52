"""API keys for scripts and the OpenAI client: team- and role-scoped, shown once, revocable."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from app.api.auth_guards import no_store
from app.api.deps import LoggedIn, SessionDep, Viewer
from app.api.idempotency import idempotent
from app.models import ApiKeyCreate, ApiKeyCreated, ApiKeyPublic, ApiKeysPublic
from app.services import api_keys as service

router = APIRouter(prefix="/teams/{team_id}/api-keys", tags=["api keys"])


@router.post("/", response_model=ApiKeyCreated, status_code=201)
@no_store
@idempotent
def create_key(
    session: SessionDep, principal: Viewer, _: LoggedIn, team_id: uuid.UUID, body: ApiKeyCreate
) -> ApiKeyCreated:
    """A key acting as you in this team, with a role up to yours. The key is in this answer only.
    Needs a login token: API keys cannot mint API keys."""
    row, key = service.create_key(session=session, actor=principal, body=body)
    return ApiKeyCreated(**ApiKeyPublic.model_validate(row).model_dump(), key=key)


@router.get("/", response_model=ApiKeysPublic)
def list_keys(session: SessionDep, principal: Viewer, team_id: uuid.UUID) -> ApiKeysPublic:
    """Your keys (admins: all of the team's). Only prefixes are shown."""
    rows = service.list_keys(session=session, actor=principal)
    return ApiKeysPublic(data=[ApiKeyPublic.model_validate(r) for r in rows], count=len(rows))


@router.delete("/{key_id}", response_model=ApiKeyPublic)
def revoke_key(session: SessionDep, principal: Viewer, team_id: uuid.UUID, key_id: uuid.UUID) -> ApiKeyPublic:
    """Revoke a key (yours, or any in the team for admins); it answers 401 from now on."""
    return ApiKeyPublic.model_validate(service.revoke_key(session=session, actor=principal, key_id=key_id))
