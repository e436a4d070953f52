"""Idempotency keys: one row per (caller, ``Idempotency-Key``), holding the first response to replay."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlmodel import Field, SQLModel

from app.models.common import utcnow


class IdempotencyKey(SQLModel, table=True):
    """A creating request sent with ``Idempotency-Key`` (see ``app/api/idempotency.py``).

    Inserted as "started" (``status_code`` null) before the route runs; the unique ``key_hash`` is what
    makes a concurrent duplicate lose. Completed with the response, which is stored sealed with a
    keystream derived from the client's key (that key itself is stored only hashed), so a minted API key
    or invitation token in a stored answer is not readable from the table alone. Rows older than
    ``api.idempotency_ttl_s`` are deleted lazily.
    """

    __tablename__ = "idempotency_key"

    id: int | None = Field(default=None, primary_key=True)
    key_hash: str = Field(max_length=64, unique=True, description="SHA-256 of the caller's scope and the key")
    user_id: uuid.UUID
    team_id: uuid.UUID | None = Field(default=None, description="Null for routes outside a team (creating one)")
    request_hash: str = Field(max_length=64, description="SHA-256 of method, path, query and canonical body")
    method: str = Field(max_length=10)
    path: str = Field(max_length=500)
    status_code: int | None = Field(default=None, description="Null while the first request runs")
    content_type: str | None = Field(default=None, max_length=200)
    response: bytes | None = Field(default=None, description="Nonce + sealed response body")
    created_at: datetime = Field(default_factory=utcnow, index=True)
    completed_at: datetime | None = None
