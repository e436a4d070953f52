"""Deployment request and token rates over all API replicas.

Every answered generation is counted in this process's memory (no database write on the request path);
the outbox relay adds the counts to per-minute rows (`DeploymentUsage`, one atomic upsert each) on each
pass, so any replica reads the fleet-wide rates from the database.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert
from sqlmodel import Session, col, select

from app.models import DeploymentUsage, UsagePublic
from app.models.common import utcnow

FIELDS = ("requests", "errors", "prompt_tokens", "completion_tokens")
_lock = threading.Lock()
_pending: dict[tuple[uuid.UUID, datetime], Counter[str]] = {}


def record(deployment_id: uuid.UUID, *, ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
    """Count one answered request (called once per request, in the API process)."""
    key = (deployment_id, _minute(utcnow()))
    with _lock:
        counts = _pending.setdefault(key, Counter())
        counts["requests"] += 1
        counts["errors"] += 0 if ok else 1
        counts["prompt_tokens"] += prompt_tokens
        counts["completion_tokens"] += completion_tokens


def flush(session: Session) -> int:
    """Add this process's counts to the per-minute rows; returns the rows touched. On a database error
    the counts are put back, so a blip delays them instead of losing them."""
    with _lock:
        taken = dict(_pending)
        _pending.clear()
    try:
        for (deployment_id, minute), counts in taken.items():
            session.execute(_add(session, deployment_id, minute, counts))
        session.commit()
    except Exception:
        session.rollback()
        with _lock:
            for key, counts in taken.items():
                _pending.setdefault(key, Counter()).update(counts)
        raise
    return len(taken)


def _add(session: Session, deployment_id: uuid.UUID, minute: datetime, counts: Counter[str]) -> Insert:
    """One atomic upsert: replicas adding to the same minute at once never lose each other's counts."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    values = {name: counts[name] for name in FIELDS}
    statement = insert(DeploymentUsage).values(deployment_id=deployment_id, minute=minute, **values)
    table = DeploymentUsage.__table__.c  # type: ignore[attr-defined]
    return statement.on_conflict_do_update(
        index_elements=["deployment_id", "minute"],
        set_={name: table[name] + statement.excluded[name] for name in FIELDS},
    )


def rates(session: Session, deployment_id: uuid.UUID, window_s: int = 300) -> UsagePublic:
    """Totals and rates over the last `window_s` seconds (whole minutes, the current one included)."""
    since = _minute(utcnow() - timedelta(seconds=window_s))
    rows = session.exec(
        select(DeploymentUsage).where(
            DeploymentUsage.deployment_id == deployment_id, col(DeploymentUsage.minute) > since
        )
    ).all()
    totals = {name: sum(getattr(row, name) for row in rows) for name in FIELDS}
    return UsagePublic(
        window_s=window_s,
        **totals,
        requests_per_minute=totals["requests"] * 60 / window_s,
        completion_tokens_per_second=totals["completion_tokens"] / window_s,
    )


def _minute(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(second=0, microsecond=0)
