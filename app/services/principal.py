"""Who is calling, in which team, with which role: what every team-scoped service takes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from app.core.db import session_scope
from app.models import ApiKey, Membership, Role


@dataclass(frozen=True)
class Principal:
    user_id: uuid.UUID
    team_id: uuid.UUID
    role: Role
    is_superuser: bool = False
    api_key_id: uuid.UUID | None = None  # set when the caller authenticated with an API key


def still_allowed(principal: Principal) -> bool:
    """Whether the caller is still a member of the team (and its API key unrevoked): long-lived streams ask
    this now and then, so a member removed mid-stream stops receiving the team's data."""
    with session_scope() as session:
        if session.get(Membership, (principal.team_id, principal.user_id)) is None:
            return False
        key = session.get(ApiKey, principal.api_key_id) if principal.api_key_id else None
        return key is None or key.revoked_at is None
