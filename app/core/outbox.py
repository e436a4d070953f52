"""Transactional outbox: a task send is a row committed with the change it belongs to.

The relay sends unsent rows to the broker and marks them sent. If the API dies between the commit
and the send, the row is still there and the next relay pass (in any API process) sends it. A send
that happens twice (relay died after sending, before marking) is harmless: tasks claim jobs by
attempt number, so the second delivery does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, or_, select

from app.core.db import is_postgres
from app.models import OutboxMessage, utcnow

log = logging.getLogger(__name__)

Sender = Callable[[str, str, dict[str, Any]], None]  # (task_name, queue, kwargs)


def enqueue(
    *, session: Session, task_name: str, queue: str, payload: dict[str, Any], not_before: datetime | None = None
) -> None:
    """Add a send to the caller's transaction; it leaves only if the transaction commits, and not
    before ``not_before`` (a backoff) when one is given."""
    session.add(OutboxMessage(task_name=task_name, queue=queue, payload=payload, not_before=not_before))


def relay_once(*, session: Session, send: Sender, limit: int = 100) -> int:
    """Send pending messages that are due, in id order; returns how many were sent."""
    due = or_(col(OutboxMessage.not_before).is_(None), col(OutboxMessage.not_before) <= utcnow())
    query = (
        select(OutboxMessage)
        .where(col(OutboxMessage.sent_at).is_(None), due)
        .order_by(col(OutboxMessage.id))
        .limit(limit)
    )
    if is_postgres(session):
        # Several API replicas may relay at once; each takes different rows.
        query = query.with_for_update(skip_locked=True)
    sent = 0
    for message in session.exec(query).all():
        try:
            send(message.task_name, message.queue, message.payload)
        except Exception as exc:  # broker down: keep the row, try again next pass
            message.send_attempts += 1
            message.last_error = str(exc)[:1000]
            log.warning("outbox send %s failed: %s", message.id, exc)
            session.add(message)
            break
        message.sent_at = utcnow()
        session.add(message)
        sent += 1
    session.commit()
    return sent


def pending_count(*, session: Session) -> int:
    return len(session.exec(select(OutboxMessage.id).where(col(OutboxMessage.sent_at).is_(None))).all())
