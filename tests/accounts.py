"""Test helpers: teams, users and API keys made through the real services (and the real database)."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.security import create_access_token
from app.models import ApiKeyCreate, Membership, Role, Team
from app.services import accounts, api_keys
from app.services.principal import Principal

PASSWORD = "correct horse battery"


@dataclass(frozen=True)
class Member:
    user_id: uuid.UUID
    team_id: uuid.UUID
    email: str
    role: Role
    key: str  # an API key with the member's role

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def login_headers(self) -> dict[str, str]:
        """A login token (what POST /api/auth/login returns), for what API keys may not do."""
        token, _ = create_access_token(get_settings(), self.user_id)
        return {"Authorization": f"Bearer {token}", "X-Team-Id": str(self.team_id)}


def make_team(name: str | None = None) -> uuid.UUID:
    with session_scope() as session:
        team = Team(name=name or f"team-{secrets.token_hex(4)}")
        session.add(team)
        session.commit()
        return team.id


def make_member(team_id: uuid.UUID, role: Role, email: str | None = None) -> Member:
    email = email or f"{role.value}-{secrets.token_hex(4)}@example.com"
    with session_scope() as session:
        user = accounts.get_by_email(session=session, email=email) or accounts.create_user(
            session=session, email=email, password=PASSWORD
        )
        session.add(Membership(team_id=team_id, user_id=user.id, role=role))
        session.commit()
        actor = Principal(user.id, team_id, role)
        _, key = api_keys.create_key(session=session, actor=actor, body=ApiKeyCreate(name="test", role=role))
        return Member(user.id, team_id, email, role, key)
