"""Accounts and teams: roles, teams and quotas, users, memberships, invitations, API keys, login
throttling and the audit log."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import StringConstraints
from sqlalchemy import JSON, Column, Index
from sqlmodel import Field, SQLModel

from app.models.common import utcnow


class Role(StrEnum):
    """Per-team roles, each including the one below: viewers read, trainers submit and deploy,
    admins manage members, keys and quotas."""

    viewer = "viewer"
    trainer = "trainer"
    admin = "admin"

    def includes(self, needed: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(needed)


class Team(SQLModel, table=True):
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=100, unique=True)
    # None = the platform default from settings.quotas
    max_active_jobs: int | None = None
    max_queued_jobs: int | None = None
    max_inflight_requests: int | None = None
    created_at: datetime = Field(default_factory=utcnow)


class TeamCreate(SQLModel):
    name: str = Field(min_length=1, max_length=100)


class TeamPublic(SQLModel):
    id: uuid.UUID
    name: str
    role: Role | None = Field(None, description="The caller's role in this team")
    max_active_jobs: int
    max_queued_jobs: int
    max_inflight_requests: int
    created_at: datetime


class TeamsPublic(SQLModel):
    data: list[TeamPublic]
    count: int


# The most any team may be given, even by a platform admin: far above any real fleet, far below what the
# quota columns (32-bit INTEGER) store, so a huge value is a 422 naming the field, never a database error.
MAX_QUOTA = 100_000


class QuotaUpdate(SQLModel):
    max_active_jobs: int | None = Field(
        None, ge=0, le=MAX_QUOTA, description="Queued + running experiments; null = default"
    )
    max_queued_jobs: int | None = Field(None, ge=0, le=MAX_QUOTA, description="Queued experiments; null = default")
    max_inflight_requests: int | None = Field(
        None, ge=0, le=MAX_QUOTA, description="Concurrent /v1 requests; null = default"
    )


class User(SQLModel, table=True):
    __tablename__ = "app_user"  # "user" is reserved in Postgres

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    email: str = Field(max_length=320, unique=True, index=True)
    full_name: str = Field(default="", max_length=200)
    hashed_password: str = Field(max_length=200)
    is_active: bool = True
    is_superuser: bool = Field(False, description="Platform admin: creates teams, sets any quota")
    password_changed_at: datetime | None = Field(default=None, description="Login tokens issued before it are refused")
    created_at: datetime = Field(default_factory=utcnow)


class UserPublic(SQLModel):
    id: uuid.UUID
    email: str
    full_name: str
    is_active: bool
    is_superuser: bool
    created_at: datetime


class UserMe(UserPublic):
    teams: list[TeamPublic]


# The password policy (length and strength, app/core/passwords.py) is checked by the services, so its
# 422 says why a password is refused; the schemas only bound the size.
STRENGTH_RULES = "At least 10 characters and not easy to guess (zxcvbn strength 3 of 4)"


class UserUpdateMe(SQLModel):
    full_name: str | None = Field(None, max_length=200)
    current_password: str | None = Field(None, max_length=200)
    new_password: str | None = Field(None, max_length=200, description=STRENGTH_RULES)


class Membership(SQLModel, table=True):
    team_id: uuid.UUID = Field(foreign_key="team.id", primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="app_user.id", primary_key=True, index=True)
    role: Role
    created_at: datetime = Field(default_factory=utcnow)


class MemberPublic(SQLModel):
    user_id: uuid.UUID
    email: str
    full_name: str
    role: Role
    created_at: datetime


class MembersPublic(SQLModel):
    data: list[MemberPublic]
    count: int


class MemberUpdate(SQLModel):
    role: Role


class Invitation(SQLModel, table=True):
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="team.id", index=True)
    email: str = Field(max_length=320)
    role: Role
    token_hash: str = Field(max_length=64, unique=True)
    invited_by: uuid.UUID = Field(foreign_key="app_user.id")
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    accepted_at: datetime | None = None


class InvitationCreate(SQLModel):
    email: Annotated[str, StringConstraints(pattern=r"^[^@\s]+@[^@\s]+$")] = Field(min_length=3, max_length=320)
    role: Role = Role.trainer


class InvitationPublic(SQLModel):
    id: uuid.UUID
    team_id: uuid.UUID
    email: str
    role: Role
    created_at: datetime
    expires_at: datetime
    accepted_at: datetime | None


class InvitationCreated(InvitationPublic):
    token: str = Field(description="Shown once: send it to the invitee, who accepts with it")


class InvitationsPublic(SQLModel):
    data: list[InvitationPublic]
    count: int


class InvitationAccept(SQLModel):
    token: str = Field(min_length=10, max_length=200)
    password: str | None = Field(None, max_length=200, description=f"Sets up a new account. {STRENGTH_RULES}")
    full_name: str = Field("", max_length=200)


class ApiKey(SQLModel, table=True):
    """A credential for scripts and the OpenAI client. Only a SHA-256 of the secret is stored: the key
    has 256 random bits, so a fast hash is safe (argon2 is for low-entropy passwords)."""

    __tablename__ = "api_key"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="team.id", index=True)
    user_id: uuid.UUID = Field(foreign_key="app_user.id", index=True)
    name: str = Field(max_length=100)
    role: Role
    prefix: str = Field(max_length=16, description="First characters, to recognise a key in lists")
    key_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(default_factory=utcnow)
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class ApiKeyCreate(SQLModel):
    name: str = Field(min_length=1, max_length=100)
    role: Role = Field(Role.trainer, description="At most the creator's own role")


class ApiKeyPublic(SQLModel):
    id: uuid.UUID
    team_id: uuid.UUID
    user_id: uuid.UUID
    name: str
    role: Role
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    key: str = Field(description="Shown once; only its hash is stored")


class ApiKeysPublic(SQLModel):
    data: list[ApiKeyPublic]
    count: int


class Token(SQLModel):
    access_token: str
    token_type: str = "bearer"  # noqa: S105 - the OAuth2 token type, not a secret
    expires_in: int


class LoginThrottle(SQLModel, table=True):
    """Failed logins per email and per client address, for the login rate limit."""

    __tablename__ = "login_throttle"

    key: str = Field(primary_key=True, max_length=400)
    failures: int = 0
    window_start: datetime = Field(default_factory=utcnow)


class AuditEvent(SQLModel, table=True):
    """Who did what to which object; written in the same transaction as the change."""

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_team_created", "team_id", "created_at"),)

    id: int | None = Field(default=None, primary_key=True)
    team_id: uuid.UUID = Field(foreign_key="team.id")
    actor_user_id: uuid.UUID | None = Field(default=None, foreign_key="app_user.id")
    actor_api_key_id: uuid.UUID | None = Field(default=None, foreign_key="api_key.id")
    action: str = Field(max_length=64, description="e.g. experiment.create, member.remove")
    target_type: str = Field(max_length=32)
    target_id: str = Field(max_length=64)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)


class AuditEventPublic(SQLModel):
    id: int
    actor_user_id: uuid.UUID | None
    actor_api_key_id: uuid.UUID | None
    action: str
    target_type: str
    target_id: str
    data: dict[str, Any]
    created_at: datetime


class AuditEventsPublic(SQLModel):
    data: list[AuditEventPublic]
    count: int
