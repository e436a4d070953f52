"""Who is calling, in which team, with which role: what every team-scoped service takes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from app.models import Role


@dataclass(frozen=True)
class Principal:
    user_id: uuid.UUID
    team_id: uuid.UUID
    role: Role
    is_superuser: bool = False
    api_key_id: uuid.UUID | None = None  # set when the caller authenticated with an API key
