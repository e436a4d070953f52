"""The transactional outbox: Celery sends committed with the rows they are about."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from app.models.common import utcnow


class OutboxMessage(SQLModel, table=True):
    """A Celery send committed in the same transaction as the row it is about."""

    __tablename__ = "outbox"

    id: int | None = Field(default=None, primary_key=True)
    task_name: str = Field(max_length=200)
    queue: str = Field(max_length=100)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)
    sent_at: datetime | None = Field(default=None, index=True)
    # Backoff: the relay leaves the row alone until then (a requeue after a lost worker waits a little).
    not_before: datetime | None = None
    send_attempts: int = 0
    last_error: str | None = None
